#!/usr/bin/env bash
# K-FAC training on this machine under mpiexec: `hpckfac train` at each rank count
# in RANKS, one output directory per run. Override any setting from the environment,
# e.g.  RANKS=4 STEPS=200 jobs/local_train.sh  (extra arguments go to hpckfac train).
set -euo pipefail

RANKS=${RANKS:-"1 2 4"}
OPTIMIZER=${OPTIMIZER:-kfac}        # kfac | sgd | adam
BATCH=${BATCH:-256}                 # global batch size
STEPS=${STEPS:-100}
OUT=${OUT:-out/train}
PYTHON=${PYTHON:-python}
MPIEXEC=${MPIEXEC:-mpiexec}
DEVICE=${DEVICE:-auto}              # auto: one GPU per rank where CUDA is present, else CPU
DRY_RUN=${DRY_RUN:-0}               # 1: print the commands, run nothing
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# mpiexec's flags (MPIEXEC_FLAGS, split on spaces); unset: --oversubscribe for Open MPI's mpiexec,
# which refuses more ranks than cores unless told, nothing for MPICH's, which runs them.
if [[ -z ${MPIEXEC_FLAGS+set} ]]; then
    MPIEXEC_FLAGS=""
    version=$("$MPIEXEC" --version 2>/dev/null || true)
    if [[ $version == *"Open MPI"* || $version == *OpenRTE* ]]; then MPIEXEC_FLAGS=--oversubscribe; fi
fi

for p in $RANKS; do
    cmd=("$MPIEXEC" $MPIEXEC_FLAGS -n "$p" "$PYTHON" -m hpckfac train --optimizer "$OPTIMIZER" --batch-size "$BATCH"
         --steps "$STEPS" --device "$DEVICE" --out "$OUT/${OPTIMIZER}_${p}ranks" "$@")
    echo "+ ${cmd[*]}"
    if [[ "$DRY_RUN" != 1 ]]; then "${cmd[@]}"; fi
done
