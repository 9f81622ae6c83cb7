#!/usr/bin/env bash
# GPU check of the device-native selection and sweep, in one prepared script (about 5 minutes on one H100/H200):
#
#   0. the CUDA tests (pivoted factorizations on the device, 16-mixed precision);
#   1. pivoted_qr on the GPU vs scipy geqp3 on the host, A = U_p^T, 2048 x 4096 (and 250 x 500),
#      float32 and float64;
#   2. the CaffeNet-sized fc6 sweep (9216->4096->4096->1000, K = 50000 streamed samples, 64-point
#      grid, svd_qr and qr) on the GPU, end to end, with time and peak memory per phase;
#   3. the callback on MNIST LeNet-300-100 (3 epochs; targets net.fc1:in, net.fc1, net.fc2;
#      default grid; joint=None and joint="greedy") on the GPU and on the host CPU.
#
# Usage (from anywhere; it runs in the repository root):
#   benchmarks/gpu_check.sh [OUT_DIR] [--device cpu]
# OUT_DIR defaults to $OUT, else ./gpu_check_out. It receives gpu_check.md (all tables),
# gpu_check_*.json, callback_profile.txt and gpu_check.log. `--device cpu` runs the same steps at
# --tiny sizes on the CPU: a dry run of this script's logic on a machine without a GPU.
# MNIST is read from $NEURONPRUNE_MNIST_DIR, ../shared/data/mnist or benchmarks/.cache/mnist
# (copy the IDX files there and carry benchmarks/.cache to a machine without ../shared); the
# trained LeNet-300-100 is taken from benchmarks/.cache when present, else trained here.
#
# Needs python with torch, pytorch_lightning and torchmetrics; numpy/scipy for the host
# baselines. No network access is needed.
set -uo pipefail

OUT_DIR="${OUT:-}"
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) OUT_DIR="$1"; shift ;;
  esac
done
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
OUT_DIR="${OUT_DIR:-$REPO/gpu_check_out}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
MD="$OUT_DIR/gpu_check.md"
PY="${PYTHON:-python3}"
: > "$LOG"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
STARTED=$SECONDS

# The package runs from this tree. pytest, when missing, comes from carried wheels in .whl/.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pytest" >/dev/null 2>&1 && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site \
    "$REPO"/.whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
if ! "$PY" -c "import lightning_neuronprune" >>"$LOG" 2>&1; then
  log "FATAL: cannot import lightning_neuronprune"; exit 1
fi

"$PY" - "$DEVICE" <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util, sys, torch
device = sys.argv[1]
print("torch", torch.__version__, "| cuda available:", torch.cuda.is_available(),
      "| numpy:", importlib.util.find_spec("numpy") is not None,
      "| scipy:", importlib.util.find_spec("scipy") is not None)
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("FATAL: --device cuda but torch.cuda.is_available() is False")
    print("GPU:", torch.cuda.get_device_name(0))
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

SIZE=()
LIMIT=200
CB_ARGS=(--devices cuda cpu)
if [ "$DEVICE" = "cpu" ]; then
  SIZE=(--tiny --threads 1); LIMIT=240
  CB_ARGS=(--devices cpu --epochs 1 --limit-train 2000 --joint none)
fi

# MNIST: the first directory holding the IDX files.
MNIST=""
for d in "${NEURONPRUNE_MNIST_DIR:-}" "$REPO/../shared/data/mnist" "$REPO/shared/data/mnist" \
         "$REPO/benchmarks/.cache/mnist"; do
  if [ -n "$d" ] && { [ -e "$d/train-images-idx3-ubyte" ] || [ -e "$d/train-images-idx3-ubyte.gz" ]; }; then
    MNIST="$d"; break
  fi
done

status=0
step() {  # step NAME TIMEOUT COMMAND...: one step, its output into the log
  local name="$1" limit="$2"; shift 2
  log "step $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "step $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}

if [ "$DEVICE" != "cpu" ] && "$PY" -c "import pytest" >/dev/null 2>&1; then
  step cuda_tests 90 "$PY" -m pytest -q -rA -p no:cacheprovider -o addopts="" \
    tests/test_linalg.py tests/test_precision.py tests/test_selection_output.py -k "cuda or 16"
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$LOG" | grep -v "bf16\|32-true\|64-true" | tail -12
fi
step qr "$LIMIT" "$PY" benchmarks/bench_sweep.py --device "$DEVICE" "${SIZE[@]}" --parts qr \
  --markdown "$MD" --section gpu_check_qr --json "$OUT_DIR/gpu_check_qr.json"
step profile_qr 60 "$PY" benchmarks/profile_pivoted_qr.py --device "$DEVICE" \
  --n "$([ "$DEVICE" = cpu ] && echo 256 || echo 4096)"
sed -n '/^float32/,/^USDT\|^---/p' "$LOG" | head -8
step scale "$LIMIT" "$PY" benchmarks/bench_sweep.py --device "$DEVICE" "${SIZE[@]}" --parts scale \
  --markdown "$MD" --section gpu_check_scale --json "$OUT_DIR/gpu_check_scale.json"
if [ -n "$MNIST" ]; then
  step callback "$LIMIT" "$PY" benchmarks/bench_callback.py "${CB_ARGS[@]}" --data-dir "$MNIST" \
    --markdown "$MD" --section gpu_check_callback --profile "$OUT_DIR/callback_profile.txt"
else
  log "step callback skipped: no MNIST IDX files (set NEURONPRUNE_MNIST_DIR or copy them to benchmarks/.cache/mnist)"
fi

log "done in $((SECONDS - STARTED)) s, status $status; tables in $MD"
[ -e "$MD" ] && cat "$MD"
exit $status
