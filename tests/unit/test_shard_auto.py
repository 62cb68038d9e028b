"""``--shard auto``: the shard I/N taken from a job runner's environment variables."""

from __future__ import annotations

import pytest

from ossfs.errors import UsageError
from ossfs.materialize import shard_from_environment


@pytest.mark.parametrize(
    ("env", "count", "shard"),
    [
        # Kubernetes Indexed Job: the index from Kubernetes, the count given.
        ({"JOB_COMPLETION_INDEX": "0"}, 4, (0, 4)),
        ({"JOB_COMPLETION_INDEX": "3", "OSSFS_SHARD_COUNT": "4"}, None, (3, 4)),
        # --shard-count wins over the variable.
        ({"JOB_COMPLETION_INDEX": "3", "OSSFS_SHARD_COUNT": "2"}, 4, (3, 4)),
        # Slurm: --array=0-15 (MIN not always set by older versions: 0 then).
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "16"}, None, (7, 16)),
        # --array=1-16: ids 1..16 are shards 0..15.
        (
            {
                "SLURM_ARRAY_TASK_ID": "1",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "16",
                "SLURM_ARRAY_TASK_COUNT": "16",
            },
            None,
            (0, 16),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "16",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "16",
                "SLURM_ARRAY_TASK_COUNT": "16",
            },
            None,
            (15, 16),
        ),
        # --array=10-40:10: ids 10, 20, 30, 40.
        (
            {
                "SLURM_ARRAY_TASK_ID": "30",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_STEP": "10",
                "SLURM_ARRAY_TASK_MAX": "40",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            None,
            (2, 4),
        ),
        # torchrun.
        ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, None, (5, 8)),
        # Two runners that agree (torchrun in an Indexed Job), and a count that matches.
        ({"RANK": "2", "WORLD_SIZE": "4", "JOB_COMPLETION_INDEX": "2"}, 4, (2, 4)),
        ({"RANK": "2", "WORLD_SIZE": "4", "OSSFS_SHARD_COUNT": "4"}, None, (2, 4)),
    ],
)
def test_runner_shards(env: dict[str, str], count: int | None, shard: tuple[int, int]) -> None:
    found, why = shard_from_environment(env, count)
    assert found == shard
    assert why


@pytest.mark.parametrize(
    ("env", "count", "says"),
    [
        ({}, None, "found no job runner"),
        ({"PATH": "/bin", "SLURM_JOB_ID": "12"}, None, "found no job runner"),
        ({"JOB_COMPLETION_INDEX": "1"}, None, "OSSFS_SHARD_COUNT"),
        ({"JOB_COMPLETION_INDEX": "4"}, 4, "JOB_COMPLETION_INDEX=4 is not below --shard-count=4"),
        ({"JOB_COMPLETION_INDEX": "-1"}, 4, "JOB_COMPLETION_INDEX=-1 must be at least 0"),
        (
            {"JOB_COMPLETION_INDEX": "1", "OSSFS_SHARD_COUNT": "0"},
            None,
            "OSSFS_SHARD_COUNT=0 must be at least 1",
        ),
        (
            {"JOB_COMPLETION_INDEX": "1", "OSSFS_SHARD_COUNT": "many"},
            None,
            "OSSFS_SHARD_COUNT='many' is not a whole number",
        ),
        ({"SLURM_ARRAY_TASK_ID": "3"}, None, "SLURM_ARRAY_TASK_COUNT is not"),
        # --array=1-4 read as if it started at 0: id 4 would be shard 4 of 4.
        (
            {
                "SLURM_ARRAY_TASK_ID": "0",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            None,
            "SLURM_ARRAY_TASK_ID=0 is not one of",
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            None,
            "SLURM_ARRAY_TASK_ID=5 is not one of",
        ),
        # --array=1,3,7: not evenly spaced, so the ids cannot be turned into shards.
        (
            {
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "7",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            None,
            "SLURM_ARRAY_TASK_MAX=7",
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            None,
            "step 2",
        ),
        ({"RANK": "0"}, None, "RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, None, "WORLD_SIZE is set but RANK is not"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, None, "RANK=2 is not below WORLD_SIZE=2"),
        (
            {
                "RANK": "1",
                "WORLD_SIZE": "4",
                "SLURM_ARRAY_TASK_ID": "2",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            None,
            "disagree",
        ),
        ({"RANK": "1", "WORLD_SIZE": "4"}, 3, "--shard-count=3 does not match the 4 shards"),
        (
            {"RANK": "1", "WORLD_SIZE": "4", "OSSFS_SHARD_COUNT": "8"},
            None,
            "OSSFS_SHARD_COUNT=8 does not match",
        ),
        # A value that would reach a terminal is escaped.
        ({"RANK": "1\x1b[2J", "WORLD_SIZE": "4"}, None, "\\x1b"),
    ],
)
def test_runner_errors(env: dict[str, str], count: int | None, says: str) -> None:
    with pytest.raises(UsageError) as info:
        shard_from_environment(env, count)
    message = str(info.value)
    assert says in message
    assert message.startswith("--shard auto")
    assert "\n" not in message and "\x1b" not in message
