"""``ossfs download`` and the `download()` API against real servers, compared byte for byte.

What this proves, against the OSS test server (and moto for the S3 dialect):

- Objects of every awkward size arrive byte-identical with any thread count,
  with the object's mtime, verified by CRC-64 (OSS) or MD5 (single-part S3),
  and leave neither the temp file nor the checkpoint behind.
- A download killed with SIGKILL at random moments, again and again, resumes
  each time and ends byte-identical, wasting at most the parts in flight at
  each kill; Ctrl-C exits 130 and says how to resume.
- Failures leave a resumable state and an existing FILE untouched; an object
  that changes during or between runs is downloaded anew, never mixed.
- Checkpoints that are corrupt, torn, foreign, stale or for another part size
  are discarded with one line, and none of their parts are trusted; a damaged
  temp file or a corrupted transfer is caught by CRC-64.
- ``--range``, ``--no-resume``, ``--checkpoint-dir``, bad options and missing
  objects behave as documented, with one-line errors and the right exit code.
- Two downloads to one FILE cannot run at once.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from ossfs.client import ClientConfig, HttpObjectClient
from ossfs.download import DownloadRequest, DownloadResult, download
from ossfs.errors import TransferError, UsageError
from ossfs.testing import Fault, OssTestServer, RequestInfo, parse_range
from tests.helpers import OSSFS, run_ossfs, summary_line
from tests.integration.conftest import settled_stats

KiB = 1024
MiB = 1024 * KiB
PART = 100 * KiB  # the smallest part size ossfs accepts, to get many parts cheaply
BUCKET = "bkt"

TEMP_SUFFIX = ".ossfs-tmp"
CHECKPOINT_SUFFIX = ".ossfs-checkpoint"


# ---------------------------------------------------------------------- helpers


def randbytes(size: int, seed: int) -> bytes:
    """Reproducible incompressible bytes."""
    return random.Random(seed).randbytes(size)


def oss_download(
    server: OssTestServer, env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``ossfs download ARGS`` against *server*."""
    return run_ossfs("download", *args, "--endpoint", server.url, env=env, cwd=cwd)


def popen_download(server: OssTestServer, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Start ``ossfs download ARGS`` in the background (the caller must reap it)."""
    return subprocess.Popen(
        [*OSSFS, "download", *args, "--endpoint", server.url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill *proc* if it still runs, wait for it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.communicate(timeout=30)
    except ValueError:
        proc.wait(timeout=30)  # its output was already read


def leftovers(directory: Path) -> list[str]:
    """Temp files and checkpoints in *directory*."""
    return sorted(n for n in os.listdir(directory) if n.endswith((TEMP_SUFFIX, CHECKPOINT_SUFFIX)))


def checkpoints(directory: Path) -> list[Path]:
    """The checkpoint files in *directory*."""
    return sorted(directory.glob(f"*{CHECKPOINT_SUFFIX}"))


def only_checkpoint(directory: Path) -> Path:
    """The one checkpoint file in *directory*."""
    found = checkpoints(directory)
    assert len(found) == 1, found
    return found[0]


def recorded_parts(checkpoint: Path) -> set[int]:
    """Parts a checkpoint records as complete, read as ``docs/cache-format.md`` describes.

    Every line is ``<payload> <crc32 of payload, 8 hex>``; lines whose checksum
    fails (torn or garbage) are ignored, as ossfs must ignore them.
    """
    parts: set[int] = set()
    for line in checkpoint.read_bytes().split(b"\n")[1:]:
        payload, _, crc = line.rpartition(b" ")
        if crc != b"%08x" % zlib.crc32(payload):
            continue
        fields = payload.split()
        if len(fields) == 4 and fields[0] == b"+":
            parts.add(int(fields[1]))
        elif len(fields) == 2 and fields[0] == b"-":
            parts.discard(int(fields[1]))
    return parts


def error_line(stderr: str) -> str:
    """The single ``ossfs: error:`` line of a failed run (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("ossfs: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def summary(result: subprocess.CompletedProcess[str]) -> str:
    """The summary line of a successful run."""
    return summary_line(result, "downloaded ")


def get_starts(server: OssTestServer, key: str, since: int = 0) -> list[int | None]:
    """Where the GETs of *key* (after the first *since* GETs) started."""
    return [r.req_start for r in settled_stats(server).gets_by_key.get(key, [])[since:]]


def gets_of(server: OssTestServer, key: str) -> int:
    """Object GETs of *key* the server has answered (and finished answering)."""
    return len(settled_stats(server).gets_by_key.get(key, []))


def starting_at_or_after(offset: int) -> Any:
    """A fault filter: GETs whose range starts at *offset* or later."""

    def when(info: RequestInfo) -> bool:
        spec = parse_range(info.range)
        return spec is not None and spec[0] is not None and spec[0] >= offset

    return when


def interrupt_after(
    server: OssTestServer,
    env: dict[str, str],
    key: str,
    dest: Path,
    parts_done: int,
    *extra: str,
    part_size: int = PART,
) -> None:
    """Leave a checkpoint of *key* at *dest* holding exactly parts ``0 .. parts_done-1``.

    Every GET from part *parts_done* on answers 503 and one attempt is allowed,
    so the run stops there with exit 1 (one thread keeps the parts in order).
    """
    server.faults.add(
        Fault(
            "status",
            status=503,
            op="get",
            key=key,
            when=starting_at_or_after(parts_done * part_size),
        ),
        times=None,
    )
    try:
        result = oss_download(
            server,
            env,
            f"oss://{BUCKET}/{key}",
            str(dest),
            "--part-size",
            str(part_size),
            "--threads",
            "1",
            "--attempts",
            "1",
            *extra,
        )
    finally:
        server.faults.clear()
    assert result.returncode == 1, result.stderr
    ckpt = only_checkpoint(
        Path(extra[extra.index("--checkpoint-dir") + 1])
        if "--checkpoint-dir" in extra
        else dest.parent
    )
    assert recorded_parts(ckpt) == set(range(parts_done))


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Poll *predicate* until it holds; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def srv(oss_server: OssTestServer) -> OssTestServer:
    """The OSS test server with the test bucket."""
    oss_server.create_bucket(BUCKET)
    return oss_server


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An empty destination directory."""
    d = tmp_path / "out"
    d.mkdir()
    return d


# ---------------------------------------------------------------------- sizes and threads

SIZES = {
    "0 bytes": 0,
    "1 byte": 1,
    "one part": PART,
    "one part + 1": PART + 1,
    "many parts": 25 * PART + 777,
}


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_download_is_byte_identical(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, size: int, threads: int
) -> None:
    data = randbytes(size, seed=size)
    meta = srv.put(BUCKET, "dir/object.bin", data, mtime=1_600_000_000)
    dest = out / "object.bin"
    result = oss_download(
        srv,
        oss_env,
        f"oss://{BUCKET}/dir/object.bin",
        str(dest),
        "--part-size",
        "100KiB",
        "--threads",
        str(threads),
    )
    line = summary(result)
    assert dest.read_bytes() == data
    assert leftovers(out) == []
    assert os.stat(dest).st_mtime == meta.mtime == 1_600_000_000
    assert "CRC-64 verified" in line
    parts = -(-size // PART)
    assert f"{parts} part(s)" in line
    # Each part fetched once, nothing more.
    assert gets_of(srv, "dir/object.bin") == parts
    assert settled_stats(srv).bytes_sent == size


def test_download_to_a_file_with_a_long_name_resumes(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    """70 CJK characters are 210 bytes: a name the file system takes, but not with
    the temp file's and the checkpoint's suffixes added ("File name too long")."""
    name = "数据" * 35
    assert len(name.encode()) == 210
    data = randbytes(3 * PART + 7, seed=8)
    srv.put(BUCKET, name, data)
    interrupt_after(srv, oss_env, name, out / name, 2)
    kept = leftovers(out)
    assert len(kept) == 2 and all(len(n.encode()) <= 255 for n in kept), kept
    result = oss_download(
        srv, oss_env, f"oss://{BUCKET}/{name}", str(out / name), "--part-size", "100KiB"
    )
    assert "2 reused from checkpoint" in summary(result)
    assert (out / name).read_bytes() == data
    assert leftovers(out) == []


def test_download_replaces_existing_file(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    data = randbytes(3 * PART, seed=4)
    srv.put(BUCKET, "f", data)
    dest = out / "f"
    dest.write_bytes(b"old content that is longer than nothing" * 10_000)
    summary(oss_download(srv, oss_env, f"oss://{BUCKET}/f", str(dest), "--part-size", "100KiB"))
    assert dest.read_bytes() == data
    assert leftovers(out) == []


def test_download_from_s3_single_part_is_md5_verified(
    moto_endpoint: str, s3: Any, s3_bucket: str, cli_env: dict[str, str], out: Path
) -> None:
    data = randbytes(700 * KiB + 3, seed=5)
    s3.put_object(Bucket=s3_bucket, Key="s3/object.bin", Body=data)
    dest = out / "object.bin"
    result = run_ossfs(
        "download",
        f"s3://{s3_bucket}/s3/object.bin",
        str(dest),
        "--endpoint",
        moto_endpoint,
        "--part-size",
        "100KiB",
        "--threads",
        "3",
        env=cli_env,
    )
    assert "MD5 verified" in summary(result)
    assert dest.read_bytes() == data
    assert leftovers(out) == []
    head = s3.head_object(Bucket=s3_bucket, Key="s3/object.bin")
    assert os.stat(dest).st_mtime == head["LastModified"].timestamp()


def test_download_from_s3_multipart_object(
    moto_endpoint: str, s3: Any, s3_bucket: str, cli_env: dict[str, str], out: Path
) -> None:
    """A multipart ETag is no MD5: the download is still exact and says what it checked."""
    first, second = randbytes(5 * MiB, seed=6), randbytes(300 * KiB, seed=7)
    upload = s3.create_multipart_upload(Bucket=s3_bucket, Key="mp.bin")
    etags = [
        s3.upload_part(
            Bucket=s3_bucket, Key="mp.bin", UploadId=upload["UploadId"], PartNumber=n, Body=body
        )["ETag"]
        for n, body in ((1, first), (2, second))
    ]
    s3.complete_multipart_upload(
        Bucket=s3_bucket,
        Key="mp.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n + 1} for n, e in enumerate(etags)]},
    )
    dest = out / "mp.bin"
    result = run_ossfs(
        "download",
        f"s3://{s3_bucket}/mp.bin",
        str(dest),
        "--endpoint",
        moto_endpoint,
        "--part-size",
        "1MiB",
        "--threads",
        "4",
        env=cli_env,
    )
    line = summary(result)
    assert dest.read_bytes() == first + second
    # One message, in the summary: a multipart ETag is no MD5 and S3 sends no CRC-64.
    assert "per-part CRC-64 only (the service sent no checksum of the object)" in line
    assert result.stderr.count("checksum") == 1
    assert leftovers(out) == []


# ---------------------------------------------------------------------- destination


def test_default_destination_is_base_name_in_cwd(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    data = randbytes(2 * PART + 5, seed=8)
    srv.put(BUCKET, "deep/dir/name.dat", data)
    result = oss_download(
        srv, oss_env, f"oss://{BUCKET}/deep/dir/name.dat", "--part-size", "100KiB", cwd=out
    )
    summary(result)
    assert sorted(os.listdir(out)) == ["name.dat"]
    assert (out / "name.dat").read_bytes() == data


def test_destination_may_be_a_directory(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    data = randbytes(PART + 9, seed=9)
    srv.put(BUCKET, "a/b.bin", data)
    target = out / "into"
    target.mkdir()
    summary(
        oss_download(srv, oss_env, f"oss://{BUCKET}/a/b.bin", str(target), "--part-size", "100KiB")
    )
    assert sorted(os.listdir(target)) == ["b.bin"]
    assert (target / "b.bin").read_bytes() == data
    assert leftovers(out) == []


def test_checkpoint_dir_holds_the_checkpoint(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, tmp_path: Path
) -> None:
    data = randbytes(10 * PART, seed=10)
    srv.put(BUCKET, "c.bin", data)
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    dest = out / "c.bin"
    interrupt_after(srv, oss_env, "c.bin", dest, 4, "--checkpoint-dir", str(ckdir))
    assert checkpoints(out) == []
    assert leftovers(out) == ["c.bin" + TEMP_SUFFIX]
    before = gets_of(srv, "c.bin")
    line = summary(
        oss_download(
            srv,
            oss_env,
            f"oss://{BUCKET}/c.bin",
            str(dest),
            "--part-size",
            "100KiB",
            "--checkpoint-dir",
            str(ckdir),
        )
    )
    assert "4 reused" in line
    assert gets_of(srv, "c.bin") - before == 6
    assert dest.read_bytes() == data
    assert leftovers(out) == [] and leftovers(ckdir) == []


def test_resume_with_relative_destination(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    """The checkpoint belongs to the destination, however the command names it."""
    data = randbytes(8 * PART, seed=35)
    srv.put(BUCKET, "rel.bin", data)
    interrupt_after(srv, oss_env, "rel.bin", out / "rel.bin", 3)
    line = summary(
        oss_download(
            srv, oss_env, f"oss://{BUCKET}/rel.bin", "rel.bin", "--part-size", "100KiB", cwd=out
        )
    )
    assert "3 reused from checkpoint" in line
    assert (out / "rel.bin").read_bytes() == data
    assert leftovers(out) == []


def test_key_that_needs_encoding(srv: OssTestServer, oss_env: dict[str, str], out: Path) -> None:
    key = "dir with space/caf\u00e9+plus%25 ~name.bin"
    data = randbytes(3 * PART + 3, seed=36)
    srv.put(BUCKET, key, data)
    summary(oss_download(srv, oss_env, f"oss://{BUCKET}/{key}", "--part-size", "100KiB", cwd=out))
    assert os.listdir(out) == ["caf\u00e9+plus%25 ~name.bin"]
    assert (out / "caf\u00e9+plus%25 ~name.bin").read_bytes() == data


def test_limit_rate(srv: OssTestServer, oss_env: dict[str, str], out: Path) -> None:
    size, rate = 1 * MiB, 512 * KiB
    data = randbytes(size, seed=37)
    srv.put(BUCKET, "slow.bin", data)
    limits: list[str | None] = []

    def spy(info: RequestInfo) -> bool:
        limits.append(info.headers.get("x-oss-traffic-limit"))
        return False  # never fires: it only watches the GETs go by

    srv.faults.add(Fault("status", op="get", key="slow.bin", when=spy), times=None)
    began = time.monotonic()
    summary(
        oss_download(
            srv,
            oss_env,
            f"oss://{BUCKET}/slow.bin",
            str(out / "slow.bin"),
            "--part-size",
            "100KiB",
            "--threads",
            "4",
            "--limit-rate",
            "512K",
        )
    )
    elapsed = time.monotonic() - began
    assert (out / "slow.bin").read_bytes() == data
    # Generous: the cap is in force for all threads together (unlimited takes ~0.3 s).
    assert size / elapsed < 1.6 * rate, f"{size / elapsed / KiB:.0f} KiB/s"
    assert limits and set(limits) == {str(rate * 8)}


# ---------------------------------------------------------------------- kill -9 and Ctrl-C


@pytest.mark.slow
def test_resume_after_repeated_kill_9(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    size, part, threads = 40 * MiB, 256 * KiB, 4
    data = randbytes(size, seed=11)
    srv.put(BUCKET, "big.bin", data)
    dest = out / "big.bin"
    args = (
        f"oss://{BUCKET}/big.bin",
        str(dest),
        "--part-size",
        "256KiB",
        "--threads",
        str(threads),
    )
    # The kill times come from a fixed seed, printed so a failure can be replayed;
    # OSSFS_TEST_SEED chooses another.
    seed = int(os.environ.get("OSSFS_TEST_SEED", "9"))
    print(f"kill -9 times from seed {seed} (OSSFS_TEST_SEED)")
    rng = random.Random(seed)
    # Slow enough that no run of the loop can finish: every kill lands mid-download.
    srv.faults.bandwidth = 512 * KiB
    kills = 0
    while kills < 10:
        proc = popen_download(srv, oss_env, *args)
        try:
            time.sleep(rng.uniform(0.3, 1.5))
            assert proc.poll() is None, (
                f"finished before kill {kills + 1} (seed {seed}): {proc.communicate()[1]}"
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += 1
        finally:
            reap(proc)
        assert dest.exists() is False
    srv.faults.bandwidth = None
    line = summary(oss_download(srv, oss_env, *args))
    assert "reused from checkpoint" in line
    assert dest.read_bytes() == data, f"seed {seed}"
    assert leftovers(out) == []
    waste = settled_stats(srv).bytes_sent - size
    assert 0 <= waste <= kills * threads * part, f"waste {waste} (seed {seed})"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_interrupt_exits_130_and_resumes(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, sig: signal.Signals
) -> None:
    """Ctrl-C (and SIGTERM, which stops a command the same way)."""
    size = 8 * MiB
    data = randbytes(size, seed=12)
    srv.put(BUCKET, "int.bin", data)
    dest = out / "int.bin"
    args = (f"oss://{BUCKET}/int.bin", str(dest), "--part-size", "256KiB", "--threads", "2")
    srv.faults.bandwidth = 1 * MiB
    proc = popen_download(srv, oss_env, *args)
    try:
        wait_until(
            lambda: checkpoints(out) and len(recorded_parts(checkpoints(out)[0])) >= 2,
            30,
            "two recorded parts",
        )
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    assert "run the same command again to resume" in stderr
    ckpt = only_checkpoint(out)
    done = recorded_parts(ckpt)
    assert len(done) >= 2
    assert not dest.exists()
    srv.faults.bandwidth = None
    before = gets_of(srv, "int.bin")
    line = summary(oss_download(srv, oss_env, *args))
    assert f"{len(done)} reused from checkpoint" in line
    assert gets_of(srv, "int.bin") - before == 32 - len(done)
    assert dest.read_bytes() == data
    assert leftovers(out) == []


# ---------------------------------------------------------------------- failures


def test_exhausted_retries_keep_checkpoint_and_existing_file(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    data = randbytes(12 * PART, seed=13)
    srv.put(BUCKET, "net.bin", data)
    dest = out / "net.bin"
    old = b"the previous version of this file\n" * 100
    dest.write_bytes(old)
    srv.faults.add(
        Fault("status", status=503, op="get", key="net.bin", when=starting_at_or_after(5 * PART)),
        times=None,
    )
    result = oss_download(
        srv,
        oss_env,
        f"oss://{BUCKET}/net.bin",
        str(dest),
        "--part-size",
        "100KiB",
        "--threads",
        "2",
        "--attempts",
        "2",
    )
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "ServiceUnavailable" in line
    assert re.search(r"request id [0-9A-F]{24}", line), line
    assert "run the same command again to resume" in line
    assert dest.read_bytes() == old  # untouched
    assert leftovers(out) == sorted([only_checkpoint(out).name, "net.bin" + TEMP_SUFFIX])
    assert recorded_parts(only_checkpoint(out)) <= set(range(5))
    srv.faults.clear()
    summary(
        oss_download(
            srv,
            oss_env,
            f"oss://{BUCKET}/net.bin",
            str(dest),
            "--part-size",
            "100KiB",
            "--threads",
            "2",
        )
    )
    assert dest.read_bytes() == data
    assert leftovers(out) == []


@pytest.mark.parametrize("threads", [1, 4])
def test_object_replaced_mid_download(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, threads: int
) -> None:
    old = randbytes(11 * PART, seed=14)
    new = randbytes(13 * PART + 17, seed=15)
    srv.put(BUCKET, "moving.bin", old)
    srv.faults.add(Fault("replace", op="get", key="moving.bin", after_bytes=1000, data=new))
    dest = out / "moving.bin"
    result = oss_download(
        srv,
        oss_env,
        f"oss://{BUCKET}/moving.bin",
        str(dest),
        "--part-size",
        "100KiB",
        "--threads",
        str(threads),
    )
    summary(result)
    assert "changed during the download; starting over" in result.stderr
    assert dest.read_bytes() == new
    assert leftovers(out) == []


def _replaced_while_fetched_from(version: bytes) -> Any:
    """A fault filter: GETs pinned (If-Match) to the ETag of *version*, 100 KiB or more
    into the object, so each version is replaced while its own download runs."""
    etag = hashlib.md5(version).hexdigest().lower()
    later = starting_at_or_after(PART)

    def when(info: RequestInfo) -> bool:
        return info.headers.get("if-match", "").strip('"').lower() == etag and later(info)

    return when


@pytest.mark.parametrize("changes", [2, 3])
def test_object_that_keeps_changing(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, changes: int
) -> None:
    # Each version is replaced by the next while it is being fetched. Two changes are
    # absorbed (the download starts over each time) and the file is the last version,
    # exactly; a third is a clear error and FILE is not written. Never a mix.
    versions = [randbytes(8 * PART + i, seed=40 + i) for i in range(changes + 1)]
    srv.put(BUCKET, "restless.bin", versions[0])
    for old, new in itertools.pairwise(versions):
        srv.faults.add(
            Fault(
                "replace",
                op="get",
                key="restless.bin",
                after_bytes=1000,
                data=new,
                when=_replaced_while_fetched_from(old),
            )
        )
    dest = out / "restless.bin"
    result = oss_download(
        srv,
        oss_env,
        f"oss://{BUCKET}/restless.bin",
        str(dest),
        "--part-size",
        "100KiB",
        "--threads",
        "1",  # the GET after a replacing one surely comes after the replace
    )
    assert result.stderr.count("changed during the download; starting over") == 2
    if changes == 2:
        summary(result)
        assert dest.read_bytes() == versions[-1]
        assert leftovers(out) == []
    else:
        assert result.returncode == 1
        line = error_line(result.stderr)
        assert "kept changing during the download (replaced 3 times" in line, line
        assert "resume" not in line  # its parts were dropped: nothing to resume
        assert not dest.exists()


def test_object_replaced_between_runs(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    old = randbytes(10 * PART, seed=16)
    new = randbytes(10 * PART, seed=17)  # same size: only the ETag tells them apart
    srv.put(BUCKET, "stale.bin", old)
    dest = out / "stale.bin"
    interrupt_after(srv, oss_env, "stale.bin", dest, 6)
    srv.put(BUCKET, "stale.bin", new)
    before = gets_of(srv, "stale.bin")
    result = oss_download(
        srv, oss_env, f"oss://{BUCKET}/stale.bin", str(dest), "--part-size", "100KiB"
    )
    line = summary(result)
    notices = [x for x in result.stderr.splitlines() if "not resuming from checkpoint" in x]
    assert len(notices) == 1 and "changed" in notices[0]
    assert "reused" not in line
    assert gets_of(srv, "stale.bin") - before == 10
    assert dest.read_bytes() == new
    assert leftovers(out) == []


# ---------------------------------------------------------------------- bad checkpoints

BAD_CHECKPOINTS = {
    "garbage": "corrupt",
    "empty": "corrupt",
    "cut mid-header": "corrupt",
    "foreign": "another object",
    "other part size": "part size",
    "temp file missing": "missing",
}


@pytest.mark.parametrize("damage", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_discarded(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, damage: str
) -> None:
    data = randbytes(11 * PART, seed=18)
    srv.put(BUCKET, "a.bin", data)
    dest = out / "a.bin"
    interrupt_after(srv, oss_env, "a.bin", dest, 4)
    ckpt = only_checkpoint(out)
    temp = out / ("a.bin" + TEMP_SUFFIX)
    part_size = "100KiB"
    if damage == "garbage":
        ckpt.write_bytes(randbytes(150, seed=19) + b"\n" + randbytes(150, seed=20) + b"\n")
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "cut mid-header":
        ckpt.write_bytes(ckpt.read_bytes()[:40])
    elif damage == "foreign":
        other = out / "elsewhere"
        other.mkdir()
        srv.put(BUCKET, "b.bin", randbytes(11 * PART, seed=20))
        interrupt_after(srv, oss_env, "b.bin", other / "b.bin", 4)
        shutil.copyfile(only_checkpoint(other), ckpt)
    elif damage == "other part size":
        part_size = "200KiB"
    elif damage == "temp file missing":
        temp.unlink()
    if temp.exists():
        # Were any old part trusted, these bytes would end up in the result.
        with open(temp, "r+b") as f:
            f.write(b"\xee" * (4 * PART))
    before = gets_of(srv, "a.bin")
    result = oss_download(
        srv, oss_env, f"oss://{BUCKET}/a.bin", str(dest), "--part-size", part_size
    )
    line = summary(result)
    notices = [x for x in result.stderr.splitlines() if x.startswith("ossfs:")]
    assert len(notices) == 1, result.stderr
    assert "not resuming from checkpoint" in notices[0]
    assert BAD_CHECKPOINTS[damage] in notices[0]
    assert "reused" not in line
    parts = 11 if part_size == "100KiB" else 6
    assert gets_of(srv, "a.bin") - before == parts  # every part fetched again
    assert dest.read_bytes() == data
    assert leftovers(out) == []


def test_missing_temp_file_parts_are_fetched_again(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    """Whatever the message, parts whose bytes are gone are never trusted."""
    data = randbytes(11 * PART, seed=34)
    srv.put(BUCKET, "gone.bin", data)
    dest = out / "gone.bin"
    interrupt_after(srv, oss_env, "gone.bin", dest, 4)
    (out / ("gone.bin" + TEMP_SUFFIX)).unlink()
    before = gets_of(srv, "gone.bin")
    line = summary(
        oss_download(srv, oss_env, f"oss://{BUCKET}/gone.bin", str(dest), "--part-size", "100KiB")
    )
    assert "reused" not in line
    assert gets_of(srv, "gone.bin") - before == 11
    assert dest.read_bytes() == data
    assert leftovers(out) == []


@pytest.mark.parametrize("damage", ["cut mid-record", "garbage line appended"])
def test_torn_checkpoint_tail_loses_only_that_record(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, damage: str
) -> None:
    """The journal's last line torn by a crash: the records before it still hold,
    and records appended after it by the next run are read back too."""
    data = randbytes(11 * PART, seed=21)
    srv.put(BUCKET, "t.bin", data)
    dest = out / "t.bin"
    interrupt_after(srv, oss_env, "t.bin", dest, 4)
    ckpt = only_checkpoint(out)
    raw = ckpt.read_bytes()
    if damage == "cut mid-record":
        ckpt.write_bytes(raw[:-12])
        assert recorded_parts(ckpt) == {0, 1, 2}
    else:
        ckpt.write_bytes(raw + b"+ 9 102400 0123456789abcdef 00000000\n+ 8 1")
        assert recorded_parts(ckpt) == {0, 1, 2, 3}
    # A second interrupted run appends after the damaged tail ...
    before = gets_of(srv, "t.bin")
    interrupt_after(srv, oss_env, "t.bin", dest, 7)
    kept = 3 if damage == "cut mid-record" else 4
    assert gets_of(srv, "t.bin") - before == 7 - kept + 1  # + the GET that failed
    # ... and the third run trusts everything recorded before and after it.
    before = gets_of(srv, "t.bin")
    line = summary(
        oss_download(srv, oss_env, f"oss://{BUCKET}/t.bin", str(dest), "--part-size", "100KiB")
    )
    assert "7 reused from checkpoint" in line
    assert gets_of(srv, "t.bin") - before == 4
    assert dest.read_bytes() == data
    assert leftovers(out) == []


def test_damaged_temp_file_part_is_fetched_again(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    data = randbytes(11 * PART, seed=22)
    srv.put(BUCKET, "d.bin", data)
    dest = out / "d.bin"
    interrupt_after(srv, oss_env, "d.bin", dest, 4)
    with open(out / ("d.bin" + TEMP_SUFFIX), "r+b") as f:
        f.seek(PART + 5000)
        f.write(bytes(b ^ 0xFF for b in data[PART + 5000 : PART + 5010]))
    before = gets_of(srv, "d.bin")
    result = oss_download(
        srv, oss_env, f"oss://{BUCKET}/d.bin", str(dest), "--part-size", "100KiB", "--threads", "1"
    )
    line = summary(result)
    assert "1 recorded part(s) failed their CRC check" in result.stderr
    assert "3 reused from checkpoint" in line
    starts = get_starts(srv, "d.bin", before)
    assert sorted(x or 0 for x in starts) == [PART] + [i * PART for i in range(4, 11)]
    assert dest.read_bytes() == data
    assert leftovers(out) == []


def test_crc_mismatch_from_the_server(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    data = randbytes(6 * PART + 1, seed=23)
    srv.put(BUCKET, "crc.bin", data)
    srv.faults.add(Fault("corrupt", op="get", key="crc.bin", offset=777, length=3))
    dest = out / "crc.bin"
    args = (f"oss://{BUCKET}/crc.bin", str(dest), "--part-size", "100KiB", "--threads", "3")
    result = oss_download(srv, oss_env, *args)
    assert result.returncode == 1
    assert "CRC-64 mismatch" in error_line(result.stderr)
    assert not dest.exists()
    rerun = oss_download(srv, oss_env, *args)
    assert "CRC-64 verified" in summary(rerun)
    assert dest.read_bytes() == data
    assert leftovers(out) == []


# ---------------------------------------------------------------------- --range

RANGE_SIZE = 1_000_000
RANGES = {
    "0-0": (0, 1),
    "100-199": (100, 200),
    "150000-": (150_000, RANGE_SIZE),
    "999999-999999": (999_999, RANGE_SIZE),
    "500000-2000000": (500_000, RANGE_SIZE),
    "102400-307199": (PART, 3 * PART),
    "0-": (0, RANGE_SIZE),
}


@pytest.mark.parametrize("spec", list(RANGES))
def test_range(srv: OssTestServer, oss_env: dict[str, str], out: Path, spec: str) -> None:
    data = randbytes(RANGE_SIZE, seed=24)
    srv.put(BUCKET, "r.bin", data)
    dest = out / "r.bin"
    line = summary(
        oss_download(
            srv,
            oss_env,
            f"oss://{BUCKET}/r.bin",
            str(dest),
            "--range",
            spec,
            "--part-size",
            "100KiB",
            "--threads",
            "3",
        )
    )
    start, end = RANGES[spec]
    assert dest.read_bytes() == data[start:end]
    assert leftovers(out) == []
    if end - start < RANGE_SIZE:
        assert "per-part CRC-64" in line
    assert settled_stats(srv).bytes_sent == end - start


@pytest.mark.parametrize(
    "spec", ["1000000-", "1000000-1000005", "5000000-6000000", "1000005-1000009"]
)
def test_range_past_the_end_is_an_error(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, spec: str
) -> None:
    srv.put(BUCKET, "r.bin", randbytes(RANGE_SIZE, seed=25))
    result = oss_download(
        srv, oss_env, f"oss://{BUCKET}/r.bin", str(out / "r.bin"), "--range", spec
    )
    assert result.returncode == 2
    assert "past the end" in error_line(result.stderr)
    assert gets_of(srv, "r.bin") == 0
    assert not (out / "r.bin").exists()


def test_range_past_the_end_leaves_nothing_behind(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    srv.put(BUCKET, "r.bin", randbytes(1000, seed=26))
    result = oss_download(
        srv, oss_env, f"oss://{BUCKET}/r.bin", str(out / "r.bin"), "--range", "5000-"
    )
    assert result.returncode == 2
    assert os.listdir(out) == []


def test_range_of_empty_object_is_a_clear_error(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    srv.put(BUCKET, "empty", b"")
    result = oss_download(
        srv, oss_env, f"oss://{BUCKET}/empty", str(out / "empty"), "--range", "0-"
    )
    assert result.returncode == 2
    assert "past the end" in error_line(result.stderr)


# ---------------------------------------------------------------------- bad input


INVALID = {
    "part size 99KiB": (["--part-size", "99KiB"], "part size"),
    "part size 6GiB": (["--part-size", "6GiB"], "part size"),
    "part size not a size": (["--part-size", "lots"], "not a size"),
    "threads 0": (["--threads", "0"], "--threads"),
    "malformed range": (["--range", "abc"], "not a range"),
    "backwards range": (["--range", "10-5"], "ends before it starts"),
    "suffix range": (["--range", "-5"], "not a range"),
    "limit rate below 1K": (["--limit-rate", "100"], "--limit-rate"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_option(srv: OssTestServer, oss_env: dict[str, str], out: Path, case: str) -> None:
    srv.put(BUCKET, "k", b"data")
    extra, expected = INVALID[case]
    result = oss_download(srv, oss_env, f"oss://{BUCKET}/k", str(out / "k"), *extra)
    assert result.returncode == 2
    assert expected in error_line(result.stderr)
    assert os.listdir(out) == []
    assert srv.stats.count() == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://bkt/k",
        "bkt/k",
        "gs://bkt/k",
        "oss://bkt/dir/",
        "oss://bkt/",
        "oss://bkt",
        "oss://B_a_d/k",
    ],
)
def test_invalid_url(srv: OssTestServer, oss_env: dict[str, str], out: Path, url: str) -> None:
    result = oss_download(srv, oss_env, url, str(out / "k"))
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert url in line or "prefix" in line
    assert os.listdir(out) == []
    assert srv.stats.count() == 0


def test_missing_directories(srv: OssTestServer, oss_env: dict[str, str], out: Path) -> None:
    srv.put(BUCKET, "k", b"data")
    result = oss_download(srv, oss_env, f"oss://{BUCKET}/k", str(out / "nope" / "k"))
    assert result.returncode == 2
    assert "does not exist" in error_line(result.stderr)
    result = oss_download(
        srv,
        oss_env,
        f"oss://{BUCKET}/k",
        str(out / "k"),
        "--checkpoint-dir",
        str(out / "no-such-dir"),
    )
    assert result.returncode == 2
    assert "does not exist" in error_line(result.stderr)
    assert os.listdir(out) == []
    assert gets_of(srv, "k") == 0


@pytest.mark.parametrize(
    ("url", "code"),
    [("oss://bkt/no/such/key", "NoSuchKey"), ("oss://no-such-bucket/k", "NoSuchBucket")],
)
def test_missing_object(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, url: str, code: str
) -> None:
    result = oss_download(srv, oss_env, url, str(out / "k"))
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert code in line
    assert re.search(r"request id [0-9A-F]{24}", line), line
    assert not (out / "k").exists()


def test_missing_object_leaves_nothing_and_promises_nothing(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    result = oss_download(srv, oss_env, f"oss://{BUCKET}/no/such/key", str(out / "k"))
    assert result.returncode == 1
    assert "checkpoint" not in error_line(result.stderr)
    assert os.listdir(out) == []


# ---------------------------------------------------------------------- --no-resume


def test_no_resume_never_writes_a_checkpoint(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    data = randbytes(2 * MiB, seed=27)
    srv.put(BUCKET, "nr.bin", data)
    dest = out / "nr.bin"
    srv.faults.bandwidth = 2 * MiB
    proc = popen_download(
        srv,
        oss_env,
        f"oss://{BUCKET}/nr.bin",
        str(dest),
        "--part-size",
        "100KiB",
        "--threads",
        "2",
        "--no-resume",
    )
    seen: set[str] = set()
    try:
        while proc.poll() is None:
            seen.update(os.listdir(out))
            time.sleep(0.005)
        _, stderr = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == 0, stderr
    assert "nr.bin" + TEMP_SUFFIX in seen  # the watch did see the run at work
    assert not [n for n in seen if n.endswith(CHECKPOINT_SUFFIX)]
    assert dest.read_bytes() == data
    assert os.listdir(out) == ["nr.bin"]


@pytest.mark.slow
def test_no_resume_interrupted_leaves_no_temp_file(
    srv: OssTestServer, oss_env: dict[str, str], out: Path
) -> None:
    data = randbytes(4 * MiB, seed=28)
    srv.put(BUCKET, "nr.bin", data)
    dest = out / "nr.bin"
    args = (
        f"oss://{BUCKET}/nr.bin",
        str(dest),
        "--part-size",
        "100KiB",
        "--threads",
        "2",
        "--no-resume",
    )
    srv.faults.bandwidth = 512 * KiB
    proc = popen_download(srv, oss_env, *args)
    try:
        wait_until(lambda: srv.stats.bytes_sent > 300 * KiB, 30, "bytes to flow")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "resume" not in stderr  # nothing to resume from
    assert os.listdir(out) == []
    # A network failure with --no-resume cleans up as well.
    srv.faults.bandwidth = None
    srv.faults.add(
        Fault("status", status=503, op="get", key="nr.bin", when=starting_at_or_after(5 * PART)),
        times=None,
    )
    result = oss_download(srv, oss_env, *args, "--attempts", "1")
    assert result.returncode == 1
    error_line(result.stderr)
    assert os.listdir(out) == []
    srv.faults.clear()
    summary(oss_download(srv, oss_env, *args))
    assert dest.read_bytes() == data
    assert os.listdir(out) == ["nr.bin"]


# ---------------------------------------------------------------------- concurrency


def test_two_downloads_to_one_file(srv: OssTestServer, oss_env: dict[str, str], out: Path) -> None:
    data = randbytes(3 * MiB, seed=29)
    srv.put(BUCKET, "same.bin", data)
    dest = out / "same.bin"
    args = (f"oss://{BUCKET}/same.bin", str(dest), "--part-size", "256KiB", "--threads", "2")
    # About 6 s at this pace: the second run comes and goes while the first works.
    srv.faults.bandwidth = 256 * KiB
    first = popen_download(srv, oss_env, *args)
    try:
        wait_until(lambda: bool(checkpoints(out)), 30, "the first run's checkpoint")
        second = oss_download(srv, oss_env, *args)
        assert first.poll() is None, "the first run ended before the second started"
        srv.faults.bandwidth = None
        _, stderr = first.communicate(timeout=60)
    finally:
        reap(first)
    assert second.returncode in (1, 2)
    assert "another download" in error_line(second.stderr)
    assert first.returncode == 0, stderr
    assert dest.read_bytes() == data
    assert leftovers(out) == []


# ---------------------------------------------------------------------- Python API


class Progress:
    """Records progress callbacks and checks them as they come."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, n: int, transferred: int, total: int) -> None:
        if self.calls:
            _, last, last_total = self.calls[-1]
            assert total == last_total
            assert transferred == last + n
            assert n > 0
        self.calls.append((n, transferred, total))


def api_request(out: Path, key: str, **kw: Any) -> DownloadRequest:
    """A request for *key* into *out*, cut into 100 KiB parts."""
    return DownloadRequest(
        bucket=BUCKET, key=key, file_path=str(out / os.path.basename(key)), part_size=PART, **kw
    )


@pytest.fixture
async def client(srv: OssTestServer) -> Any:
    """A client of the test server that does not retry (failures come at once)."""
    async with HttpObjectClient(srv.endpoint(), ClientConfig(connections=4, attempts=1)) as c:
        yield c


async def test_api_download(srv: OssTestServer, client: HttpObjectClient, out: Path) -> None:
    size = 9 * PART + 1234
    data = randbytes(size, seed=30)
    meta = srv.put(BUCKET, "api/obj.bin", data)
    progress = Progress()
    part_calls: list[tuple[int, int]] = []
    notices: list[str] = []
    result = await download(
        client,
        api_request(
            out,
            "api/obj.bin",
            threads=4,
            progress=progress,
            on_part=lambda d, t: part_calls.append((d, t)),
            notice=notices.append,
        ),
    )
    assert isinstance(result, DownloadResult)
    assert result.path == str(out / "obj.bin")
    assert (out / "obj.bin").read_bytes() == data
    assert result.size == size and result.parts == 10
    assert (result.parts_fetched, result.parts_reused, result.restarts) == (10, 0, 0)
    assert result.bytes_fetched == size
    assert result.etag == meta.etag and result.crc64 == meta.crc64
    assert result.verified_by == "crc64"
    assert result.elapsed > 0
    assert progress.calls[0] == (0, 0, size)
    assert progress.calls[-1][1] == size
    assert part_calls[0] == (0, 10) and part_calls[-1] == (10, 10)
    assert [d for d, _ in part_calls] == sorted(d for d, _ in part_calls)
    assert notices == []
    assert leftovers(out) == []


async def test_api_resume_reports_reused_parts(
    srv: OssTestServer, client: HttpObjectClient, out: Path
) -> None:
    size = 10 * PART
    data = randbytes(size, seed=31)
    srv.put(BUCKET, "resume.bin", data)
    srv.faults.add(
        Fault(
            "status", status=503, op="get", key="resume.bin", when=starting_at_or_after(6 * PART)
        ),
        times=None,
    )
    with pytest.raises(TransferError):
        await download(client, api_request(out, "resume.bin", threads=1))
    srv.faults.clear()
    assert recorded_parts(only_checkpoint(out)) == set(range(6))
    progress = Progress()
    result = await download(client, api_request(out, "resume.bin", threads=3, progress=progress))
    assert (result.parts, result.parts_reused, result.parts_fetched) == (10, 6, 4)
    assert result.bytes_fetched == 4 * PART
    assert result.verified_by == "crc64"
    assert progress.calls[0] == (0, 6 * PART, size)
    assert progress.calls[-1][1] == size
    assert (out / "resume.bin").read_bytes() == data
    assert leftovers(out) == []


async def test_api_without_checkpoint_cleans_up_on_failure(
    srv: OssTestServer, client: HttpObjectClient, out: Path
) -> None:
    srv.put(BUCKET, "nock.bin", randbytes(5 * PART, seed=32))
    srv.faults.add(
        Fault("status", status=503, op="get", key="nock.bin", when=starting_at_or_after(3 * PART)),
        times=None,
    )
    with pytest.raises(TransferError):
        await download(client, api_request(out, "nock.bin", threads=1, enable_checkpoint=False))
    assert os.listdir(out) == []


async def test_api_range(srv: OssTestServer, client: HttpObjectClient, out: Path) -> None:
    data = randbytes(7 * PART, seed=33)
    srv.put(BUCKET, "rng.bin", data)
    result = await download(
        client, api_request(out, "rng.bin", range_start=PART + 3, range_end=5 * PART)
    )
    assert (out / "rng.bin").read_bytes() == data[PART + 3 : 5 * PART + 1]
    assert result.size == 4 * PART - 2
    assert result.verified_by == "parts"


async def test_api_range_end_is_a_byte_not_a_marker(
    srv: OssTestServer, client: HttpObjectClient, out: Path
) -> None:
    srv.put(BUCKET, "rng.bin", randbytes(PART, seed=33))
    with pytest.raises(UsageError, match="invalid range"):  # -1 does not mean "to the end"
        await download(client, api_request(out, "rng.bin", range_start=0, range_end=-1))
    assert os.listdir(out) == []
