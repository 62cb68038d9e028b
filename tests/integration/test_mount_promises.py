"""Promises of docs/semantics.md checked through a real mount of the OSS test server:
ownership and modes (``--uid``, ``--gid``, ``--umask``), and the errno a reader
gets when the service refuses (403 AccessDenied: EACCES) or the object is archived
(403 InvalidObjectState: EIO, with the code in the log).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ossfs.testing import Fault, OssTestServer, RequestInfo
from tests.helpers import mounted

pytestmark = pytest.mark.fuse

BUCKET = "promises"


@pytest.fixture
def server() -> Iterator[OssTestServer]:
    with OssTestServer(credentials={"ak": "sk"}) as srv:
        srv.put(BUCKET, "top.txt", b"top\n")
        srv.put(BUCKET, "dir/inner.bin", os.urandom(300 * 1024))
        srv.put(BUCKET, "secret/plans.txt", b"nobody reads this\n")
        srv.put(BUCKET, "cold/archived.bin", b"restore me first\n")
        yield srv


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return {**cli_env, "OSS_ACCESS_KEY_ID": "ak", "OSS_ACCESS_KEY_SECRET": "sk"}


def opts(server: OssTestServer, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--endpoint",
        server.url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--part-size",
        "100KiB",
        *extra,
    ]


def test_uid_gid_and_umask_apply_to_files_and_directories(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        *opts(server, tmp_path, "--uid", "4321", "--gid", "8765", "--umask", "027"),
        env=env,
    ):
        for path, kind, mode in [
            (mnt, stat.S_IFDIR, 0o750),
            (mnt / "dir", stat.S_IFDIR, 0o750),
            (mnt / "top.txt", stat.S_IFREG, 0o640),
            (mnt / "dir" / "inner.bin", stat.S_IFREG, 0o640),
        ]:
            st = os.stat(path)
            assert stat.S_IFMT(st.st_mode) == kind, path
            assert stat.S_IMODE(st.st_mode) == mode, (path, oct(st.st_mode))
            assert (st.st_uid, st.st_gid) == (4321, 8765), path
        assert (mnt / "top.txt").read_bytes() == b"top\n"  # root reads whatever the modes


def test_default_ownership_and_modes(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    with mounted(f"oss://{BUCKET}", mnt, *opts(server, tmp_path), env=env):
        for path, mode in [(mnt / "dir", 0o555), (mnt / "dir" / "inner.bin", 0o444)]:
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == mode, (path, oct(st.st_mode))
            assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), path


def test_access_denied_is_eacces(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    # The listing shows the file; its GETs are refused (a bucket policy on secret/).
    server.faults.add(
        Fault(
            "status",
            op="get",
            key="secret/plans.txt",
            status=403,
            code="AccessDenied",
            message="denied by bucket policy",
        ),
        times=None,
    )

    def listing_of_locked(info: RequestInfo) -> bool:
        return any(name == "prefix" and value == "locked/" for name, value in info.query)

    server.put(BUCKET, "locked/a.txt", b"a\n")
    server.faults.add(
        Fault("status", op="list", status=403, code="AccessDenied", when=listing_of_locked),
        times=None,
    )
    mnt = tmp_path / "m"
    log = tmp_path / "log"
    with mounted(f"oss://{BUCKET}", mnt, *opts(server, tmp_path), env=env, log=log):
        assert os.stat(mnt / "secret" / "plans.txt").st_size == 18
        with pytest.raises(OSError) as e:
            (mnt / "secret" / "plans.txt").read_bytes()
        assert e.value.errno == errno.EACCES
        with pytest.raises(OSError) as e:
            os.listdir(mnt / "locked")
        assert e.value.errno == errno.EACCES
        assert (mnt / "top.txt").read_bytes() == b"top\n"  # the rest of the mount works
    text = log.read_text()
    assert "AccessDenied" in text and "Traceback" not in text


def test_archived_object_is_eio_with_the_code_in_the_log(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    # An Archive-class object that was not restored: OSS lists it and answers its
    # GET with 403 InvalidObjectState.
    server.faults.add(
        Fault(
            "status",
            op="get",
            key="cold/archived.bin",
            status=403,
            code="InvalidObjectState",
            message="The operation is not valid for the object's state",
        ),
        times=None,
    )
    mnt = tmp_path / "m"
    log = tmp_path / "log"
    with mounted(f"oss://{BUCKET}", mnt, *opts(server, tmp_path), env=env, log=log):
        with pytest.raises(OSError) as e:
            (mnt / "cold" / "archived.bin").read_bytes()
        assert e.value.errno == errno.EIO
        assert (mnt / "top.txt").read_bytes() == b"top\n"
    text = log.read_text()
    assert "InvalidObjectState" in text and "Traceback" not in text
