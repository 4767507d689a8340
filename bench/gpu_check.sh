#!/usr/bin/env bash
# The first thing to run on a machine with one H100/H200 and this checkout: every GPU check in one command,
# within 9 minutes, no network. Python with torch and triton must already be installed; the project is
# installed with --no-deps (plus any pure-Python wheels carried in with --wheels DIR).
#
#   bench/gpu_check.sh OUT_DIR [--wheels DIR]     # on the GPU machine
#   bench/gpu_check.sh --dry-run OUT_DIR          # anywhere: checks that every step resolves (CI runs this)
#
# Steps, each under its own time limit, each logged to OUT_DIR/<step>.log, all summarised in OUT_DIR/summary.tsv
# (step, exit status, seconds); a failing step does not stop the others, and the script exits non-zero if any
# failed:
#   env      nvidia-smi, torch/triton versions, the device torch sees
#   install  pip install --no-deps -e . (and --wheels DIR, offline)
#   tests    pytest -m $GPU_MARKER (Triton MoE vs torch in bf16, engine on CUDA, deterministic resume on CUDA;
#            the default pytest run deselects the marker, `-m` here overrides it); the dry run checks that at
#            least $MIN_GPU_TESTS tests carry it
#   tune-ep8, tune-ep16   fused-MoE tile sweep on K2 shard shapes -> OUT_DIR/tune/<device>.json
#   kernel   bench/kernel_moe.py against the device's measured copy bandwidth -> OUT_DIR/kernel_moe.json
set -uo pipefail

DRY_RUN=0
OUT=""
WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --wheels) WHEELS="${2:?--wheels needs a directory}"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "usage: bench/gpu_check.sh [--dry-run] OUT_DIR [--wheels DIR]" >&2; exit 2; }

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
GPU_MARKER="${GPU_MARKER:-gpu}"
MIN_GPU_TESTS="${MIN_GPU_TESTS:-3}"  # Triton MoE in bf16, the engine on CUDA, deterministic resume on CUDA
export PYTHON GPU_MARKER MIN_GPU_TESTS
TUNE_BATCHES="${TUNE_BATCHES:-1 32 256}"
mkdir -p "$OUT/tune" || exit 2
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.tsv"
printf 'step\tstatus\tseconds\n' > "$SUMMARY"
export HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET
FAILED=0

# step NAME LIMIT_S OK_STATUSES CMD...: runs CMD under `timeout`, logs it, records its status and wall time;
# OK_STATUSES (comma-separated) are the exit statuses that count as success.
step() {
  local name="$1" limit="$2" ok="$3"; shift 3
  local start=$SECONDS status
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$SUMMARY"
  [[ ",$ok," == *",$status,"* ]] || { FAILED=1; echo "   $name FAILED (status $status): tail of $OUT/$name.log"; tail -n 15 "$OUT/$name.log"; }
}

PY_IMPORTS='import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())'
if [ "$DRY_RUN" -eq 1 ]; then
  # No GPU: the same interpreter, project, test selection and entry points, each resolved without running.
  step env 60 0 "$PYTHON" -P -c "$PY_IMPORTS"
  step install 120 0 "$PYTHON" -m pip install --dry-run --no-index --no-deps --no-build-isolation -e .
  # The GPU tests must exist and be collected: at least $MIN_GPU_TESTS of them carry the marker.
  step tests 240 0 bash -c 'listed=$("$PYTHON" -P -m pytest --collect-only -q -m "$GPU_MARKER" -p no:cacheprovider) \
    || { echo "$listed"; exit 1; }; echo "$listed"; n=$(grep -c "::" <<< "$listed")
    echo "gpu_check: $n tests carry the $GPU_MARKER marker (at least $MIN_GPU_TESTS needed)"; [ "$n" -ge "$MIN_GPU_TESTS" ]'
  step tune-ep8 60 0 "$PYTHON" -P -m k2serve.worker.quant.tune --help
  step kernel 60 0 "$PYTHON" -P bench/kernel_moe.py --help
else
  step env 20 0 bash -c "nvidia-smi && $PYTHON -P -c '$PY_IMPORTS; print(torch.cuda.get_device_name())'"
  if [ -n "$WHEELS" ]; then
    step install 40 0 bash -c "$PYTHON -m pip install --no-index --no-deps '$WHEELS'/*.whl && $PYTHON -m pip install --no-index --no-deps --no-build-isolation -e ."
  else
    step install 40 0 "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e .
  fi
  step tests 200 0 "$PYTHON" -P -m pytest -q -m "$GPU_MARKER" -p no:cacheprovider --junitxml="$OUT/tests.xml"
  # shellcheck disable=SC2086  # TUNE_BATCHES is a list of numbers
  step tune-ep8 70 0 "$PYTHON" -P -m k2serve.worker.quant.tune --ep 8 --batches $TUNE_BATCHES --out "$OUT/tune"
  # shellcheck disable=SC2086
  step tune-ep16 70 0 "$PYTHON" -P -m k2serve.worker.quant.tune --ep 16 --batches $TUNE_BATCHES --out "$OUT/tune"
  step kernel 80 0 "$PYTHON" -P bench/kernel_moe.py --json "$OUT/kernel_moe.json"
fi

echo "== summary ($SUMMARY)"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
exit "$FAILED"
