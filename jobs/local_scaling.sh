#!/usr/bin/env bash
# Strong and weak scaling of one K-FAC iteration on this machine: runs
# `python -m hpckfac.bench scaling` under mpiexec at each rank count, merges the
# results per mode (table + JSON + PNG), then calibrates the performance model on
# the strong-scaling runs. Every setting below can be overridden from the
# environment, e.g.  RANKS="1 2" SCALE=16 jobs/local_scaling.sh
set -euo pipefail

RANKS=${RANKS:-"1 2 4"}            # rank counts (one process each; more than the cores oversubscribe)
MODES=${MODES:-"strong weak"}       # strong: BATCH is global; weak: BATCH per rank
MODEL=${MODEL:-resnet50}            # resnet50 | small
if [[ "$MODEL" == resnet50 ]]; then
    SCALE=${SCALE:-8}               # channel divisor (ResNet-50's 4608x4608 inversions take ~1 s on a CPU core)
    IMAGE=${IMAGE:-64}              # input height/width (fewer positions per example than 224)
else
    SCALE=${SCALE:-1}               # the small model as it is
    IMAGE=${IMAGE:-8}
fi
BATCH=${BATCH:-4}
ASSIGNMENT=${ASSIGNMENT:-both}      # lpt | contiguous | both
REPEAT=${REPEAT:-5}                 # timed iterations; medians are reported
DEVICE=${DEVICE:-cpu}               # cpu, or cuda / auto: each rank's workload on its GPU
OUT=${OUT:-out/scaling}
PYTHON=${PYTHON:-python}
MPIEXEC=${MPIEXEC:-mpiexec}
DRY_RUN=${DRY_RUN:-0}               # 1: print the commands, run nothing
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one core per rank, like one GPU per rank
# mpiexec's flags (MPIEXEC_FLAGS, split on spaces); unset: --oversubscribe for Open MPI's mpiexec,
# which refuses more ranks than cores unless told, nothing for MPICH's, which runs them.
if [[ -z ${MPIEXEC_FLAGS+set} ]]; then
    MPIEXEC_FLAGS=""
    version=$("$MPIEXEC" --version 2>/dev/null || true)
    if [[ $version == *"Open MPI"* || $version == *OpenRTE* ]]; then MPIEXEC_FLAGS=--oversubscribe; fi
fi

run() {
    echo "+ $*"
    if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

if [[ "$DRY_RUN" != 1 ]]; then mkdir -p "$OUT"; fi
for mode in $MODES; do
    files=()
    for p in $RANKS; do
        run "$MPIEXEC" $MPIEXEC_FLAGS -n "$p" "$PYTHON" -m hpckfac.bench scaling --mode "$mode" --model "$MODEL" \
            --scale "$SCALE" --image "$IMAGE" --batch "$BATCH" --assignment "$ASSIGNMENT" \
            --repeat "$REPEAT" --device "$DEVICE" --json "$OUT/${mode}_${p}.json"
        files+=("$OUT/${mode}_${p}.json")
    done
    run "$PYTHON" -m hpckfac.bench scaling --combine "${files[@]}" --json "$OUT/${mode}.json" --png "$OUT/${mode}.png"
done
if [[ " $MODES " == *" strong "* ]]; then
    run "$PYTHON" -m hpckfac.bench model --calibrate "$OUT/strong.json" --json "$OUT/model.json" --png "$OUT/model.png"
fi
