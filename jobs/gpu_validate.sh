#!/usr/bin/env bash
# Validate hpckfac on a GPU node in one bounded run: the GPU tests (every kernel
# against its CPU/float64 oracle, the device path of the pipeline), the 2-rank
# CUDA runs (collectives on CuPy buffers, P ranks == one process), `hpckfac train
# --device cuda` at 1 and 2 ranks beside the CPU run, the examples at 2 ranks on
# CUDA, the kernel, scaling (2 ranks on the GPU) and step benchmarks, and a profile
# of the ResNet-50 step (device kernels, host functions).
# Logs and JSON land in OUT, packed at the end (also when interrupted) into
# OUT/gpu_validate.tar.gz; the last lines are a summary. Without a CUDA device that
# torch and CuPy can use it stops at once with status 2, saying why. Otherwise it exits
# non-zero when any step failed, timed out, was skipped, or ran pytest without a
# test passing (every test skipped: nothing was validated).
#
#   bash jobs/gpu_validate.sh                   # OUT=out/gpu_validate
#   QUICK=1 bash jobs/gpu_validate.sh           # skip the slowest kernel-test sizes, one factor route, 10 steps
#
# Settings (environment): OUT, PYTHON, MPIEXEC (missing: the MPI steps are skipped),
# QUICK, STEP_STEPS (timed steps of the ResNet-50 step benchmark; the default 100 is one
# whole 10/100 period, so its mean is the amortised cost; 10 with QUICK=1), TRAIN_EPOCHS,
# ROUTES (factor routes the step benchmark compares; default "auto kernel gemm", "auto"
# with QUICK=1), BUDGET (seconds for the whole run, 0: none; default 540 with QUICK=1:
# each step's timeout is cut to what is left, and the steps that no longer fit are skipped).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out/gpu_validate}
PYTHON=${PYTHON:-python3}
MPIEXEC=${MPIEXEC:-mpiexec}
QUICK=${QUICK:-0}
TRAIN_EPOCHS=${TRAIN_EPOCHS:-20}
# QUICK=1 must fit a short GPU allocation (~8 min on an H100): 100 steps cost ~35 s more than 10.
if [[ "$QUICK" == 1 ]]; then
    ROUTES=${ROUTES:-auto}; STEP_STEPS=${STEP_STEPS:-10}; BUDGET=${BUDGET:-540}
else
    ROUTES=${ROUTES:-auto kernel gemm}; STEP_STEPS=${STEP_STEPS:-100}; BUDGET=${BUDGET:-0}
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
ARCHIVE=gpu_validate.tar.gz
: > "$SUMMARY"
FAILED=0
STEP_PID= STEP_NAME=
export PYTHONUNBUFFERED=1

# The entries of OUT by name, not OUT itself: the archive being written changes the directory,
# and tar, reading ".", would fail with "file changed as we read it" (about one call in three).
pack() {
    find "$OUT" -mindepth 1 -maxdepth 1 ! -name "$ARCHIVE" ! -name "$ARCHIVE.tmp" -printf '%f\0' \
        | tar -czf "$OUT/$ARCHIVE.tmp" -C "$OUT" --null -T - 2>/dev/null \
        && mv -f "$OUT/$ARCHIVE.tmp" "$OUT/$ARCHIVE"
}
# Interrupted (the allocation's end, Ctrl-C): end the running step, keep what was logged.
interrupted() {
    [[ -n "$STEP_PID" ]] && kill -TERM "$STEP_PID" 2>/dev/null && wait "$STEP_PID"
    echo "interrupted by SIG$1${STEP_NAME:+ during $STEP_NAME}" | tee -a "$SUMMARY"
    pack
    exit "$2"
}
trap 'interrupted TERM 143' TERM
trap 'interrupted INT 130' INT
trap 'interrupted HUP 129' HUP

line() {  # WORD NAME RC SECONDS DETAIL: one summary line
    printf '%-8s %-40s rc=%-3s %4ss  %s\n' "$@" | tee -a "$SUMMARY"
}
skip() {  # NAME REASON
    FAILED=$((FAILED + 1))
    echo "=== $1: skipped: $2" > "$OUT/$1.log"
    line SKIP "$1" - 0 "$2"
}

# step NAME TIMEOUT CMD...: run CMD with a timeout (cut to what is left of BUDGET), log to
# OUT/NAME.log, one summary line.
step() {
    local name=$1 limit=$2; shift 2
    if ((BUDGET > 0)); then
        local left=$((BUDGET - SECONDS - 10))  # 10: timeout's grace before SIGKILL
        if ((left < 10)); then skip "$name" "BUDGET=$BUDGET s spent"; return; fi
        ((limit > left)) && limit=$left
    fi
    if [[ $1 == "$MPIEXEC" ]] && ! command -v "$MPIEXEC" > /dev/null; then
        skip "$name" "no $MPIEXEC"; return
    fi
    local start=$SECONDS
    echo "=== $name: $*" > "$OUT/$name.log"
    # In the background, so that a signal to this script is handled at once, not after the step.
    timeout -k 10 "$limit" "$@" >> "$OUT/$name.log" 2>&1 &
    STEP_PID=$! STEP_NAME=$name
    wait "$STEP_PID"
    local rc=$?
    STEP_PID= STEP_NAME=
    local word=OK
    local detail
    detail=$(grep -E 'passed|failed|error|skipped|accuracy' "$OUT/$name.log" | tail -1)
    [[ -z "$detail" ]] && detail=$(grep -v '^[[:space:]]*$' "$OUT/$name.log" | tail -1 | cut -c1-160)
    if [[ $rc -eq 0 && " $* " == *" pytest "* ]] && ! grep -qE '[0-9]+ passed' "$OUT/$name.log"; then
        rc=5; detail="no test passed: $detail"  # every test skipped: nothing validated
    fi
    [[ $rc -ne 0 ]] && word=FAIL && FAILED=$((FAILED + 1))
    [[ $rc -eq 124 || $rc -eq 137 ]] && word=TIMEOUT
    line "$word" "$name" "$rc" "$((SECONDS - start))" "$detail"
}

# Without a GPU that torch and CuPy both see, nothing below validates anything: stop now.
if ! preflight=$(timeout -k 5 60 "$PYTHON" - 2>&1 <<'PY'
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"torch cannot be imported ({exc})")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (CPU build, driver or CUDA_VISIBLE_DEVICES)")
try:
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # noqa: BLE001  (ImportError, or CUDARuntimeError without a driver)
    sys.exit(f"CuPy cannot use the GPU ({type(exc).__name__}: {exc}); pip install -e '.[cuda12]' or '.[cuda13]'")
print(f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}; CuPy {cupy.__version__} sees {count}")
PY
); then
    echo "=== preflight: $PYTHON" > "$OUT/preflight.log"
    echo "$preflight" >> "$OUT/preflight.log"
    line FAIL preflight - "$SECONDS" "$(tail -1 <<< "${preflight:-no answer in 60 s}")"
    echo "gpu_validate: nothing to validate here; logs: $OUT/$ARCHIVE" | tee -a "$SUMMARY"
    pack
    exit 2
fi
echo "preflight: $preflight" | tee -a "$SUMMARY"

step env 60 bash -c "set -e; nvidia-smi -L || true; \"\$0\" -c 'import cupy, torch, mpi4py, numpy; print(\"cupy\", cupy.__version__, \"nvrtc\", cupy.cuda.nvrtc.getVersion(), \"torch\", torch.__version__, torch.version.cuda, \"mpi4py\", mpi4py.__version__, \"numpy\", numpy.__version__)'; \"\$0\" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])'; \"\$0\" -c 'from hpckfac.ops import cuda_module as c; print(\"kernels\", c.kernel_dir()); print(\"include\", c.include_dirs())'; \"\$0\" -c 'from hpckfac.comm.device import cuda_aware_mpi; print(\"cuda-aware MPI:\", cuda_aware_mpi())'" "$PYTHON"

FACTOR_FILTER=()
[[ "$QUICK" == 1 ]] && FACTOR_FILTER=(-k "not 4608 and not 30000")
step tests-kernels 240 "$PYTHON" -m pytest -q -rfE -p no:cacheprovider tests/test_gpu_pack.py tests/test_gpu_inverse.py \
    tests/test_gpu_comm.py tests/test_gpu_batchnorm.py tests/test_gpu_bench.py tests/test_kernel_loader.py tests/test_kernels_nvrtc.py tests/test_device_path.py \
    tests/test_ops_inverse.py
step tests-factors 240 "$PYTHON" -m pytest -q -rfE -p no:cacheprovider tests/test_gpu_factors.py "${FACTOR_FILTER[@]}"
step mpi2-collectives 120 "$MPIEXEC" -n 2 "$PYTHON" -m pytest --with-mpi -q -rfE -p no:cacheprovider \
    tests/mpi/test_comm_device.py
step mpi2-equivalence 180 "$MPIEXEC" -n 2 "$PYTHON" -m pytest --with-mpi -q -rfE -p no:cacheprovider \
    tests/mpi/test_pipeline_equivalence.py -k "device or kind or cuda"
step mpi2-first-order 120 "$MPIEXEC" -n 2 "$PYTHON" -m pytest --with-mpi -q -rfE -p no:cacheprovider \
    tests/mpi/test_first_order.py tests/mpi/test_grad_scaler.py tests/mpi/test_batchnorm_sync.py -k cuda
for run in "cpu 1" "cuda 1" "cuda 2"; do
    set -- $run
    step "train-$1-$2rank" 150 "$MPIEXEC" -n "$2" "$PYTHON" -m hpckfac train --optimizer kfac --batch-size 256 \
        --epochs "$TRAIN_EPOCHS" --device "$1" --no-progress --out "$OUT/train_$1_$2"
done
step example-cnn-cuda-2rank 90 "$MPIEXEC" -n 2 "$PYTHON" examples/cnn_batchnorm.py --device cuda \
    --out "$OUT/example_cnn"
for example in transformer_tokens accumulate_and_resume; do
    step "example-$example-cuda-2rank" 90 "$MPIEXEC" -n 2 "$PYTHON" "examples/$example.py" --device cuda
done
step bench-kernels 150 "$PYTHON" -m hpckfac.bench kernels --repeat 10 --json "$OUT/kernels.json"
step bench-scaling-cuda-2rank 120 "$MPIEXEC" -n 2 "$PYTHON" -m hpckfac.bench scaling --device cuda --mode weak \
    --scale 2 --image 112 --batch 8 --assignment lpt --repeat 3 --json "$OUT/scaling_cuda_2.json"
for route in $ROUTES; do
    step "bench-step-resnet50-$route" 120 env HPCKFAC_FACTOR_ROUTE=$route "$PYTHON" -m hpckfac.bench step \
        --device cuda --model resnet50 --batch 32 --steps "$STEP_STEPS" --json "$OUT/step_resnet50_$route.json"
done
step bench-step-stages 100 "$PYTHON" -m hpckfac.bench step --device cuda --model resnet50 --batch 32 \
    --steps 10 --configs kfac_1_10 --stage-sync --json "$OUT/step_resnet50_stages.json"
step bench-step-profile 150 "$PYTHON" -m hpckfac.bench step --device cuda --model resnet50 --batch 32 \
    --steps 2 --configs kfac_1_10,kfac_10_100 --profile "$OUT/profile_resnet50.txt"
echo "logs: $OUT/$ARCHIVE" | tee -a "$SUMMARY"
if [[ $FAILED -ne 0 ]]; then
    echo "$FAILED step(s) failed or skipped" | tee -a "$SUMMARY"
fi
pack
[[ $FAILED -eq 0 ]]
