#!/bin/bash
# Evaluate with segq over a Slurm job array, then merge the shards in a dependent job.
#
# Submit from the directory that holds segq.toml:   sbatch docs/examples/segq-slurm.sh
# Each array task evaluates one contiguous shard of the dataset; `--shard auto` reads the task's index and the
# array's size from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_MIN / SLURM_ARRAY_TASK_COUNT.
#
#SBATCH --job-name=segq-eval
#SBATCH --array=0-7
#SBATCH --cpus-per-task=8
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=logs/segq-eval-%A_%a.out

set -euo pipefail

# Share one model and dataset cache between tasks (on a shared filesystem), so each file is downloaded once.
export HF_HOME="${HF_HOME:-$PWD/.cache/huggingface}"
export RAYON_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

SEGQ="${SEGQ:-segq}"
RESULTS="${RESULTS:-results/$SLURM_ARRAY_JOB_ID}"
# The shards log no W&B runs; the merge publishes one run per level: online when an API key is found, else
# offline for `wandb sync`. SEGQ_WANDB=online|offline|disabled forces a mode.
SEGQ_WANDB="${SEGQ_WANDB:-}"

# The first task to start queues the merge; it runs once every array task has finished successfully.
if [ "$SLURM_ARRAY_TASK_ID" = "${SLURM_ARRAY_TASK_MIN:-0}" ]; then
    sbatch --job-name=segq-merge --dependency="afterok:$SLURM_ARRAY_JOB_ID" \
        --cpus-per-task=1 --mem=2G --time=00:15:00 --output="logs/segq-merge-%j.out" \
        --wrap="$SEGQ merge $RESULTS/shard-*/results.json --out $RESULTS/merged ${SEGQ_WANDB:+--wandb $SEGQ_WANDB}"
fi

mkdir -p "$RESULTS"
srun "$SEGQ" eval --config segq.toml --shard auto --threads "$RAYON_NUM_THREADS" \
    --out "$RESULTS/shard-$SLURM_ARRAY_TASK_ID"
