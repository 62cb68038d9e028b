#!/bin/bash
# Slurm array: task I of 16 takes shard I (`--shard auto` reads
# SLURM_ARRAY_TASK_ID, counted from SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT).
#SBATCH --job-name=materialize
#SBATCH --array=1-16
#SBATCH --cpus-per-task=4
ossfs materialize oss://my-bucket/datasets/ --to /scratch/datasets --shard auto \
    --config /etc/ossfs.toml --profile prod --cache-dir /scratch/ossfs-cache
