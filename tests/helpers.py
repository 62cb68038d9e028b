"""Helpers for tests that run the ``ossfs`` command and mount for real."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

OSSFS = [sys.executable, "-m", "ossfs"]


def disk_bytes(root: str | os.PathLike[str], *, name: str | None = None) -> int:
    """What the files under *root* (only those called *name*) take on disk. A file that
    goes while they are counted (a writer or an evictor is running: a probe file, an
    evicted store) counts as nothing."""
    total = 0
    for d, _dirs, files in os.walk(root):
        for f in files:
            if name is None or f == name:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(d, f)).st_blocks * 512
    return total


def run_ossfs(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    check: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the command line as a user would; return its result (stdout/stderr as text)."""
    result = subprocess.run(
        [*OSSFS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"ossfs {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def summary_line(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The one summary line (starting with *prefix*) of a successful run, no traceback."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr
    return lines[0]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Unmount whatever is at *path*, lazily if it is busy; never raises."""
    for args in (["fusermount3", "-u", str(path)], ["fusermount3", "-u", "-z", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(args, capture_output=True, timeout=30, check=False)
        for _ in range(50):
            if not is_mounted(path):
                return
            time.sleep(0.1)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def mounted(
    url: str,
    mountpoint: Path,
    *opts: str,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
) -> Iterator[dict[str, object]]:
    """Mount with the daemonizing command; always unmount and reap the daemon.

    Yields the mount's own description (``user.ossfs.mount``), which holds its pid.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    args = ["mount", url, str(mountpoint), *opts]
    if log is not None:
        args += ["--log-file", str(log), "-v"]
    result = run_ossfs(*args, env=env, timeout=60)
    if result.returncode != 0:
        force_unmount(mountpoint)
        raise AssertionError(f"mount failed ({result.returncode}): {result.stderr}")
    info: dict[str, object] = {}
    try:
        info = json.loads(os.getxattr(mountpoint, "user.ossfs.mount"))
        yield info
    finally:
        pid = info.get("pid")
        force_unmount(mountpoint)
        if isinstance(pid, int) and not _wait_gone(pid, 20):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
        assert not is_mounted(mountpoint)
