"""One version per open file, across opens and processes: an object replaced while
one open still reads it never lends that open's pages to a later open of the new
version, nor the other way round (a real mount; the kernel page cache is per inode).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ossfs.testing import OssTestServer
from tests.helpers import mounted

pytestmark = pytest.mark.fuse

MiB = 1 << 20
BUCKET = "versions"


@pytest.fixture
def server() -> Iterator[OssTestServer]:
    with OssTestServer(credentials={"ak": "sk"}) as srv:
        yield srv


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return {**cli_env, "OSS_ACCESS_KEY_ID": "ak", "OSS_ACCESS_KEY_SECRET": "sk"}


def pread_all(fd: int, start: int, size: int, chunk: int = 128 * 1024) -> bytes:
    out = bytearray()
    for off in range(start, start + size, chunk):
        out += os.pread(fd, min(chunk, start + size - off), off)
    return bytes(out)


@pytest.mark.slow
def test_old_and_new_opens_each_read_one_version(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    # More than one part (objects of up to 8 MiB are one), so that the first open
    # caches only the start of the old version.
    old, new = os.urandom(12 * MiB), os.urandom(12 * MiB)
    server.put(BUCKET, "v.bin", old)
    with mounted(
        f"oss://{BUCKET}",
        tmp_path / "m",
        "--endpoint",
        server.url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--part-size",
        "1MiB",
        "--read-ahead",
        "2MiB",
        "--ttl",
        "1",
        env=env,
        log=tmp_path / "log",
    ):
        path = tmp_path / "m/v.bin"
        first = os.open(path, os.O_RDONLY)
        try:
            # The first open reads the start (its parts and read-ahead get cached).
            assert pread_all(first, 0, 2 * MiB) == old[: 2 * MiB]
            server.put(BUCKET, "v.bin", new)
            time.sleep(2.5)  # past the TTL: the next open looks the name up again
            second = os.open(path, os.O_RDONLY)
            try:
                assert os.fstat(first).st_ino != os.fstat(second).st_ino
                # The old open reads what it has cached again: if the two shared an
                # inode, these pages would now serve the second open.
                os.posix_fadvise(first, 0, 0, os.POSIX_FADV_DONTNEED)
                assert pread_all(first, 0, 2 * MiB) == old[: 2 * MiB]
                assert pread_all(second, 0, len(new)) == new
                # The old open never gets new bytes: cached old ones, or EIO.
                try:
                    got = pread_all(first, 0, len(old))
                except OSError as e:
                    assert e.errno == errno.EIO
                else:
                    assert got == old
            finally:
                os.close(second)
        finally:
            os.close(first)
        assert (path).read_bytes() == new
