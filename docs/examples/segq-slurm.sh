#!/bin/bash
# Evaluate with segq over a Slurm job array, then merge the shards in a dependent job.
#
# Submit from the directory that holds segq.toml:   mkdir -p logs && sbatch docs/examples/segq-slurm.sh
# Each array task evaluates one contiguous shard of the dataset. `--shard auto` takes the shard index from
# SLURM_ARRAY_TASK_ID and the number of shards from SEGQ_SHARD_COUNT (keep it equal to the size of --array), so
# that a rerun of one failed task still evaluates its own shard:
#
#   RESULTS=results/<first job id> sbatch --array=<task> docs/examples/segq-slurm.sh
#
# The rerun queues a new merge of all shards (cancel the first run's merge, which waits for a task that failed).
#
#SBATCH --job-name=segq-eval
#SBATCH --array=0-7
#SBATCH --cpus-per-task=8
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=logs/segq-eval-%A_%a.out

set -euo pipefail

# Shards 0..7 of 8: the task id is the shard index. Keep equal to --array=0-7 above.
export SEGQ_SHARD_COUNT="${SEGQ_SHARD_COUNT:-8}"
# Share one model and dataset cache between tasks (on a shared filesystem), so each file is downloaded once.
export HF_HOME="${HF_HOME:-$PWD/.cache/huggingface}"
export RAYON_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

SEGQ="${SEGQ:-segq}"
# A rerun passes the first run's folder (RESULTS=results/<first job id>): sbatch exports it to the tasks.
RESULTS="${RESULTS:-results/$SLURM_ARRAY_JOB_ID}"
# The shards log no W&B runs; the merge publishes one run per level: online when an API key is found, else
# offline for `wandb sync`. SEGQ_WANDB=online|offline|disabled forces a mode.
SEGQ_WANDB="${SEGQ_WANDB:-}"

# The first task of this array to start queues the merge; it runs once every task of this array has finished
# successfully, and merges every shard in $RESULTS (those of an earlier run included).
if [ "$SLURM_ARRAY_TASK_ID" = "${SLURM_ARRAY_TASK_MIN:-0}" ]; then
    mkdir -p logs
    sbatch --job-name=segq-merge --dependency="afterok:$SLURM_ARRAY_JOB_ID" \
        --cpus-per-task=1 --mem=2G --time=00:15:00 --output="logs/segq-merge-%j.out" \
        --wrap="$SEGQ merge $RESULTS/shard-*/results.json --out $RESULTS/merged ${SEGQ_WANDB:+--wandb $SEGQ_WANDB}"
fi

mkdir -p "$RESULTS"
srun "$SEGQ" eval --config segq.toml --shard auto --threads "$RAYON_NUM_THREADS" \
    --out "$RESULTS/shard-$SLURM_ARRAY_TASK_ID"
