#!/bin/bash
# The launch line both sbatch scripts share: one srun task per GPU (or per CPU slot), each a DDP rank.
# distributed_utils.py reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and takes MASTER_ADDR from the
# first host of SLURM_JOB_NODELIST and MASTER_PORT from SLURM_JOB_ID, so no rendezvous flags are needed.
#
# Preemption: `#SBATCH --signal=B:USR1@120` sends USR1 to this shell 120 s (plus up to 30 s: slurmctld looks
# every 30 s) before the time limit. It is passed on to every rank through srun; the ranks agree on a step,
# checkpoint, and exit with 75. The job then requeues itself when it is requeueable (`#SBATCH --requeue`, or
# JobRequeue=1 in slurm.conf) and the next run resumes from that checkpoint, since output_dir is the same.
set -uo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm/train.sbatch CONFIG [key=value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
PY=${PYTHON:-.venv/bin/python}
EXIT_PREEMPTED=75  # engine/preemption.py
# One thread pool per rank sized to its CPUs, so ranks on one node do not oversubscribe the cores.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

echo "job ${SLURM_JOB_ID:-?} run $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST:-?}: $CONFIG $*"
# --kill-on-bad-exit: a rank that fails ends the whole step instead of leaving the others waiting in a collective.
srun --kill-on-bad-exit=1 "$PY" train.py --config "$CONFIG" "$@" &
SRUN=$!
signalled=""
forward() { signalled=$1; echo "$1 received: asking the ranks to checkpoint and stop"; kill -"$1" "$SRUN" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early whenever a trapped signal arrives, so wait until srun itself has ended.
while :; do
    wait "$SRUN"
    rc=$?
    kill -0 "$SRUN" 2>/dev/null || break
done

# A rank that exits 75 first makes srun (--kill-on-bad-exit) end the others, so srun may report their signal
# instead of 75: after a forwarded signal, any failure counts as a stop (the checkpoint was written first).
if [[ $rc == "$EXIT_PREEMPTED" || ( -n $signalled && $rc != 0 ) ]]; then
    if [[ -n ${SLURM_JOB_ID:-} ]] && scontrol show job "$SLURM_JOB_ID" | grep -q "Requeue=1"; then
        echo "stopped early (exit $rc): requeueing job $SLURM_JOB_ID to continue from the checkpoint"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
    fi
    echo "stopped early (exit $rc) and not requeued: submit the same command again to continue"
fi
exit "$rc"
