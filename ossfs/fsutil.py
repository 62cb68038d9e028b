"""Small file-system helpers shared by the cache, downloads and the mount.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["unlink_quietly", "fsync_dir", "write_temp", "write_atomically"]


def unlink_quietly(path: str) -> None:
    """Remove *path*; a file that is already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_dir(path: str) -> None:
    """Make a rename or create in directory *path* durable."""
    dir_fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_temp(path: str, data: bytes, mode: int, *, durable: bool = True) -> str:
    """Write *data* to a new temp file beside *path* (fsynced if *durable*); return its name."""
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def write_atomically(path: str, data: bytes, mode: int = 0o600, *,
                     durable: bool = True) -> None:
    """Replace *path* with *data*: write temp, (fsync), rename, (fsync the directory).

    Not durable is still atomic: readers see the old file or the new one, and
    a crash may only lose the new one.
    """
    os.replace(write_temp(path, data, mode, durable=durable), path)
    if durable:
        fsync_dir(os.path.dirname(path))
