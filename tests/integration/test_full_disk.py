"""A disk that fills up during ``download`` and ``materialize``, on a real small tmpfs.

The disk fills at a chosen moment: when the test server receives the GET of
a chosen part, a hook writes a filler file until the tmpfs refuses more.
Proved here:

- ``download`` stops with one line naming the file that could not be written
  and "no space left on device", exit 1, and keeps its temp file and
  checkpoint; after the filler is removed the same command finishes with the
  exact bytes and fetches exactly the parts the checkpoint did not record.
- The same when only the checkpoint directory is full: the index append that
  fails stops the run cleanly, a record torn by the full disk is ignored, and
  the rerun fetches exactly what the index does not hold.
- ``materialize --to`` on a full disk stops with one line naming the output
  file, leaves no temp file, and the rerun (after space is freed) writes
  everything out from the cache without fetching anything again; a full cache
  disk stops it the same way, and the rerun fetches only what is missing.

Needs root (it mounts tmpfs); skipped otherwise.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ossfs.testing import Fault, OssTestServer, RequestInfo
from tests.integration.conftest import settled_stats
from tests.integration.test_download import (
    BUCKET,
    PART,
    error_line,
    get_starts,
    leftovers,
    only_checkpoint,
    oss_download,
    randbytes,
    recorded_parts,
    starting_at_or_after,
    summary,
)
from tests.integration.test_materialize import cached_parts, materialize, succeeded

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


class SmallDisk:
    """A tmpfs of a few MiB mounted at *path*; `fill` takes all of its free space."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.filler = path / "filler"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        chunk = b"\0" * (64 * KiB)
        try:
            while True:
                os.write(fd, chunk)  # short writes too, until not one byte fits
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()

    def grow(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        for args in (["umount", str(self.path)], ["umount", "-l", str(self.path)]):
            if subprocess.run(args, capture_output=True).returncode == 0:
                return


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], SmallDisk]]:
    disks: list[SmallDisk] = []

    def make(size: str) -> SmallDisk:
        disk = SmallDisk(tmp_path / f"small{len(disks)}", size)
        disks.append(disk)
        return disk

    try:
        yield make
    finally:
        for disk in disks:
            disk.unmount()


def fill_on_get(server: OssTestServer, disk: SmallDisk, key: str, offset: int) -> None:
    """Fill *disk* when the GET of *key* starting at *offset* or later arrives (once)."""
    starting = starting_at_or_after(offset)
    filled: list[bool] = []

    def hook(info: RequestInfo) -> bool:
        if not filled and starting(info):
            filled.append(True)
            disk.fill()
        return False  # never a fault: the request is served as usual

    server.faults.add(Fault("status", op="get", key=key, when=hook), times=None)


@pytest.fixture
def srv(oss_server: OssTestServer) -> OssTestServer:
    oss_server.create_bucket(BUCKET)
    return oss_server


# ---------------------------------------------------------------------- download


def test_download_to_a_full_disk_stops_and_resumes(
    srv: OssTestServer, oss_env: dict[str, str], small_disk: Callable[[str], SmallDisk]
) -> None:
    disk = small_disk("4m")
    parts = 30
    data = randbytes(parts * PART - 99, seed=7)
    srv.put(BUCKET, "big.bin", data)
    dest = disk.path / "big.bin"
    temp = disk.path / "big.bin.ossfs-tmp"
    fill_on_get(srv, disk, "big.bin", 10 * PART)
    args = (f"oss://{BUCKET}/big.bin", str(dest), "--part-size", str(PART), "--threads", "1")
    result = oss_download(srv, oss_env, *args)
    srv.faults.clear()
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr)
    assert f"no space left on device writing {temp}" in line, line
    assert "checkpoint is kept" in line, line
    assert not dest.exists() and temp.exists()
    assert recorded_parts(only_checkpoint(disk.path)) == set(range(10))

    disk.free()
    before = len(get_starts(srv, "big.bin"))
    summary(oss_download(srv, oss_env, *args))
    assert dest.read_bytes() == data
    assert get_starts(srv, "big.bin", before) == [p * PART for p in range(10, parts)]
    assert leftovers(disk.path) == []


def test_download_larger_than_the_free_space_fetches_nothing(
    srv: OssTestServer, oss_env: dict[str, str], small_disk: Callable[[str], SmallDisk]
) -> None:
    disk = small_disk("1m")
    srv.put(BUCKET, "huge.bin", randbytes(2 * MiB, seed=9))
    temp = disk.path / "huge.bin.ossfs-tmp"
    result = oss_download(
        srv,
        oss_env,
        f"oss://{BUCKET}/huge.bin",
        str(disk.path / "huge.bin"),
        "--part-size",
        str(PART),
    )
    assert result.returncode == 1, result.stderr
    assert f"no space left for {temp}: 2.0 MiB more needed" in error_line(result.stderr)
    assert get_starts(srv, "huge.bin") == []


def test_download_with_a_full_checkpoint_disk(
    srv: OssTestServer,
    oss_env: dict[str, str],
    small_disk: Callable[[str], SmallDisk],
    tmp_path: Path,
) -> None:
    disk = small_disk("1m")
    parts = 140  # the index outgrows its first 4 KiB page after about 100 records
    data = randbytes(parts * PART, seed=8)
    srv.put(BUCKET, "many.bin", data)
    out = tmp_path / "out"
    out.mkdir()
    fill_on_get(srv, disk, "many.bin", 40 * PART)
    args = (
        f"oss://{BUCKET}/many.bin",
        str(out / "many.bin"),
        "--part-size",
        str(PART),
        "--threads",
        "1",
        "--checkpoint-dir",
        str(disk.path),
    )
    result = oss_download(srv, oss_env, *args)
    srv.faults.clear()
    assert result.returncode == 1, result.stderr
    ckpt = only_checkpoint(disk.path)
    line = error_line(result.stderr)
    assert f"no space left on device writing {ckpt}" in line, line
    recorded = recorded_parts(ckpt)
    assert recorded == set(range(len(recorded))) and 40 < len(recorded) < parts - 1

    disk.free()
    before = len(get_starts(srv, "many.bin"))
    summary(oss_download(srv, oss_env, *args))
    assert (out / "many.bin").read_bytes() == data
    assert get_starts(srv, "many.bin", before) == [
        p * PART for p in range(parts) if p not in recorded
    ]
    assert leftovers(out) == [] and leftovers(disk.path) == []


# ---------------------------------------------------------------------- materialize


def test_materialize_to_a_full_disk_stops_and_resumes(
    oss_server: OssTestServer,
    oss_env: dict[str, str],
    small_disk: Callable[[str], SmallDisk],
    tmp_path: Path,
) -> None:
    disk = small_disk("4m")
    objects = {f"set/f{i}.bin": randbytes(1200 * KiB + i, seed=10 + i) for i in range(4)}
    for key, body in objects.items():
        oss_server.put(BUCKET, key, body)
    cache = tmp_path / "cache"
    result = materialize(oss_server, oss_env, f"oss://{BUCKET}/set/", cache, "--to", str(disk.path))
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr)
    assert f"no space left on device writing {disk.path}/f" in line, line
    names = os.listdir(disk.path)
    assert not [n for n in names if n.endswith(".ossfs-tmp")], names
    for name in names:  # what was written is whole
        assert (disk.path / name).read_bytes() == objects[f"set/{name}"]
    assert len(names) < len(objects)
    gets_before = len(settled_stats(oss_server).gets)

    disk.grow("16m")
    succeeded(
        materialize(oss_server, oss_env, f"oss://{BUCKET}/set/", cache, "--to", str(disk.path))
    )
    assert {f"set/{n}": (disk.path / n).read_bytes() for n in os.listdir(disk.path)} == objects
    assert len(settled_stats(oss_server).gets) == gets_before  # all from the cache


def test_materialize_into_a_full_cache_disk(
    oss_server: OssTestServer, oss_env: dict[str, str], small_disk: Callable[[str], SmallDisk]
) -> None:
    disk = small_disk("4m")
    objects = {f"c/o{i}.bin": randbytes(15 * PART + 1 + i, seed=20 + i) for i in range(4)}
    for key, body in objects.items():
        oss_server.put(BUCKET, key, body)
    cache = disk.path / "cache"
    # Each object is one GET (a run of its 16 parts): the disk fills when the second
    # GET arrives.
    seen: list[str] = []

    def fill_on_second(info: RequestInfo) -> bool:
        seen.append(info.key)
        if len(seen) == 2:
            disk.fill()
        return False  # never a fault: the request is served as usual

    oss_server.faults.add(Fault("status", op="get", key=None, when=fill_on_second), times=None)
    result = materialize(
        oss_server, oss_env, f"oss://{BUCKET}/c/", cache, "--threads", "1", "--cache-min-free", "0"
    )
    oss_server.faults.clear()
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr)
    assert f"no space left on device writing the cache {cache}" in line, line
    have = cached_parts(cache)
    assert have.get(seen[0]) == 16, (have, seen)
    assert sum(have.values()) == 16, have  # nothing of the object whose GET hit a full disk
    gets_before = len(settled_stats(oss_server).gets)

    disk.free()
    succeeded(materialize(oss_server, oss_env, f"oss://{BUCKET}/c/", cache, "--threads", "1"))
    stats = settled_stats(oss_server)
    # Only what was missing, each byte once.
    again = stats.gets[gets_before:]
    assert {r.key for r in again} == set(objects) - {seen[0]}
    assert sum(r.bytes_sent for r in again) == sum(
        len(body) for key, body in objects.items() if key != seen[0]
    )
    assert set(cached_parts(cache).values()) == {16}


def test_materialize_to_another_file_system(
    oss_server: OssTestServer,
    oss_env: dict[str, str],
    small_disk: Callable[[str], SmallDisk],
    tmp_path: Path,
) -> None:
    """The cache and DIR on different file systems (copy_file_range may refuse: EXDEV)."""
    disk = small_disk("16m")
    objects = {"x/a.bin": randbytes(3 * PART + 7, seed=30), "x/b/c.txt": b"see\n"}
    for key, body in objects.items():
        oss_server.put(BUCKET, key, body)
    succeeded(
        materialize(
            oss_server, oss_env, f"oss://{BUCKET}/x/", tmp_path / "cache", "--to", str(disk.path)
        )
    )
    assert (disk.path / "a.bin").read_bytes() == objects["x/a.bin"]
    assert (disk.path / "b" / "c.txt").read_bytes() == b"see\n"
