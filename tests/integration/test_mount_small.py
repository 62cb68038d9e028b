"""Many small objects through a real mount: one listing per directory, one cache file per
object, no HEAD per open, and a remount that reads the cache it left."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ossfs.testing import OssTestServer
from tests.helpers import mounted

pytestmark = pytest.mark.fuse

BUCKET = "many"
DIRS = 12
PER_DIR = 40


@pytest.fixture(params=[True, False], ids=["crc", "no-crc"])
def server(request: pytest.FixtureRequest) -> Iterator[OssTestServer]:
    with OssTestServer(credentials={"ak": "sk"}, crc=request.param) as srv:
        rng = random.Random(5)
        for d in range(DIRS):
            for f in range(PER_DIR):
                srv.put(BUCKET, f"tree/d{d:02d}/f{f:03d}.txt", rng.randbytes(rng.randint(1, 6000)))
        srv.put(BUCKET, "tree/empty", b"")
        yield srv


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return dict(cli_env, OSS_ACCESS_KEY_ID="ak", OSS_ACCESS_KEY_SECRET="sk")


def _names() -> list[str]:
    return [f"tree/d{d:02d}/f{f:03d}.txt" for d in range(DIRS) for f in range(PER_DIR)]


def _cache_files(cache: Path) -> tuple[list[Path], list[Path]]:
    everything = list((cache / "objects").rglob("*"))
    small = [p for p in everything if p.is_file() and p.name.endswith(".o")]
    other = [p for p in everything if p.is_file() and not p.name.endswith(".o")]
    return small, other


def test_many_small_objects(server: OssTestServer, tmp_path: Path, env: dict[str, str]) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    opts = ["--endpoint", server.url, "--cache-dir", str(cache)]
    names = _names()
    order = names[:]
    random.Random(9).shuffle(order)
    with mounted(f"oss://{BUCKET}", mnt, *opts, env=env):
        server.reset_stats()

        def read(name: str) -> bool:
            return (mnt / name).read_bytes() == server.get(BUCKET, name)

        # 8 threads open every file in random order on a fresh mount.
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(read, order))
        assert (mnt / "tree" / "empty").read_bytes() == b""
        stats = server.stats
        # One listing per directory (and the root and tree/), not one per name.
        assert stats.count(op="list") <= DIRS + 2
        assert stats.count(op="get") == len(names)
        heads = stats.count(op="head")
        assert heads <= 3  # at most a few, to learn that a service has no CRC-64
        # Warm: every file again, with the page cache dropped: no request at all.
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
        server.reset_stats()
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(read, order))
        assert server.stats.count() == 0
        doc = json.loads(os.getxattr(mnt, "user.ossfs.status"))
        assert doc["fs_requests"]["open"] >= 2 * len(names)
        # A close costs no FLUSH round trip: the kernel is told once that there is none
        # (closes already on their way then still arrive: one per thread at most).
        assert doc["fs_requests"].get("flush", 0) <= 8
    # `ls -l` costs no round trip per entry: not even for the two extended attributes it
    # asks every file for (security.selinux, system.posix_acl_access).
    with mounted(f"oss://{BUCKET}", mnt, *opts, env=env):
        before = json.loads(os.getxattr(mnt, "user.ossfs.status"))["fs_requests"]
        ls = subprocess.run(
            ["ls", "-l", str(mnt / "tree" / "d03")], capture_output=True, text=True, check=True
        )
        assert len(ls.stdout.splitlines()) == PER_DIR + 1
        after = json.loads(os.getxattr(mnt, "user.ossfs.status"))["fs_requests"]
        assert after.get("getxattr", 0) - before.get("getxattr", 0) <= 4
        assert after.get("getattr", 0) - before.get("getattr", 0) <= 2
        assert after.get("lookup", 0) - before.get("lookup", 0) <= 2
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "tree" / "d03" / "f000.txt", "security.selinux")
        assert e.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "tree" / "d03" / "f000.txt", "user.other")
        assert e.value.errno == errno.ENODATA
    # One file per small object in the cache, no directories or indexes.
    small, other = _cache_files(cache)
    assert len(small) == len(names) + 1 and other == []
    # A remount reads what the last one cached: no GET, and no HEAD per open.
    server.reset_stats()
    with mounted(f"oss://{BUCKET}", mnt, *opts, env=env):
        for name in names:
            assert (mnt / name).read_bytes() == server.get(BUCKET, name)
        stats = server.stats
        assert stats.count(op="get") == 0
        assert stats.count(op="list") <= DIRS + 3  # and the mount's first one-key LIST
        # The cache file says its bytes matched the service's CRC-64 when fetched: no
        # HEAD to compare again (a service without CRC-64s is asked 3 times).
        assert stats.count(op="head") <= 3
