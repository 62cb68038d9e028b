"""Small file-system helpers shared by the cache, downloads and the mount.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from typing import Any

__all__ = [
    "unlink_quietly",
    "fsync_dir",
    "write_temp",
    "write_atomically",
    "start_writeback",
    "punch_hole",
]

_SYNC_FILE_RANGE_WRITE = 2
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_sync_file_range: Any = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_fallocate: Any = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the blocks of ``[offset, offset+length)`` back to the file system."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting for it.

    Written parts otherwise pile up as dirty pages until the kernel's dirty
    limit throttles the writer, which here is the event loop serving every
    reader. Starting writeback part by part keeps the pile small, and a final
    fsync has little left to wait for.
    """
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


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
