#!/usr/bin/env bash
# Every vitops check that needs CUDA, in one go, on one H100/H200-class GPU (each step has a time limit; together at most 7 minutes):
#
#   bash bench/gpu.sh OUT_DIR            run them; tables and logs land in OUT_DIR
#   bash bench/gpu.sh --dry-run OUT_DIR  list what would run, with the Python, torch and packages found; run nothing
#
# NOT RUN ON A GPU YET: it was written on a CPU-only machine and checked there with `bash -n` and the dry run.
#
# The GPU machine has its own Python (3.12) and torch and no internet: the script runs the project from this
# source tree (through build/src/vitops, a link to it) with whatever packages it finds, prints the versions it used, and lists every
# missing wheel that must be brought along (a missing one skips only the checks that need it).
#
# Steps (each with its own time limit; a failed or skipped step does not stop the others):
#   1. train throughput and MFU: bench/train_throughput.py --preset vit-s16 and vit-b16 --device cuda
#      (needs a pytorch-image-models checkout: TIMM_REPO, default ../pytorch-image-models)
#   2. bench/latency_targets.py --gpu: torch eager vs torch.compile, ViT-S/16 and ViT-B/16
#   3. the `gpu`-marked tests (pytest -m gpu)
#   4. bench/amp_parity.py: a short fine-tune, bf16 autocast against FP32 top-1 within noise
# Exit status: 0 when every step that ran passed, 1 when one failed, 2 for a usage error.
set -uo pipefail

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash bench/gpu.sh [--dry-run] OUT_DIR" >&2
  exit 2
fi
out=$1
cd "$(dirname "$0")/.."
# vitops is one import root that pyproject.toml maps to this folder. Without an install (the GPU machine has
# no internet for `pip install -e .`), a link named `vitops` to this folder gives the same import root.
PY=${PYTHON:-python3}
if ! "$PY" -c "import vitops.flows" 2>/dev/null; then
  mkdir -p build/src && ln -sfn "$PWD" build/src/vitops
  export PYTHONPATH="$PWD/build/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true \
  DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false GX_ANALYTICS_ENABLED=false TQDM_DISABLE=1
TIMM_REPO=${TIMM_REPO:-../pytorch-image-models}
mkdir -p "$out"

# What this machine has: Python, torch/CUDA, and each package a step imports.
"$PY" - "$out/environment.txt" <<'PYEOF'
import importlib.metadata as md, importlib.util, platform, sys
need = {
    "torch": "all", "timm": "all", "numpy": "all", "safetensors": "all", "pyyaml": "all", "pydantic": "all",
    "scikit-learn": "latency, amp parity", "psutil": "latency", "onnx": "tests", "onnxscript": "tests",
    "onnxruntime": "tests", "pytest": "tests", "pytest-timeout": "tests", "tensorrt": "tensorrt tests",
}
modules = {"pyyaml": "yaml", "scikit-learn": "sklearn", "pytest-timeout": "pytest_timeout"}
lines = [f"python {platform.python_version()} ({sys.executable})"]
try:
    import torch
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if cuda else "none"
    lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {gpu}")
except ImportError:
    pass  # named in the list below
missing = []
for pkg, used in need.items():
    if importlib.util.find_spec(modules.get(pkg, pkg)) is None:
        missing.append(pkg)
        lines.append(f"{pkg}: MISSING (needed for: {used})")
    else:
        try:
            lines.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            lines.append(f"{pkg} (version unknown)")
lines.append("missing wheels to bring along: " + (", ".join(missing) if missing else "none"))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF

has() { "$PY" -c "import $1" >/dev/null 2>&1; }
status=0
summary=()
step() {  # step NAME LIMIT_S REQUIRED_MODULES... -- COMMAND...
  local name=$1 limit=$2; shift 2
  local mods=()
  while [[ $1 != "--" ]]; do mods+=("$1"); shift; done
  shift
  for m in "${mods[@]}"; do
    if ! has "$m"; then summary+=("SKIPPED $name (no $m)"); return; fi
  done
  if [[ $dry -eq 1 ]]; then
    summary+=("WOULD RUN $name (limit ${limit}s): $*")
    return
  fi
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>"$out/$name.log"
  local rc=$?
  local took=$((SECONDS - start))
  if [[ $rc -eq 0 ]]; then summary+=("PASSED $name (${took}s)"); else summary+=("FAILED $name (rc $rc, ${took}s; see $out/$name.log)"); status=1; fi
}

if [[ -d "$TIMM_REPO" ]]; then
  for preset in vit-s16 vit-b16; do
    step "train-$preset" 80 torch timm -- "$PY" bench/train_throughput.py --timm-repo "$TIMM_REPO" --preset "$preset" \
      --device cuda --epochs 2 --repeats 1 --json "$out/train-$preset.json"
  done
else
  summary+=("SKIPPED train-vit-s16, train-vit-b16 (no pytorch-image-models checkout at TIMM_REPO=$TIMM_REPO)")
fi
step latency-gpu 80 torch timm -- "$PY" bench/latency_targets.py --gpu --iters 100
# Only the files that hold gpu-marked tests: the others import MLflow, Prefect, GX ... that a GPU box may lack.
mapfile -t gpu_tests < <(grep -l "mark.gpu" tests/test_*.py)
step gpu-tests 100 torch pytest onnx -- "$PY" -m pytest -q -m gpu -p no:cacheprovider "${gpu_tests[@]}"
step amp-parity 80 torch timm sklearn -- "$PY" bench/amp_parity.py --device cuda --json "$out/amp-parity.json"

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit $status
