"""``ossfs materialize`` against the OSS test server, with the cache and ``--to`` in tmp_path.

What this proves:

- A prefix (or a single object) is fetched into the cache once, part by part,
  and ``--to DIR`` writes byte-identical files at the keys' paths relative
  to the prefix, with the objects' mtimes, and nothing else.
- The cache is the checkpoint: a rerun fetches nothing, a deleted output
  file is restored from the cache, and after SIGKILL a rerun fetches only the
  parts the cache does not hold; no output file is ever left half written.
- ``--shard I/N`` splits the objects into disjoint shards whose union is
  everything, the same way on every run.
- Keys that cannot be safe paths under DIR are skipped with a message, and
  nothing is written outside DIR.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ossfs.cache.cachedir import CacheDir, CachedObjectInfo
from ossfs.materialize import RUN_BYTES, consecutive_runs
from ossfs.testing import Fault, OssTestServer
from tests.helpers import OSSFS, disk_bytes, run_ossfs, summary_line
from tests.integration.conftest import settled_stats

KiB = 1024
MiB = 1024 * KiB
PART = 100 * KiB
BUCKET = "bkt"


def randbytes(size: int, seed: int) -> bytes:
    """Reproducible incompressible bytes."""
    return random.Random(seed).randbytes(size)


DATASET: dict[str, bytes] = {
    "ds/a.txt": b"alpha\n",
    "ds/empty": b"",
    "ds/sub/big.bin": randbytes(7 * PART + 123, seed=1),
    "ds/sub/deeper/c.bin": randbytes(PART + 1, seed=2),
    "ds/caf\u00e9 name+plus%.txt": b"unicode name\n",
}
# Near the prefix but not under it.
OUTSIDE: dict[str, bytes] = {
    "dsx/y.txt": b"sibling prefix\n",
    "other/x.txt": b"elsewhere\n",
    "ds": b"an object named like the prefix\n",
}


def parts_of(size: int) -> int:
    """How many 100 KiB parts an object of *size* bytes has."""
    return -(-size // PART)


# Consecutive missing parts are fetched by one GET of up to RUN_BYTES.
RUN_PARTS = RUN_BYTES // PART


def get_starts(size: int) -> list[int]:
    """Where the GETs of a cold run over an object of *size* bytes start."""
    return [i * PART for i in range(0, parts_of(size), RUN_PARTS)]


def materialize(
    server: OssTestServer, env: dict[str, str], target: str, cache: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``ossfs materialize TARGET`` against *server* with the cache *cache*."""
    return run_ossfs(
        "materialize",
        target,
        "--cache-dir",
        str(cache),
        "--part-size",
        "100KiB",
        "--endpoint",
        server.url,
        *args,
        env=env,
    )


def files_under(directory: Path) -> dict[str, bytes]:
    """Relative path -> content of every file below *directory*."""
    found: dict[str, bytes] = {}
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = Path(root) / name
            found[path.relative_to(directory).as_posix()] = path.read_bytes()
    return found


def gets(server: OssTestServer) -> int:
    """Object GETs the server has answered (and finished answering)."""
    return len(settled_stats(server).gets)


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    """The summary line of a successful run."""
    return summary_line(result, "materialized ")


def cached_info(cache: Path) -> dict[str, CachedObjectInfo]:
    """Key -> what the cache holds of it (read after the writer is gone)."""
    cd = CacheDir(str(cache), max_bytes=1 << 40)
    try:
        return {info.key: info for info in cd.objects()}
    finally:
        cd.close()


def cached_bytes(cache: Path) -> dict[str, int]:
    return {key: info.cached_bytes for key, info in cached_info(cache).items()}


def cached_parts(cache: Path) -> dict[str, int]:
    return {key: info.parts_present for key, info in cached_info(cache).items()}


@pytest.fixture
def srv(oss_server: OssTestServer) -> OssTestServer:
    """The OSS test server holding the dataset and its neighbours."""
    for key, data in {**DATASET, **OUTSIDE}.items():
        oss_server.put(BUCKET, key, data, mtime=1_650_000_000)
    return oss_server


# ---------------------------------------------------------------------- prefix and --to


def test_prefix_to_dir(srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path) -> None:
    cache, to = tmp_path / "cache", tmp_path / "to"
    to.mkdir()
    line = succeeded(
        materialize(srv, oss_env, f"oss://{BUCKET}/ds/", cache, "--to", str(to), "--threads", "4")
    )
    expected = {k.removeprefix("ds/"): v for k, v in DATASET.items()}
    assert files_under(to) == expected
    for rel in expected:
        assert os.stat(to / rel).st_mtime == 1_650_000_000
    assert f"materialized {len(DATASET)} object(s)" in line
    # Each byte once, by one GET per run of parts; nothing outside the prefix.
    stats = settled_stats(srv)
    assert set(stats.gets_by_key) == {k for k, v in DATASET.items() if v}
    for key, records in stats.gets_by_key.items():
        assert sorted(r.req_start or 0 for r in records) == get_starts(len(DATASET[key]))
    assert stats.bytes_sent == sum(len(v) for v in DATASET.values())

    # A rerun fetches nothing and leaves the files as they are.
    before = gets(srv)
    stamps = {rel: os.stat(to / rel).st_mtime_ns for rel in expected}
    succeeded(materialize(srv, oss_env, f"oss://{BUCKET}/ds/", cache, "--to", str(to)))
    assert gets(srv) == before
    assert files_under(to) == expected
    assert {rel: os.stat(to / rel).st_mtime_ns for rel in expected} == stamps

    # A lost output file comes back from the cache, still without a GET.
    (to / "sub" / "big.bin").unlink()
    succeeded(materialize(srv, oss_env, f"oss://{BUCKET}/ds/", cache, "--to", str(to)))
    assert gets(srv) == before
    assert files_under(to) == expected


def test_cache_first_then_to_dir(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    cache, to = tmp_path / "cache", tmp_path / "to"
    succeeded(materialize(srv, oss_env, f"oss://{BUCKET}/ds/", cache))
    assert gets(srv) == sum(len(get_starts(len(v))) for v in DATASET.values())
    assert cached_parts(cache) == {k: parts_of(len(v)) for k, v in DATASET.items()}
    before = gets(srv)
    to.mkdir()
    succeeded(materialize(srv, oss_env, f"oss://{BUCKET}/ds/", cache, "--to", str(to)))
    assert gets(srv) == before
    assert files_under(to) == {k.removeprefix("ds/"): v for k, v in DATASET.items()}


def test_to_dir_checks_the_parts_an_earlier_run_cached(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    """A cached part whose bytes did not survive (a crash after the index was written,
    a damaged disk) is copied out by no --to run: each part an earlier run cached is
    checked against its CRC-64 first, and fetched again when it fails."""
    cache, to = tmp_path / "cache", tmp_path / "to"
    succeeded(materialize(srv, oss_env, f"oss://{BUCKET}/ds/sub/big.bin", cache))
    data_files = [p for p in (cache / "objects").rglob("data") if p.stat().st_size > 0]
    assert len(data_files) == 1
    with open(data_files[0], "r+b") as f:
        f.seek(150 * 1024)  # inside the second 100 KiB part
        f.write(b"\0" * 1000)
    before = gets(srv)
    to.mkdir()
    succeeded(materialize(srv, oss_env, f"oss://{BUCKET}/ds/sub/big.bin", cache, "--to", str(to)))
    assert (to / "big.bin").read_bytes() == DATASET["ds/sub/big.bin"]
    assert gets(srv) == before + 1  # that part alone, fetched again


def test_to_dir_temp_files_never_take_a_name_of_the_output(
    oss_server: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    """A key named as a temp file of another key used to be ("foo.ossfs-tmp"): its
    output, written first (it is small), was taken over and renamed into "foo" when
    "foo" was written out. Nothing is left beside the outputs either."""
    objects = {"t/foo": randbytes(20 * PART, seed=21), "t/foo.ossfs-tmp": b"small one"}
    for key, data in objects.items():
        oss_server.put(BUCKET, key, data)
    cache, to = tmp_path / "cache", tmp_path / "to"
    to.mkdir()
    succeeded(
        materialize(
            oss_server, oss_env, f"oss://{BUCKET}/t/", cache, "--to", str(to), "--threads", "4"
        )
    )
    assert files_under(to) == {k.removeprefix("t/"): v for k, v in objects.items()}


def test_single_object(srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path) -> None:
    cache, to = tmp_path / "cache", tmp_path / "to"
    to.mkdir()
    line = succeeded(
        materialize(srv, oss_env, f"oss://{BUCKET}/ds/sub/big.bin", cache, "--to", str(to))
    )
    assert "materialized 1 object(s)" in line
    assert files_under(to) == {"big.bin": DATASET["ds/sub/big.bin"]}
    assert set(settled_stats(srv).gets_by_key) == {"ds/sub/big.bin"}


def test_nothing_to_materialize(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    result = materialize(srv, oss_env, f"oss://{BUCKET}/no/such/prefix/", tmp_path / "cache")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "ossfs: error:" in result.stderr


def test_to_dir_is_created(srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "missing" / "deeper"
    result = materialize(srv, oss_env, f"oss://{BUCKET}/ds/", tmp_path / "cache", "--to", str(out))
    succeeded(result)
    assert files_under(out) == {k[len("ds/") :]: v for k, v in DATASET.items()}


# ---------------------------------------------------------------------- kill -9


def test_resume_after_kill_9(
    oss_server: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    objects = {f"big/obj-{i}.bin": randbytes(2 * MiB + i, seed=10 + i) for i in range(3)}
    for key, data in objects.items():
        oss_server.put(BUCKET, key, data)
    cache, to = tmp_path / "cache", tmp_path / "to"
    to.mkdir()
    oss_server.faults.bandwidth = 512 * KiB
    proc = subprocess.Popen(
        [
            *OSSFS,
            "materialize",
            f"oss://{BUCKET}/big/",
            "--cache-dir",
            str(cache),
            "--part-size",
            "100KiB",
            "--threads",
            "4",
            "--to",
            str(to),
            "--endpoint",
            oss_server.url,
        ],
        env=oss_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        # (Not the server's count: it counts a GET's bytes when the GET ends.)
        while disk_bytes(cache) < 1 * MiB and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    # No output file is ever half written under its final name.
    for rel, content in files_under(to).items():
        if not rel.endswith(".ossfs-tmp"):
            assert content == objects["big/" + rel]
    held = cached_bytes(cache)
    missing = sum(len(v) for v in objects.values()) - sum(held.values())
    assert sum(held.values()) > 0 and missing > 0
    oss_server.faults.bandwidth = None
    before = settled_stats(oss_server).bytes_sent  # after the killed run's answers ended
    line = succeeded(
        materialize(
            oss_server, oss_env, f"oss://{BUCKET}/big/", cache, "--to", str(to), "--threads", "4"
        )
    )
    # The parts the killed run had committed are not fetched again.
    assert settled_stats(oss_server).bytes_sent - before == missing
    assert "already cached" in line
    assert files_under(to) == {k.removeprefix("big/"): v for k, v in objects.items()}


def test_ctrl_c_exits_130_and_says_how_to_go_on(
    oss_server: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    oss_server.put(BUCKET, "big/obj.bin", randbytes(2 * MiB, seed=20))
    oss_server.faults.bandwidth = 256 * KiB
    proc = subprocess.Popen(
        [
            *OSSFS,
            "materialize",
            f"oss://{BUCKET}/big/",
            "--cache-dir",
            str(tmp_path / "c"),
            "--part-size",
            "100KiB",
            "--threads",
            "2",
            "--endpoint",
            oss_server.url,
        ],
        env=oss_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        # The server counts a GET's bytes when it ends, and one GET fetches the whole
        # object: wait for its first bytes in the cache instead.
        while disk_bytes(tmp_path / "c") < 100 * KiB and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "ossfs: interrupted\nossfs: run the same command again to continue" in err


def test_object_replaced_mid_run(
    oss_server: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    """The changed object is started over in its new version (never mixed), as
    download does; the others complete."""
    # More than one GET's run of parts: a GET follows the one the object is replaced in.
    old, new = randbytes(RUN_PARTS * PART + 10 * PART, seed=20), randbytes(9 * PART + 5, seed=21)
    oss_server.put(BUCKET, "mat/changing.bin", old)
    oss_server.put(BUCKET, "mat/steady.txt", b"steady\n")
    oss_server.faults.add(
        Fault("replace", op="get", key="mat/changing.bin", after_bytes=100, data=new)
    )
    cache, to = tmp_path / "cache", tmp_path / "to"
    # One connection: the second GET is surely sent after the replace.
    result = materialize(
        oss_server, oss_env, f"oss://{BUCKET}/mat/", cache, "--to", str(to), "--threads", "1"
    )
    succeeded(result)
    assert f"oss://{BUCKET}/mat/changing.bin changed while it was fetched" in result.stderr
    assert files_under(to) == {"steady.txt": b"steady\n", "changing.bin": new}


def test_object_that_keeps_changing_fails_alone(
    oss_server: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    size = RUN_PARTS * PART + 10 * PART  # more than one GET's run of parts
    oss_server.put(BUCKET, "mat/changing.bin", randbytes(size, seed=22))
    oss_server.put(BUCKET, "mat/steady.txt", b"steady\n")
    for i in range(5):
        oss_server.faults.add(
            Fault(
                "replace",
                op="get",
                key="mat/changing.bin",
                after_bytes=100,
                data=randbytes(size, seed=30 + i),
            )
        )
    cache, to = tmp_path / "cache", tmp_path / "to"
    result = materialize(
        oss_server, oss_env, f"oss://{BUCKET}/mat/", cache, "--to", str(to), "--threads", "1"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    failed = [x for x in result.stderr.splitlines() if x.startswith("ossfs: failed:")]
    assert len(failed) == 1 and "mat/changing.bin: it kept changing" in failed[0], failed
    assert "PreconditionFailed" in failed[0]
    assert "materialized 1 of 2 object(s) (1 failed)" in result.stderr
    assert files_under(to) == {"steady.txt": b"steady\n"}


def test_two_concurrent_runs_share_the_cache(
    oss_server: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    """Two runs on one cache at once: every byte is fetched once, by one of them."""
    objects = {f"pair/obj-{i}.bin": randbytes(MiB + i, seed=30 + i) for i in range(3)}
    for key, data in objects.items():
        oss_server.put(BUCKET, key, data)
    cache = tmp_path / "cache"
    oss_server.faults.bandwidth = 1 * MiB
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(2):
            to = tmp_path / f"to-{i}"
            to.mkdir()
            procs.append(
                subprocess.Popen(
                    [
                        *OSSFS,
                        "materialize",
                        f"oss://{BUCKET}/pair/",
                        "--cache-dir",
                        str(cache),
                        "--part-size",
                        "100KiB",
                        "--threads",
                        "4",
                        "--to",
                        str(to),
                        "--endpoint",
                        oss_server.url,
                    ],
                    env=oss_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outcomes = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)
    for p, (_, stderr) in zip(procs, outcomes, strict=True):
        assert p.returncode == 0, stderr
    expected = {k.removeprefix("pair/"): v for k, v in objects.items()}
    assert files_under(tmp_path / "to-0") == expected
    assert files_under(tmp_path / "to-1") == expected
    assert settled_stats(oss_server).bytes_sent == sum(len(v) for v in objects.values())


# ---------------------------------------------------------------------- --shard


def test_shards_partition_the_objects(
    oss_server: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    objects = {f"sh/obj-{i:02d}.txt": f"object {i}\n".encode() for i in range(15)}
    for key, data in objects.items():
        oss_server.put(BUCKET, key, data)
    cache = tmp_path / "cache"
    shards: list[dict[str, bytes]] = []
    for i in range(3):
        to = tmp_path / f"shard-{i}"
        to.mkdir()
        succeeded(
            materialize(
                oss_server,
                oss_env,
                f"oss://{BUCKET}/sh/",
                cache,
                "--to",
                str(to),
                "--shard",
                f"{i}/3",
            )
        )
        shards.append(files_under(to))
    union: dict[str, bytes] = {}
    for i, shard in enumerate(shards):
        assert shard, f"shard {i} is empty"
        for j in range(i):
            assert not set(shard) & set(shards[j])
        union.update(shard)
    assert union == {k.removeprefix("sh/"): v for k, v in objects.items()}
    assert gets(oss_server) == len(objects)  # each object fetched by one shard only
    # The same split on another run, with another cache.
    again = tmp_path / "shard-1-again"
    again.mkdir()
    succeeded(
        materialize(
            oss_server,
            oss_env,
            f"oss://{BUCKET}/sh/",
            tmp_path / "cache2",
            "--to",
            str(again),
            "--shard",
            "1/3",
        )
    )
    assert files_under(again) == shards[1]


@pytest.mark.parametrize("shard", ["3/3", "-1/3", "0/0", "1", "a/b"])
def test_bad_shard(srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path, shard: str) -> None:
    result = materialize(
        srv, oss_env, f"oss://{BUCKET}/ds/", tmp_path / "cache", f"--shard={shard}"
    )
    assert result.returncode == 2
    assert "shard" in result.stderr
    assert "Traceback" not in result.stderr
    assert gets(srv) == 0


# Variables of the job runners `--shard auto` reads; removed from the test's environment
# so that a test run inside a Slurm job or a Kubernetes pod sees only what a test sets.
RUNNER_VARIABLES = ("JOB_COMPLETION_INDEX", "OSSFS_SHARD_COUNT", "RANK", "WORLD_SIZE")


def runner_env(env: dict[str, str], **variables: str) -> dict[str, str]:
    clean = {
        k: v for k, v in env.items() if k not in RUNNER_VARIABLES and not k.startswith("SLURM_")
    }
    return {**clean, **variables}


@pytest.mark.parametrize(
    ("variables", "args", "shard"),
    [
        pytest.param({"JOB_COMPLETION_INDEX": "1"}, ["--shard-count", "3"], 1, id="k8s-count"),
        pytest.param({"JOB_COMPLETION_INDEX": "2", "OSSFS_SHARD_COUNT": "3"}, [], 2, id="k8s-env"),
        pytest.param(
            {
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_MIN": "4",
                "SLURM_ARRAY_TASK_MAX": "6",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            [],
            1,
            id="slurm",
        ),
        pytest.param({"RANK": "0", "WORLD_SIZE": "3"}, [], 0, id="torch"),
    ],
)
def test_shard_auto_takes_the_runners_shard(
    oss_server: OssTestServer,
    oss_env: dict[str, str],
    tmp_path: Path,
    variables: dict[str, str],
    args: list[str],
    shard: int,
) -> None:
    from ossfs.materialize import in_shard

    objects = {f"sh/obj-{i:02d}.txt": f"object {i}\n".encode() for i in range(15)}
    for key, data in objects.items():
        oss_server.put(BUCKET, key, data)
    expected = {k.removeprefix("sh/"): v for k, v in objects.items() if in_shard(k, (shard, 3))}
    assert expected
    to = tmp_path / "to"
    result = materialize(
        oss_server,
        runner_env(oss_env, **variables),
        f"oss://{BUCKET}/sh/",
        tmp_path / "cache",
        "--to",
        str(to),
        "--shard",
        "auto",
        *args,
    )
    succeeded(result)
    assert f"ossfs: shard {shard}/3 (from " in result.stderr
    assert files_under(to) == expected
    assert gets(oss_server) == len(expected)


@pytest.mark.parametrize(
    ("variables", "args", "says"),
    [
        pytest.param({}, [], "found no job runner", id="none"),
        pytest.param({"JOB_COMPLETION_INDEX": "1"}, [], "--shard-count", id="k8s-no-count"),
        pytest.param(
            {"JOB_COMPLETION_INDEX": "3"},
            ["--shard-count", "3"],
            "not below",
            id="k8s-index-too-big",
        ),
        pytest.param(
            {
                "SLURM_ARRAY_TASK_ID": "0",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            [],
            "SLURM_ARRAY_TASK_ID=0",
            id="slurm-below-min",
        ),
        pytest.param(
            {
                "RANK": "1",
                "WORLD_SIZE": "2",
                "SLURM_ARRAY_TASK_ID": "1",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            [],
            "disagree",
            id="runners-disagree",
        ),
        pytest.param({"RANK": "x", "WORLD_SIZE": "2"}, [], "RANK='x'", id="not-a-number"),
    ],
)
def test_shard_auto_errors(
    srv: OssTestServer,
    oss_env: dict[str, str],
    tmp_path: Path,
    variables: dict[str, str],
    args: list[str],
    says: str,
) -> None:
    result = materialize(
        srv,
        runner_env(oss_env, **variables),
        f"oss://{BUCKET}/ds/",
        tmp_path / "cache",
        "--shard",
        "auto",
        *args,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ossfs: error: --shard auto"), result.stderr
    assert says in lines[0]
    assert gets(srv) == 0


def test_shard_count_needs_shard_auto(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    result = materialize(
        srv,
        oss_env,
        f"oss://{BUCKET}/ds/",
        tmp_path / "cache",
        "--shard",
        "0/3",
        "--shard-count",
        "3",
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "ossfs: error: --shard-count goes with --shard auto"


# ---------------------------------------------------------------------- unsafe keys


def test_unsafe_keys_are_skipped(
    oss_server: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    unsafe = [
        "u/../evil.txt",
        "u/x/../../evil2.txt",
        "u/a//b.txt",
        "u/./dot.txt",
        "u/link/through.txt",
    ]
    for key in unsafe:
        oss_server.put(BUCKET, key, b"must not be written\n")
    oss_server.put(BUCKET, "u/ok.txt", b"fine\n")
    outer = tmp_path / "outer"
    to = outer / "inner"
    to.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A symlink inside DIR that leads out of it must not be written through.
    (to / "link").symlink_to(elsewhere)
    result = materialize(
        oss_server, oss_env, f"oss://{BUCKET}/u/", tmp_path / "cache", "--to", str(to)
    )
    succeeded(result)
    for key in unsafe:
        assert f"skipping {key}" in result.stderr, result.stderr
    assert files_under(to) == {"ok.txt": b"fine\n"}
    assert os.listdir(outer) == ["inner"]
    assert os.listdir(elsewhere) == []
    written = {name for _, _, names in os.walk(tmp_path) for name in names}
    assert not {"evil.txt", "evil2.txt", "b.txt", "dot.txt", "through.txt"} & written


def test_the_cache_keeps_its_cap_when_the_prefix_does_not_fit(
    oss_server: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    """Objects larger than the cache, into a 1 MiB cache: said before starting, and
    the cap holds at the end (plus at most one part per connection)."""
    sizes = [30 * PART + 7, 3 * PART, 25 * PART]
    for i, size in enumerate(sizes):
        oss_server.put(BUCKET, f"big/{i}.bin", randbytes(size, seed=i))
    cache = tmp_path / "cache"
    result = materialize(
        oss_server, oss_env, f"oss://{BUCKET}/big/", cache, "--cache-size", "1MiB", "--threads", "4"
    )
    succeeded(result)
    assert "does not fit in the cache" in result.stderr
    on_disk = disk_bytes(cache, name="data")
    assert on_disk <= 1 * MiB + 4 * PART, on_disk
    # Every part was fetched once: nothing evicted before it was written.
    assert settled_stats(oss_server).bytes_sent == sum(sizes)


def test_consecutive_runs() -> None:
    assert consecutive_runs([], 3) == []
    assert consecutive_runs([0, 1, 2, 3, 5, 6, 9], 3) == [[0, 1, 2], [3], [5, 6], [9]]
