#!/usr/bin/env bash
# Validate hpckfac on a GPU node in one bounded run: the GPU tests (every kernel
# against its CPU/float64 oracle, the device path of the pipeline), the 2-rank
# CUDA runs (collectives on CuPy buffers, P ranks == one process), `hpckfac train
# --device cuda` at 1 and 2 ranks beside the CPU run, the examples at 2 ranks on
# CUDA, the kernel, scaling (2 ranks on the GPU) and step benchmarks, and a profile
# of the ResNet-50 step (device kernels, host functions).
# Logs and JSON land in OUT; the last lines are a summary. Exits non-zero when any
# step failed or timed out, or when no CUDA device is visible.
#
#   bash jobs/gpu_validate.sh                   # OUT=out/gpu_validate
#   QUICK=1 bash jobs/gpu_validate.sh           # skip the slowest kernel-test sizes, one factor route, 10 steps
#
# Settings (environment): OUT, PYTHON, MPIEXEC, QUICK, STEP_STEPS (timed steps of
# the ResNet-50 step benchmark; the default 100 is one whole 10/100 period, so its
# mean is the amortised cost; 10 with QUICK=1), TRAIN_EPOCHS, ROUTES (factor routes
# the step benchmark compares; default "auto kernel gemm", "auto" with QUICK=1).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out/gpu_validate}
PYTHON=${PYTHON:-python3}
MPIEXEC=${MPIEXEC:-mpiexec}
QUICK=${QUICK:-0}
TRAIN_EPOCHS=${TRAIN_EPOCHS:-20}
# QUICK=1 must fit a short GPU allocation (~8 min on an H100): 100 steps cost ~35 s more than 10.
if [[ "$QUICK" == 1 ]]; then
    ROUTES=${ROUTES:-auto}; STEP_STEPS=${STEP_STEPS:-10}
else
    ROUTES=${ROUTES:-auto kernel gemm}; STEP_STEPS=${STEP_STEPS:-100}
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
export PYTHONUNBUFFERED=1

# step NAME TIMEOUT CMD...: run CMD with a timeout, log to OUT/NAME.log, one summary line.
step() {
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== $name: $*" > "$OUT/$name.log"
    timeout -k 10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    local word=OK
    [[ $rc -ne 0 ]] && word=FAIL && FAILED=$((FAILED + 1))
    [[ $rc -eq 124 || $rc -eq 137 ]] && word=TIMEOUT
    printf '%-8s %-28s rc=%-3s %4ss  %s\n' "$word" "$name" "$rc" "$((SECONDS - start))" \
        "$(grep -E 'passed|failed|error|accuracy' "$OUT/$name.log" | tail -1)" | tee -a "$SUMMARY"
}

step env 60 bash -c "set -e; nvidia-smi -L; $PYTHON -c 'import cupy, torch, mpi4py, numpy; print(\"cupy\", cupy.__version__, \"nvrtc\", cupy.cuda.nvrtc.getVersion(), \"torch\", torch.__version__, torch.version.cuda, \"mpi4py\", mpi4py.__version__, \"numpy\", numpy.__version__)'; $PYTHON -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])'; $PYTHON -c 'from hpckfac.ops import cuda_module as c; print(\"kernels\", c.kernel_dir()); print(\"include\", c.include_dirs())'; $PYTHON -c 'from hpckfac.comm.device import cuda_aware_mpi; print(\"cuda-aware MPI:\", cuda_aware_mpi())'"

FACTOR_FILTER=()
[[ "$QUICK" == 1 ]] && FACTOR_FILTER=(-k "not 4608 and not 30000")
step tests-kernels 240 "$PYTHON" -m pytest -q -rfE -p no:cacheprovider tests/test_gpu_pack.py tests/test_gpu_inverse.py \
    tests/test_gpu_comm.py tests/test_gpu_batchnorm.py tests/test_gpu_bench.py tests/test_kernel_loader.py tests/test_device_path.py
step tests-factors 240 "$PYTHON" -m pytest -q -rfE -p no:cacheprovider tests/test_gpu_factors.py "${FACTOR_FILTER[@]}"
step mpi2-collectives 120 "$MPIEXEC" -n 2 "$PYTHON" -m pytest --with-mpi -q -rfE -p no:cacheprovider \
    tests/mpi/test_comm_device.py
step mpi2-equivalence 180 "$MPIEXEC" -n 2 "$PYTHON" -m pytest --with-mpi -q -rfE -p no:cacheprovider \
    tests/mpi/test_pipeline_equivalence.py -k "device or kind or cuda"
step mpi2-first-order 120 "$MPIEXEC" -n 2 "$PYTHON" -m pytest --with-mpi -q -rfE -p no:cacheprovider \
    tests/mpi/test_first_order.py tests/mpi/test_grad_scaler.py -k cuda
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
echo "logs: $OUT" | tee -a "$SUMMARY"
if [[ $FAILED -ne 0 ]]; then
    echo "$FAILED step(s) failed" | tee -a "$SUMMARY"
    exit 1
fi
