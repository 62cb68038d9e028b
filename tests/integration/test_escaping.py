"""Hostile keys reach neither a terminal nor a log raw.

Keys with ESC sequences, C1 controls, bidi overrides and newlines that forge
a log line go through ``ossfs ls``, ``materialize --to`` (its messages and its
log) and a mount's log file: every output line is one line of ours, with no
raw control character in it, and the forged line never starts a line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ossfs.escape import printable
from ossfs.testing import Fault, OssTestServer
from tests.helpers import mounted, run_ossfs

BUCKET = "bkt"
FORGED = "1999-01-01 00:00:00,000 ERROR ossfs.fs: FORGED_LOG_LINE"
HOSTILE = [
    f"h/newline\n{FORGED}",
    "h/\x1b[31mred\x1b[0m\x1b]0;title\x07",
    "h/c1\x9b2J",
    "h/\u202egnp.exe",
    "h/cr\rover",
]
RAW = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def assert_clean(text: str, *, what: str) -> None:
    """No raw control character but the line ends; no line that a key forged."""
    assert not RAW.search(text), f"raw control character in {what}: {text!r}"
    for line in text.splitlines():
        assert not line.startswith("1999-"), f"forged line in {what}: {text!r}"
        assert "Traceback" not in line, text


@pytest.fixture
def srv(oss_server: OssTestServer) -> OssTestServer:
    for i, key in enumerate(HOSTILE):
        oss_server.put(BUCKET, key, f"content {i}\n".encode())
    oss_server.put(BUCKET, "h/plain.txt", b"plain\n")
    return oss_server


@pytest.mark.parametrize("flags", [[], ["-l"], ["-r"]], ids=["short", "long", "recursive"])
def test_ls_escapes_keys(srv: OssTestServer, oss_env: dict[str, str], flags: list[str]) -> None:
    result = run_ossfs("ls", f"oss://{BUCKET}/h/", *flags, "--endpoint", srv.url, env=oss_env)
    assert result.returncode == 0, result.stderr
    assert_clean(result.stdout, what="ls output")
    lines = result.stdout.splitlines()
    assert len(lines) == len(HOSTILE) + 1  # one line per object
    for key in HOSTILE:
        assert any(printable(key) in line for line in lines), (key, lines)
    assert any("h/plain.txt" in line for line in lines)


def test_materialize_escapes_keys_in_messages_and_log(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    # A key that cannot be a file name is reported; another fails to download.
    srv.put(BUCKET, f"h/skip\n{FORGED}/../x", b"unsafe\n")
    srv.faults.add(
        Fault(
            "status",
            status=403,
            code="AccessDenied",
            message=f"denied\n{FORGED}\x1b[31m",
            op="get",
            key=HOSTILE[1],
        ),
        times=None,
    )
    out = tmp_path / "out"
    out.mkdir()
    result = run_ossfs(
        "materialize",
        f"oss://{BUCKET}/h/",
        "--to",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--endpoint",
        srv.url,
        "-vv",
        env=oss_env,
    )
    assert result.returncode == 1, result.stderr
    assert_clean(result.stdout + result.stderr, what="materialize output")
    assert "skipping h/skip\\x0a1999-01-01" in result.stderr, result.stderr
    assert f"failed: oss://{BUCKET}/" + printable(HOSTILE[1]) in result.stderr, result.stderr
    written = {n.encode("utf-8", "surrogateescape") for n in os.listdir(out)}
    assert len(written) == len(HOSTILE)  # the names themselves are kept as they are


@pytest.mark.fuse
def test_mount_log_has_no_forged_line(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    srv.faults.add(
        Fault(
            "status",
            status=403,
            code="AccessDenied",
            message=f"denied\n{FORGED}",
            op="get",
            key=HOSTILE[0],
        ),
        times=None,
    )
    mnt = tmp_path / "mnt"
    log = tmp_path / "mount.log"
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        "--endpoint",
        srv.url,
        "--cache-dir",
        str(tmp_path / "cache"),
        env=oss_env,
        log=log,
    ):
        names = os.listdir(mnt / "h")
        assert len(names) == len(HOSTILE) + 1
        with pytest.raises(OSError):
            (mnt / HOSTILE[0]).read_bytes()
        assert (mnt / HOSTILE[2]).read_bytes() == b"content 2\n"
    text = log.read_text(errors="surrogateescape")
    assert "FORGED_LOG_LINE" in text  # the failure was logged, escaped
    assert_clean(text, what="the mount log")
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
    for line in text.splitlines():
        assert stamp.match(line) or line.startswith("    "), line
