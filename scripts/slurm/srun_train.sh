#!/bin/bash
# The launch line both sbatch scripts share: one srun task per GPU (or per CPU slot), each a DDP rank.
# distributed_utils.py reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and takes MASTER_ADDR from the
# first host of SLURM_JOB_NODELIST and MASTER_PORT from SLURM_JOB_ID, so no rendezvous flags are needed.
set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm/train.sbatch CONFIG [key=value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-.}"
PY=${PYTHON:-.venv/bin/python}
# One thread pool per rank sized to its CPUs, so ranks on one node do not oversubscribe the cores.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# --kill-on-bad-exit: a rank that fails ends the whole step instead of leaving the others waiting in a collective.
exec srun --kill-on-bad-exit=1 "$PY" train.py --config "$CONFIG" "$@"
