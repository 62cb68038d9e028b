"""A real mount whose cache is smaller than the objects it reads: every byte still
the object's, the object fetched about once, and the cache directory within its cap.

The FUSE counterpart of tests/unit/test_read_path.py: the kernel's own read
sizes, its concurrent read-ahead requests, mmap page faults and several
processes at once, against the OSS-dialect test server that counts the bytes it
sends.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ossfs.cache.cachedir import CacheDir, object_identity
from ossfs.crc import crc64
from ossfs.testing import Fault, OssTestServer
from tests.helpers import disk_bytes, mounted, run_ossfs
from tests.integration.conftest import settled_stats

pytestmark = pytest.mark.fuse

MiB = 1 << 20
BUCKET = "integrity"
SIZE = 48 * MiB + 12345
THREADS = 8


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "huge.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def server(source: Path) -> Iterator[OssTestServer]:
    with OssTestServer(credentials={"ak": "sk"}) as srv:
        srv.put(BUCKET, "big/huge.bin", source.read_bytes())
        yield srv


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return {**cli_env, "OSS_ACCESS_KEY_ID": "ak", "OSS_ACCESS_KEY_SECRET": "sk"}


MMAP_READER = """
import mmap, sys
want = open(sys.argv[2], "rb").read()
with open(sys.argv[1], "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
    for off in range(0, len(want), 3 * 2**20 + 4097):
        if m[off:off + 65536] != want[off:off + 65536]:
            sys.exit(f"mmap read at {off} differs")
"""


def cmp(a: Path, b: Path) -> None:
    result = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def readers_at_once(target: Path, source: Path) -> None:
    """Two whole-file readers, one from the middle, and page faults through a shared
    mapping in strides, all at once; each compares every byte it reads with *source*.

    The mmap reader is another process: the test server runs in this one, and a fault
    that waits for it while holding this process's GIL would wait forever."""
    procs = [subprocess.Popen(["cmp", str(target), str(source)]) for _ in range(2)]
    procs.append(
        subprocess.Popen(["cmp", "-i", f"{SIZE // 2}:{SIZE // 2}", str(target), str(source)])
    )
    procs.append(subprocess.Popen([sys.executable, "-c", MMAP_READER, str(target), str(source)]))
    for p in procs:
        assert p.wait(timeout=300) == 0


@pytest.mark.parametrize(
    ("cap", "part"), [("8MiB", "1MiB"), ("8MiB", "16MiB"), ("12MiB", "4MiB"), ("20MiB", "8MiB")]
)
def test_cmp_through_a_cache_smaller_than_the_object(
    server: OssTestServer, env: dict[str, str], source: Path, tmp_path: Path, cap: str, part: str
) -> None:
    cache = tmp_path / "cache"
    with mounted(
        f"oss://{BUCKET}",
        tmp_path / "m",
        "--endpoint",
        server.url,
        "--cache-dir",
        str(cache),
        "--cache-size",
        cap,
        "--part-size",
        part,
        "--threads",
        str(THREADS),
        env=env,
        log=tmp_path / "log",
    ):
        cmp(tmp_path / "m/big/huge.bin", source)
        sent = server.stats.bytes_sent
        assert sent <= 1.25 * SIZE, f"the server sent {sent / SIZE:.2f}x the object"
    part_bytes = int(part.removesuffix("MiB")) * MiB
    cap_bytes = int(cap.removesuffix("MiB")) * MiB
    assert disk_bytes(cache, name="data") <= cap_bytes + THREADS * part_bytes


def test_concurrent_readers_and_mmap_through_a_small_cache(
    server: OssTestServer, env: dict[str, str], source: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with mounted(
        f"oss://{BUCKET}",
        tmp_path / "m",
        "--endpoint",
        server.url,
        "--cache-dir",
        str(cache),
        "--cache-size",
        "10MiB",
        "--part-size",
        "2MiB",
        "--threads",
        str(THREADS),
        env=env,
        log=tmp_path / "log",
    ):
        readers_at_once(tmp_path / "m/big/huge.bin", source)
    assert disk_bytes(cache, name="data") <= 10 * MiB + THREADS * 2 * MiB


def _status(mnt: Path) -> dict[str, object]:
    return dict(json.loads(os.getxattr(mnt, "user.ossfs.status")))


def _wait_for_status(mnt: Path, field: str, at_least: int) -> dict[str, object]:
    for _ in range(100):
        st = _status(mnt)
        value = st.get(field)
        if isinstance(value, int) and value >= at_least:
            return st
        time.sleep(0.1)
    raise AssertionError(f"status {field} never reached {at_least}: {st}")


@pytest.mark.parametrize("behind", [False, True], ids=["cached", "disk-behind"])
def test_a_corrupted_body_is_not_cached_for_good(
    server: OssTestServer, env: dict[str, str], tmp_path: Path, behind: bool
) -> None:
    """The first GET flips a byte (headers intact): the first read cannot know, but
    once the object is complete its CRC-64 differs from the service's, the parts and
    the kernel's pages of them are dropped, and with the server behaving the next
    reads are exact. (Only the first GET is damaged: while every GET is, what is
    fetched after the check is damaged again, and caught at the next completion.) The
    mismatch is counted once: two checks of the same parts once counted it twice.

    With the cache disk behind, nothing is cached: the check combines the CRC-64s of
    what arrived for the parts served from memory, and none of them is read again."""
    # More than one part (objects of up to 8 MiB are one), so that read-ahead runs
    # complete it.
    data = os.urandom(12 * MiB + 3)
    key = f"flip-{behind}.bin"
    server.put(BUCKET, key, data)
    server.faults.add(Fault("corrupt", op="get", key=key, offset=1000), times=1)
    mnt = tmp_path / "m"
    cache = tmp_path / "cache"
    stand_ins = _behind(tmp_path, "machine", behind=True) if behind else {}
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        "--endpoint",
        server.url,
        "--cache-dir",
        str(cache),
        "--part-size",
        "1MiB",
        env={**env, **stand_ins},
        log=tmp_path / "log",
    ):
        with contextlib.suppress(OSError):  # EIO is a fine answer too
            (mnt / key).read_bytes()
        _wait_for_status(mnt, "crc_mismatches", 1)
        server.faults.clear()
        assert (mnt / key).read_bytes() == data
        assert (mnt / key).read_bytes() == data
        st = _status(mnt)
        assert st["crc_mismatches"] == 1
        if behind:
            assert int(st["memory_bytes"]) >= 2 * len(data)  # type: ignore[call-overload]
            assert disk_bytes(cache, name="data") == 0
    assert "CRC-64 mismatch" in (tmp_path / "log").read_text()


def test_complete_cached_bytes_are_checked_against_the_service_on_open(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    """A complete object in the cache whose parts match their own records but not the
    object (written by a run that never saw the service's CRC-64): the first open
    compares the whole, drops it, and the bytes read after that are the object's."""
    data = os.urandom(10 * MiB)  # more than one part at 1 MiB (`one_part_limit`)
    meta = server.put(BUCKET, "stale.bin", data)
    cache_dir = tmp_path / "cache"
    cache = CacheDir(str(cache_dir), max_bytes=1 << 30)
    store = cache.acquire(object_identity(BUCKET, "stale.bin", meta.etag, len(data), MiB))
    assert store.layout.count == 10
    bad = bytearray(data)
    bad[MiB + 5] ^= 0xFF
    for part in range(10):
        chunk = bytes(bad[part * MiB : (part + 1) * MiB])
        store.write(part * MiB, chunk)
        store.commit(part, crc64(chunk))
    cache.release(store)
    cache.close()
    mnt = tmp_path / "m"
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        "--endpoint",
        server.url,
        "--cache-dir",
        str(cache_dir),
        "--part-size",
        "1MiB",
        env=env,
        log=tmp_path / "log",
    ):
        with open(mnt / "stale.bin", "rb"):
            _wait_for_status(mnt, "crc_mismatches", 1)
        assert (mnt / "stale.bin").read_bytes() == data
    assert "CRC-64 mismatch" in (tmp_path / "log").read_text()


def test_a_cache_of_the_earlier_default_part_size_is_read_without_fetching(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    """A large object cached at 8 MiB parts (the default of earlier versions) is read
    through a mount at today's default part size with no GET."""
    data = os.urandom(20 * MiB + 7)
    meta = server.put(BUCKET, "earlier.bin", data)
    cache_dir = tmp_path / "cache"
    cache = CacheDir(str(cache_dir), max_bytes=1 << 30)
    store = cache.acquire(object_identity(BUCKET, "earlier.bin", meta.etag, len(data), 8 * MiB))
    for part in range(store.layout.count):
        first, end = store.layout.bounds(part)
        store.write(first, data[first:end])
        store.commit(part, crc64(data[first:end]))
    cache.release(store)
    cache.close()
    before = len(settled_stats(server).gets)
    mnt = tmp_path / "m"
    with mounted(
        f"oss://{BUCKET}", mnt, "--endpoint", server.url, "--cache-dir", str(cache_dir), env=env
    ):
        assert (mnt / "earlier.bin").read_bytes() == data
        assert (
            os.getxattr(mnt / "earlier.bin", "user.ossfs.cached_bytes") == str(len(data)).encode()
        )
    assert [g.key for g in settled_stats(server).gets[before:]] == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs for the cache (unmounted afterwards)."""
    path = tmp_path / "tiny"
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("cap", [None, "8MiB"])
def test_a_cache_disk_smaller_than_the_object(
    server: OssTestServer,
    env: dict[str, str],
    source: Path,
    tmp_path: Path,
    tiny_disk: Path,
    cap: str | None,
) -> None:
    """48 MiB through a 16 MiB disk, default read-ahead: exact bytes, the mount
    stays up, the free-space floor holds, and closing files (index compaction)
    on the full disk is harmless."""
    opts = [
        "--endpoint",
        server.url,
        "--cache-dir",
        str(tiny_disk / "cache"),
        "--part-size",
        "4MiB",
        *(["--cache-size", cap] if cap else []),
    ]
    mnt = tmp_path / "m"
    with mounted(f"oss://{BUCKET}", mnt, *opts, env=env, log=tmp_path / "log") as info:
        for _ in range(2):
            cmp(mnt / "big/huge.bin", source)
        st = os.statvfs(tiny_disk)
        assert st.f_bavail * st.f_frsize >= 0.05 * st.f_blocks * st.f_frsize - 4096
        assert _status(mnt)["pid"] == info["pid"]  # still the same, living daemon
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_a_full_cache_disk_serves_from_the_network(
    server: OssTestServer, env: dict[str, str], source: Path, tmp_path: Path, tiny_disk: Path
) -> None:
    """Something else filled the cache's disk: nothing can be evicted, so reads are
    served from the network without caching (counted), still exact."""
    (tiny_disk / "ballast").write_bytes(b"\xff" * (15 * MiB))
    mnt = tmp_path / "m"
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        "--endpoint",
        server.url,
        "--cache-dir",
        str(tiny_disk / "cache"),
        "--part-size",
        "1MiB",
        env=env,
        log=tmp_path / "log",
    ):
        cmp(mnt / "big/huge.bin", source)
        assert int(_status(mnt)["uncached_bytes"]) >= SIZE // 2  # type: ignore[call-overload]
    assert "served from the network" in (tmp_path / "log").read_text()


def test_cache_min_free_keeps_that_much_of_the_disk_free(
    server: OssTestServer, env: dict[str, str], source: Path, tmp_path: Path, tiny_disk: Path
) -> None:
    """--cache-min-free 0.5 on a 16 MiB disk: the cache stops at 8 MiB free (not the
    default 5%), reads stay exact, and the cache still holds what fits."""
    mnt = tmp_path / "m"
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        "--endpoint",
        server.url,
        "--cache-dir",
        str(tiny_disk / "cache"),
        "--part-size",
        "1MiB",
        "--cache-min-free",
        "0.5",
        env=env,
        log=tmp_path / "log",
    ):
        cmp(mnt / "big/huge.bin", source)
        st = os.statvfs(tiny_disk)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        assert free >= 0.5 * total - 4096, (free, total)
        # It did cache, up to the floor.
        assert disk_bytes(tiny_disk / "cache", name="data") >= 2 * MiB
    assert "Traceback" not in (tmp_path / "log").read_text()


def _behind(tmp_path: Path, where: str, *, behind: bool) -> dict[str, str]:
    """Stand-ins for /proc/meminfo and the daemon's memory cgroup (read by the mount
    through OSSFS_MEMINFO and OSSFS_CGROUP): dirty pages far past the kernel's free-run
    ceiling of the machine or of the cgroup (the cache disk is behind), or none. The
    environment that points the mount at them."""
    machine = behind and where == "machine"
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        f"MemFree: {1 << 24} kB\nActive(file): 0 kB\nInactive(file): 0 kB\n"
        f"Dirty: {1 << 30 if machine else 0} kB\nWriteback: 0 kB\n"
    )
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir(exist_ok=True)
    (cgroup / "memory.max").write_text(f"{1 << 30}\n")
    (cgroup / "memory.high").write_text("max\n")
    # At its limit, all 1 GiB of it file pages: all dirty is past any ceiling.
    (cgroup / "memory.current").write_text(f"{1 << 30}\n")
    dirty = 1 << 30 if behind and where == "cgroup" else 0
    (cgroup / "memory.stat").write_text(
        f"active_file {1 << 30}\ninactive_file 0\nfile_dirty {dirty}\nfile_writeback 0\n"
    )
    return {"OSSFS_MEMINFO": str(meminfo), "OSSFS_CGROUP": str(cgroup)}


@pytest.mark.parametrize("where", ["machine", "cgroup"])
def test_a_cache_disk_that_is_behind_serves_readers_from_memory(
    server: OssTestServer, env: dict[str, str], source: Path, tmp_path: Path, where: str
) -> None:
    """While the disk is behind (the dirty pages of the machine, or of the daemon's
    memory cgroup, near the kernel's ceiling), reads are exact, fetched once, served
    from memory within its budget and not written to the cache; once it has caught up,
    reads are cached again."""
    stand_ins = _behind(tmp_path, where, behind=True)
    cache = tmp_path / "cache"
    mnt = tmp_path / "m"
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        "--endpoint",
        server.url,
        "--cache-dir",
        str(cache),
        "--part-size",
        "1MiB",
        "--memory-budget",
        "16MiB",
        "--threads",
        str(THREADS),
        env={**env, **stand_ins},
        log=tmp_path / "log",
    ):
        target = mnt / "big/huge.bin"
        cmp(target, source)
        sent = server.stats.bytes_sent
        assert sent <= 1.1 * SIZE, f"the server sent {sent / SIZE:.2f}x the object"
        readers_at_once(target, source)
        st = _status(mnt)
        assert int(st["memory_bytes"]) >= SIZE  # type: ignore[call-overload]
        # The budget, plus the parts of the reads in progress (the kernel sends a
        # handful at once per reader).
        peak = int(st["memory_peak_bytes"])  # type: ignore[call-overload]
        assert 0 < peak <= 16 * MiB + 4 * 8 * MiB, peak
        assert disk_bytes(cache, name="data") == 0  # nothing was written while the disk was behind
        assert st["cache_disk_behind"] is True
        assert st["dirty_cgroup"] == stand_ins["OSSFS_CGROUP"]
        shown = run_ossfs("status", str(mnt), env=env, check=True).stdout
        assert "behind now" in shown and stand_ins["OSSFS_CGROUP"] in shown, shown

        _behind(tmp_path, where, behind=False)
        time.sleep(0.2)  # (the mount looks at most every 50 ms)
        fd = os.open(target, os.O_RDONLY)
        try:  # the kernel's pages of the file would answer the next read themselves
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        cmp(target, source)
        assert disk_bytes(cache, name="data") >= SIZE - MiB
        assert _status(mnt)["cache_disk_behind"] is False
    assert "Traceback" not in (tmp_path / "log").read_text()
