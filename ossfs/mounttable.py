"""A mount point as the system sees it: the mount table, dead mounts, unmounting.

What ``ossfs unmount``, ``ossfs status`` and ``ossfs materialize PATH`` need to
find and judge a mount without serving one; `ossfs.mount` serves it.

Must not import: pyfuse3, trio, httpx (``ossfs unmount`` stays light and works
where pyfuse3 is broken).
"""

from __future__ import annotations

import errno
import logging
import os
import re

from ossfs.errors import UsageError

__all__ = [
    "check_mountpoint",
    "unmount",
    "mounted_fstype",
    "is_dead_mount",
    "dead_mount_message",
    "tune_kernel_read_ahead",
]

log = logging.getLogger(__name__)


def _mountinfo(path: str) -> tuple[str, str] | None:
    """(file system type, ``major:minor``) of what is mounted exactly at *path*.

    Read from /proc/self/mountinfo, which (unlike stat) still answers for a dead
    FUSE mount whose process is gone, and asks nothing of a live one.
    """
    want = os.fsencode(os.path.abspath(path))
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                sep = fields.index(b"-")
                # Spaces and the like are octal escapes (\040) in mountinfo.
                point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
                if point == want:
                    # The last mount on a path is the visible one.
                    found = (os.fsdecode(fields[sep + 1]), os.fsdecode(fields[2]))
    except (OSError, ValueError, IndexError):
        return None
    return found


def mounted_fstype(path: str) -> str | None:
    """The file system type mounted exactly at *path* (e.g. ``fuse.ossfs``), or None."""
    info = _mountinfo(path)
    return info[0] if info else None


def tune_kernel_read_ahead(path: str, kb: int) -> bool:
    """Set the mount's kernel read-ahead, its backing device's read_ahead_kb (needs
    root; best effort: False if not set).

    The kernel's default of 128 KiB makes it send reads of 128-256 KiB; at 1 MiB (the
    most one FUSE request carries) a sequential read costs a quarter of the requests,
    and a warm cached read ran at 4.7x the speed (305 -> 1422 MB/s, 512 MiB, page
    cache dropped)."""
    info = _mountinfo(path)
    if info is None:
        return False
    try:
        with open(f"/sys/class/bdi/{info[1]}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.debug("cannot set the kernel read-ahead of %s: %s", path, e)
        return False
    return True


def is_dead_mount(path: str) -> bool:
    """Whether *path* is a FUSE mount whose process is gone (ENOTCONN).

    statvfs always asks the file system: stat alone may be answered from the
    kernel's cached attributes of the root and look alive.
    """
    fstype = mounted_fstype(path)
    if fstype is None or not fstype.startswith("fuse"):
        return False
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def dead_mount_message(path: str) -> str:
    return f"{path} holds a dead mount (its process is gone); run: ossfs unmount {path}"


def check_mountpoint(path: str) -> str:
    """The absolute mountpoint, or a UsageError saying why it cannot be used.

    A dead ossfs mount (its process was killed, or its container restarted) is
    unmounted first: nothing can use it any more. When processes still hold
    files or directories in it (it is busy), it is detached lazily: they keep
    getting errors from what they hold, as they already did, and a new open
    finds the new mount. Any other dead FUSE mount is left to the user.
    """
    path = os.path.abspath(path)
    if is_dead_mount(path):
        if mounted_fstype(path) != "fuse.ossfs":
            raise UsageError(f"mountpoint {dead_mount_message(path)}")
        log.warning("%s held a dead ossfs mount (its process is gone): unmounting it", path)
        try:
            unmount(path)
        except UsageError:
            log.warning("%s: the dead mount is still in use: detaching it lazily", path)
            try:
                unmount(path, lazy=True)
            except UsageError as e:
                raise UsageError(
                    f"mountpoint {path} holds a dead ossfs mount that cannot "
                    f"be unmounted ({e}); run: ossfs unmount -z {path}"
                ) from None
    try:
        os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UsageError(f"mountpoint {dead_mount_message(path)}") from None
        raise UsageError(f"mountpoint {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"mountpoint {path} is busy: something is already mounted there")
    return path


def unmount(path: str, *, lazy: bool = False) -> None:
    """Unmount a FUSE mount (also a dead one whose process is gone)."""
    import subprocess

    path = os.path.abspath(path)
    if mounted_fstype(path) is None:
        if not os.path.exists(path):
            raise UsageError(f"cannot unmount {path}: it does not exist")
        raise UsageError(f"cannot unmount {path}: nothing is mounted there")
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    try:
        result = subprocess.run(args, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        result = subprocess.run(
            ["umount"] + (["-l"] if lazy else []) + [path],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise UsageError(f"cannot unmount {path}: {message[-1] if message else 'failed'}")
