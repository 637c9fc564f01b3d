#!/usr/bin/env bash
# Every vitops check that needs CUDA, in one go, on one H100/H200-class GPU, in at most 8 minutes:
#
#   bash bench/gpu.sh OUT_DIR              run them; tables, JSON and logs land in OUT_DIR (and nothing elsewhere)
#   bash bench/gpu.sh --dry-run OUT_DIR    say what would run, with the Python, torch and packages found; run nothing
#   bash bench/gpu.sh --fetch-wheels       on a machine with a package index: download the wheels below that a GPU
#                                          machine lacks (cp312, manylinux) into build/gpu-wheels (~20 MB)
#
# The GPU machine has its own Python (3.12), torch and timm and no internet: the script runs this source tree
# (through build/src/vitops, a link to it, when vitops is not installed) with that machine's torch and timm, and
# installs from build/gpu-wheels (carried along; build/ is git-ignored) only the packages it lacks, without their
# dependencies, into OUT_DIR/work/site (pip --target; unzipped when there is no pip), never over its own ones.
# TIMM_REPO (default: build/pytorch-image-models, absolute) is a checkout of huggingface/pytorch-image-models, or
# its train.py alone (then run with this machine's timm), for the train bench's timm row (train.py is not in timm's
# wheel); without one the bench runs without that row, named.
#
# Steps, in this order, each with a time limit, all within an 8-minute budget (GPU_SH_BUDGET_S=465 s from the start,
# setup included; a step that would start with under 20 s left is skipped, named, and no step's limit runs past the
# budget, so the last step gets what is left). A failed or skipped step does not stop the others; expected times on
# an H200 in brackets:
#   1. gpu-tests (110 s) [~90]: pytest -m gpu on the files holding gpu-marked tests: a bf16 training epoch, the
#      torch-aot engine built and parity-gated on CUDA, the pyfunc model serving it with GPU preprocessing
#      (TensorRT's test is skipped without tensorrt)
#   2. ceiling (80 s) [~70]: bench/gpu_ceiling.py --parts inference, ViT-B/16 FP16 on synthetic data on the GPU,
#      eager and torch.compile (CUDA graphs): the inference reference of the torch-aot step (the training ceiling
#      is measured by the train bench in its own run)
#   3. torch-aot (150 s) [~120]: bench/torch_aot_targets.py, ViT-B/16 FP16: AOTInductor build (package probed in a
#      child process first; the torch.compile route if it fails) and serving latency/throughput against the targets
#   4. train-vit-b16 (170 s) [~150]: bench/train_throughput.py --preset vit-b16 --device cuda: the synthetic
#      training ceiling (eager, compiled), vitops' input pipeline and timm's train.py in one run
#   5. amp-parity (40 s, if time is left) [~20]: bench/amp_parity.py --device cuda: bf16 autocast against FP32 top-1
# Exit status: 0 when every step that ran passed, 1 when one failed, 2 for a usage error.
set -uo pipefail

# dist name : import name; what vitops' GPU steps import that a bare GPU machine may lack (the notes of the last
# run: pydantic and its four dependencies); pandas for the test helpers; versions as in constraints.txt.
WHEELS=(
  "pydantic==2.14.4:pydantic" "pydantic-core==2.50.5:pydantic_core" "annotated-types==0.8.0:annotated_types"
  "typing-inspection==0.4.5:typing_inspection" "typing-extensions==4.16.0:typing_extensions"
  "pyyaml==6.0.4:yaml" "safetensors==0.8.0:safetensors" "pytest-timeout==2.4.0:pytest_timeout"
  "pandas==3.1.1:pandas" "python-dateutil==2.9.0.post0:dateutil" "six==1.17.0:six" "tzdata==2026.6:tzdata"
  "psutil==7.2.2:psutil"
)

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheels=$root/build/gpu-wheels
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$wheels"
  specs=("${WHEELS[@]%%:*}")
  # --no-deps: exactly these files; their dependencies are in the list or already on the GPU machine (numpy).
  "$PY" -m pip download --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$wheels" "${specs[@]}" || exit 1
  ls -1 "$wheels"
  du -sh "$wheels"
  exit 0
fi

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash bench/gpu.sh [--dry-run] OUT_DIR | bash bench/gpu.sh --fetch-wheels" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
work=$out/work
mkdir -p "$work/site" "$work/tmp" "$work/cache"
cd "$root" || exit 2
TIMM_REPO=${TIMM_REPO:-$root/build/pytorch-image-models}
[[ "$TIMM_REPO" == /* ]] || TIMM_REPO=$root/$TIMM_REPO

# vitops is one import root that pyproject.toml maps to this folder. Without an install (the GPU machine has no
# internet for `pip install -e .`), a link named `vitops` to this folder gives the same import root.
if ! "$PY" -c "import vitops.flows" 2>/dev/null; then
  mkdir -p "$root/build/src" && ln -sfn "$root" "$root/build/src/vitops"
  export PYTHONPATH="$root/build/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
# Offline, no telemetry, output unbuffered (a step killed at its limit keeps what it printed), and every cache and
# temporary file under OUT_DIR/work.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true \
  DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false GX_ANALYTICS_ENABLED=false TQDM_DISABLE=1 \
  PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TMPDIR="$work/tmp" XDG_CACHE_HOME="$work/cache" \
  TORCHINDUCTOR_CACHE_DIR="$work/cache/inductor" TRITON_CACHE_DIR="$work/cache/triton" MPLCONFIGDIR="$work/cache/mpl" \
  CUDA_CACHE_PATH="$work/cache/nv" HF_HOME="$work/cache/hf"

budget=${GPU_SH_BUDGET_S:-465}
started=$SECONDS
# The wheels this machine lacks: installed from build/gpu-wheels (in a dry run only listed), then the environment.
"$PY" - "$dry" "$wheels" "$work/site" "$out/environment.txt" "$work/modules.txt" "${WHEELS[@]}" <<'PYEOF'
import glob, importlib.metadata as md, importlib.util, os, platform, subprocess, sys, zipfile
dry, wheels, site, report, found, pairs = sys.argv[1] == "1", *sys.argv[2:6], sys.argv[6:]
lines = [f"python {platform.python_version()} ({sys.executable})"]
missing, brought, absent = [], [], []
for pair in pairs:
    spec, module = pair.rsplit(":", 1)
    if importlib.util.find_spec(module) is None:
        missing.append(spec)
        name = spec.split("==")[0].replace("-", "_").lower()
        files = [f for f in glob.glob(os.path.join(wheels, "*.whl")) if os.path.basename(f).lower().startswith(name + "-")]
        (brought if files else absent).append((spec, files[:1]))
lines.append("lacking here: " + (", ".join(missing) or "none"))
lines.append("from build/gpu-wheels: " + (", ".join(s for s, _ in brought) or "none"))
if absent:
    lines.append("NOT in build/gpu-wheels (bring them; run `bash bench/gpu.sh --fetch-wheels` where pip reaches an index): "
                 + ", ".join(s for s, _ in absent))
if brought and not dry:
    files = [f[0] for _, f in brought]
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", site, *files],
                         capture_output=True, text=True)
    if pip.returncode != 0:  # no pip on this Python: a wheel's files unzipped are the package
        lines.append("pip install failed (" + (pip.stderr.strip().splitlines() or ["?"])[-1] + "); unzipping the wheels")
        for f in files:
            zipfile.ZipFile(f).extractall(site)
    lines.append(f"installed into {site}: " + ", ".join(os.path.basename(f) for f in files))
try:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {gpu}")
except ImportError as err:
    lines.append(f"torch: MISSING ({err})")
for pkg in ("timm", "numpy", "onnx", "onnxruntime", "pytest", "scikit-learn", "pillow", "tensorrt"):
    try:
        lines.append(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        lines.append(f"{pkg}: MISSING")
open(report, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
importlib.invalidate_caches()
steps_need = {"torch", "timm", "pytest", "pandas", "yaml", "pydantic", "sklearn"}
here = {m for m in steps_need if importlib.util.find_spec(m) is not None}
if dry:  # what build/gpu-wheels would bring counts as there
    here |= {pair.rsplit(":", 1)[1] for pair in pairs if any(s == pair.rsplit(":", 1)[0] for s, _ in brought)}
open(found, "w").write("\n".join(sorted(here)) + "\n")
PYEOF

status=0
summary=()
# The modules the steps need that this Python finds (in a dry run: or that build/gpu-wheels would bring).
has() { grep -qx "$1" "$work/modules.txt"; }
step() {  # step NAME LIMIT_S REQUIRED_MODULES... -- COMMAND...
  local name=$1 limit=$2; shift 2
  local mods=()
  while [[ $1 != "--" ]]; do mods+=("$1"); shift; done
  shift
  for m in "${mods[@]}"; do
    if ! has "$m"; then summary+=("SKIPPED $name (no $m)"); return; fi
  done
  local left=$((budget - (SECONDS - started)))
  if [[ $dry -eq 1 ]]; then
    summary+=("WOULD RUN $name (limit ${limit}s): $*")
    return
  fi
  if [[ $left -lt 20 ]]; then summary+=("SKIPPED $name (${left}s left of the ${budget}s budget)"); return; fi
  [[ $limit -gt $left ]] && limit=$left
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" >"$out/$name.txt" 2>"$out/$name.log"
  local rc=$?
  local took=$((SECONDS - start))
  tail -n 25 "$out/$name.txt"
  if [[ $rc -eq 0 ]]; then
    summary+=("PASSED $name (${took}s of ${limit}s)")
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    summary+=("FAILED $name (time limit ${limit}s; see $out/$name.log)"); status=1
  else
    summary+=("FAILED $name (rc $rc, ${took}s; see $out/$name.log)"); status=1
  fi
}

# Only the files that hold gpu-marked tests: the others import MLflow, Prefect, GX ... that a GPU box may lack.
mapfile -t gpu_tests < <(grep -l "mark.gpu" "$root"/tests/test_*.py)
step gpu-tests 110 torch timm pytest pandas yaml -- "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider \
  --continue-on-collection-errors --basetemp "$work/pytest" "${gpu_tests[@]}"
step ceiling 80 torch timm -- "$PY" "$root/bench/gpu_ceiling.py" --parts inference --json "$out/ceiling.json" \
  --budget-s 72
step torch-aot 150 torch timm -- "$PY" "$root/bench/torch_aot_targets.py" --json "$out/torch-aot.json" \
  --ceiling "$out/ceiling.json" --work-dir "$work/torch-aot"
timm_repo=()
[[ -f "$TIMM_REPO/train.py" ]] && timm_repo=(--timm-repo "$TIMM_REPO") \
  || summary+=("NOTE train-vit-b16 runs without timm's row (no train.py at TIMM_REPO=$TIMM_REPO)")
step train-vit-b16 170 torch timm pydantic yaml sklearn -- "$PY" "$root/bench/train_throughput.py" --preset vit-b16 \
  --device cuda "${timm_repo[@]}" --epochs 2 --repeats 1 --work-dir "$work/train" --json "$out/train-vit-b16.json"
step amp-parity 40 torch timm pydantic yaml sklearn -- "$PY" "$root/bench/amp_parity.py" --device cuda \
  --json "$out/amp-parity.json"

summary+=("took $((SECONDS - started))s of the ${budget}s budget")
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
# The engines, caches and installed wheels are large; what matters is in the tables and logs above (KEEP_WORK=1 keeps them).
[[ $dry -eq 0 && -n "${KEEP_WORK:-}" ]] || rm -rf "$work"
exit $status
