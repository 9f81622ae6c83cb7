#!/usr/bin/env bash
# GPU check of issue 4, in one prepared script (under 5 minutes on one H100/H200):
#
#   1. pivoted_qr on the GPU vs scipy geqp3 on the host, float32, A = U_p^T, n = 4096, p = 2048;
#   2. the CaffeNet-sized sweep (9216->4096->4096->1000, K = 50000 streamed samples, 64-point grid,
#      svd_qr and qr) on the GPU: time and peak memory per phase;
#   3. the MNIST sweeps (LeNet5-FC2 every p, LeNet300-100-FC2) on the GPU against the
#      straightforward Algorithm 1 (numpy/scipy on the host, its forward passes on the GPU),
#      when MNIST is found; trained models come from benchmarks/.cache (carry it), else they are
#      trained for 2 epochs here.
#
# Usage (from anywhere; it runs in the repository root):
#   benchmarks/gpu_check.sh [OUT_DIR] [--device cpu]
# OUT_DIR defaults to $OUT, else ./gpu_check_out. It receives gpu_check.md (all tables),
# gpu_check_*.json and gpu_check.log. `--device cpu` runs the same steps with --tiny sizes on the
# CPU: a dry run of this script's logic on a machine without a GPU.
#
# Needs python with torch, pytorch_lightning and torchmetrics. numpy/scipy may be missing: the
# comparisons that need them are skipped with a note. No network access is needed.
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
PY="${PYTHON:-python}"
: > "$LOG"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
STARTED=$SECONDS

# The package: installed, else editable install without dependencies, else PYTHONPATH=the repository root.
if ! "$PY" -c "import lightning_neuronprune" >/dev/null 2>&1; then
  if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
      || ! "$PY" -c "import lightning_neuronprune" >/dev/null 2>&1; then
    log "editable install failed or unusable; using PYTHONPATH=."
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  fi
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
LIMIT=260
if [ "$DEVICE" = "cpu" ]; then SIZE=(--tiny --threads 1); LIMIT=240; fi

# MNIST: the first directory holding the IDX files.
MNIST=""
for d in "${NEURONPRUNE_MNIST_DIR:-}" "$REPO/../shared/data/mnist" "$REPO/shared/data/mnist" \
         "$REPO/benchmarks/.cache/mnist"; do
  if [ -n "$d" ] && { [ -e "$d/train-images-idx3-ubyte" ] || [ -e "$d/train-images-idx3-ubyte.gz" ]; }; then
    MNIST="$d"; break
  fi
done
EPOCHS=()
if [ ! -e benchmarks/.cache/lenet5-e12-nall-s0.pt ] || [ ! -e benchmarks/.cache/lenet300100-e12-nall-s0.pt ]; then
  EPOCHS=(--epochs 2)
  log "trained models not in benchmarks/.cache: training 2 epochs here (curves differ from CPU run)"
fi

status=0
run() {  # run NAME TIMEOUT ARGS...: one bench_sweep.py call, its tables into gpu_check.md
  local name="$1" limit="$2"; shift 2
  log "step $name: bench_sweep.py $*"
  local t0=$SECONDS
  timeout "$limit" "$PY" benchmarks/bench_sweep.py --device "$DEVICE" "${SIZE[@]}" "$@" \
    --markdown "$MD" --section "gpu_check_$name" --json "$OUT_DIR/gpu_check_$name.json" \
    >>"$LOG" 2>&1
  local rc=$?
  log "step $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}

run qr_scale "$LIMIT" --parts qr scale
if [ -n "$MNIST" ]; then
  run mnist "$LIMIT" --parts mnist --data-dir "$MNIST" "${EPOCHS[@]}"
else
  log "step mnist skipped: no MNIST IDX files (set NEURONPRUNE_MNIST_DIR or copy them to benchmarks/.cache/mnist)"
fi

log "done in $((SECONDS - STARTED)) s, status $status; tables in $MD"
[ -e "$MD" ] && cat "$MD"
exit $status
