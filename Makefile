# vitops — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline-safe defaults: without them libraries wait on hosts this machine cannot reach.
export MLFLOW_DISABLE_TELEMETRY ?= true
# DO_NOT_TRACK also turns off OpenVINO's and NNCF's telemetry in vitops (deploy/openvino.py): they read no
# variable of their own, so vitops hides their telemetry module; `opt_in_out --opt_out` does it for all tools.
export DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1
export GX_ANALYTICS_ENABLED ?= false

SAMPLE_DIR ?= build/sample-digits
# the pilot's batch of "new images from the line" (params.yaml pilot.batch)
LINE_BATCH ?= build/line-batch

.PHONY: help setup run repro test test-fast lint format bench-flow bench-validate bench-train bench-parity bench-latency bench-gpu clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install vitops with its pinned dependencies

run: $(STAMP) ## the main job on embedded defaults: sample data -> DVC data version (+ the pilot batch) -> the retrain flow
	$(BIN)/vitops data sample $(SAMPLE_DIR)
	$(BIN)/vitops data import $(SAMPLE_DIR)
	$(BIN)/vitops data sample-batch $(LINE_BATCH)
	$(BIN)/vitops retrain

repro: $(STAMP) ## the same stages through DVC (`dvc repro`; a second run does nothing)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(STAMP) ## run the test suite (offline; starts its own MLflow and Prefect servers on 127.0.0.1)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP) ## unit tests only, the fast loop, under 3 minutes (skips tests marked integration or slow)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not integration and not slow"

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-validate: $(STAMP) ## validation throughput against a plain Pillow decode loop
	$(BIN)/python bench/validate_throughput.py

TIMM_REPO ?= ../pytorch-image-models
bench-train: $(STAMP) ## training img/s: ceiling, input pipeline vs per-image loader, timm's train.py if TIMM_REPO has it
	$(BIN)/python bench/train_throughput.py $(if $(wildcard $(TIMM_REPO)/train.py),--timm-repo $(abspath $(TIMM_REPO)))

bench-parity: $(STAMP) ## quickstart top-1 with the augmentation on the device against the per-image loader
	$(BIN)/python bench/pipeline_parity.py

bench-flow: $(STAMP) ## the retrain flow's orchestration and tracking overhead against the stages called directly
	$(BIN)/python bench/flow_overhead.py

bench-latency: $(STAMP) ## ONNX Runtime and OpenVINO engines against torch eager, quickstart ViT and ViT-S/16
	$(BIN)/python bench/latency_targets.py

bench-gpu: ## every CUDA check in one go on a GPU machine (bench/gpu.sh OUT_DIR; DRY_RUN=1 lists them)
	bash bench/gpu.sh $(if $(DRY_RUN),--dry-run) build/gpu-bench

clean: ## remove build outputs (keeps .venv, data and the DVC cache)
	rm -rf build artifacts .pytest_cache .ruff_cache
