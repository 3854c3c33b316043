#!/usr/bin/env bash
# Merge CONFIG into OUT on a Slurm cluster: one array task per output shard, then a
# finalize job that runs only if every shard task succeeded. Run it on a login node whose
# paths (inputs, OUT, this venv) are the compute nodes' paths too (a shared file system).
#
#   tools/slurm_merge.sh CONFIG OUT [sbatch options for every job, e.g. --partition=cpu]
#
# Environment: MAX_MEMORY per shard task (default 8GiB; ask Slurm for ~2x that with
# --mem), THREADS per task (default 8, ask with --cpus-per-task), SHARD_SIZE of the output
# (default 5GB), STREAMMERGE (the command, default "streammerge"). Slurm does not retry a
# failed array task; rerun this script: shards whose done-marker matches the plan return at
# once, and the attempt count (3 per shard) starts afresh.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG OUT [sbatch options]" >&2
  exit 2
fi
config=$1 out=$2
shift 2
sm=${STREAMMERGE:-streammerge}
mem=${MAX_MEMORY:-8GiB}
threads=${THREADS:-8}
plan="$out.plan.json"

$sm plan "$config" "$out" --save-plan "$plan" --max-memory "$mem" --shard-size "${SHARD_SIZE:-5GB}"
n=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["shards"]))' "$plan")

array=$(sbatch --parsable --job-name=sm-shard --array="0-$((n - 1))" "$@" \
  --wrap "$sm run-shard '$plan' --shard \$SLURM_ARRAY_TASK_ID --threads $threads --max-memory $mem")
final=$(sbatch --parsable --job-name=sm-finalize --dependency="afterok:${array%%;*}" "$@" \
  --wrap "$sm finalize '$plan'")
echo "plan $plan: $n shard task(s) in array job $array; finalize is job $final"
