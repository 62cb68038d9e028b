"""A real mount whose cache is smaller than the objects it reads: every byte still
the object's, the object fetched about once, and the cache directory within its cap.

The FUSE counterpart of tests/unit/test_read_path.py: the kernel's own read
sizes, its concurrent read-ahead requests, mmap page faults and several
processes at once, against the OSS-dialect test server that counts the bytes it
sends.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ossfs.testing import OssTestServer
from tests.helpers import mounted

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


def cache_disk_bytes(root: Path) -> int:
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512
               for d, _, files in os.walk(root) for f in files if f == "data")


def cmp(a: Path, b: Path) -> None:
    result = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("cap", "part"), [("8MiB", "1MiB"), ("8MiB", "16MiB"),
                                           ("12MiB", "4MiB"), ("20MiB", "8MiB")])
def test_cmp_through_a_cache_smaller_than_the_object(
        server: OssTestServer, env: dict[str, str], source: Path, tmp_path: Path,
        cap: str, part: str) -> None:
    cache = tmp_path / "cache"
    with mounted(f"oss://{BUCKET}", tmp_path / "m", "--endpoint", server.url,
                 "--cache-dir", str(cache), "--cache-size", cap, "--part-size", part,
                 "--threads", str(THREADS), env=env, log=tmp_path / "log"):
        cmp(tmp_path / "m/big/huge.bin", source)
        sent = server.stats.bytes_sent
        assert sent <= 1.25 * SIZE, f"the server sent {sent / SIZE:.2f}x the object"
    part_bytes = int(part.removesuffix("MiB")) * MiB
    cap_bytes = int(cap.removesuffix("MiB")) * MiB
    assert cache_disk_bytes(cache) <= cap_bytes + THREADS * part_bytes


def test_concurrent_readers_and_mmap_through_a_small_cache(
        server: OssTestServer, env: dict[str, str], source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with mounted(f"oss://{BUCKET}", tmp_path / "m", "--endpoint", server.url,
                 "--cache-dir", str(cache), "--cache-size", "10MiB", "--part-size", "2MiB",
                 "--threads", str(THREADS), env=env, log=tmp_path / "log"):
        target = tmp_path / "m/big/huge.bin"
        # Two whole-file readers and one from the middle, at the same time.
        procs = [subprocess.Popen(["cmp", str(target), str(source)]) for _ in range(2)]
        procs.append(subprocess.Popen(
            ["cmp", "-i", f"{SIZE // 2}:{SIZE // 2}", str(target), str(source)]))
        # Meanwhile, page faults through a shared mapping, in strides, in another
        # process (the test server runs in this one: a fault that waits for it while
        # holding this process's GIL would wait forever).
        procs.append(subprocess.Popen([sys.executable, "-c", MMAP_READER, str(target),
                                       str(source)]))
        for p in procs:
            assert p.wait(timeout=300) == 0
    assert cache_disk_bytes(cache) <= 10 * MiB + THREADS * 2 * MiB
