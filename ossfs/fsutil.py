"""Small file-system helpers shared by the cache, downloads and the mount.

Files that ossfs writes beside a user's files (a download's temp file and
checkpoint, ``materialize --to`` output) may sit in a directory someone else
can write to. `open_private_file`, `create_exclusive` and `open_subdirectory`
never follow a symbolic link planted there, and only reuse a regular file
that belongs to us and has no other name; `is_disk_full` recognises the
errors of a full disk or quota.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import stat
from typing import Any

__all__ = [
    "NAME_MAX",
    "WRITE_TEMP_EXTRA",
    "fitted_name",
    "UnsafeFileError",
    "open_private_file",
    "create_exclusive",
    "open_subdirectory",
    "is_disk_full",
    "disk_full_reason",
    "unlink_quietly",
    "fsync_dir",
    "write_temp",
    "write_atomically",
    "start_writeback",
    "punch_hole",
    "pwrite_all",
]

# The longest file name the usual Linux file systems take (bytes).
NAME_MAX = 255


def fitted_name(name: str, room: int) -> str:
    """*name*, or when its UTF-8 form is longer than *room* bytes, a prefix of it and a
    digest of the whole. For names made from a user's name plus a suffix (a temp
    file, a checkpoint): a name near NAME_MAX (70 CJK characters are 210 bytes) must
    still give names the file system takes."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[: room - len(digest) - 1].decode("utf-8", "ignore")  # (whole characters)
    return f"{head}~{digest}"


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


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of *data* at *offset* (a short write goes on where it stopped)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


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
    """Make a rename or create in directory *path* durable. A file system that cannot
    sync a directory (EINVAL on some network and FUSE file systems) is left at that:
    a download whose file is in place must not fail, and fail again on every run,
    over it."""
    dir_fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(dir_fd)


# The most `write_temp` adds to a name for its temporary (".tmp-PID-8hex").
WRITE_TEMP_EXTRA = 24


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


def write_atomically(
    path: str, data: bytes, mode: int = 0o600, *, durable: bool = True, mtime: float | None = None
) -> None:
    """Replace *path* with *data*: write temp, (fsync), rename, (fsync the directory).

    Not durable is still atomic: readers see the old file or the new one, and
    a crash may only lose the new one. *mtime* is set before the rename.
    """
    tmp = write_temp(path, data, mode, durable=durable)
    try:
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(path))


class UnsafeFileError(OSError):
    """A path ossfs was to write is a symbolic link or a file that is not its own.

    ``str()`` is one line: ``PATH is a symbolic link`` and the like.
    """

    def __init__(self, path: str, why: str) -> None:
        super().__init__(errno.EPERM, why, path)
        self.path = path
        self.why = why

    def __str__(self) -> str:
        return f"{self.path} {self.why}"


def _describe(path: str, dir_fd: int | None, *, want_dir: bool = False) -> str:
    """Why *path* (which just refused to open as ours) is not ours: a few words."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return "cannot be opened safely"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if want_dir:
        return "is not a directory"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    return "is not a regular file"


def _check_ours(fd: int, path: str) -> None:
    """Raise UnsafeFileError unless *fd* is a regular file of ours with no other name."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(path, "is not a regular file")
    if st.st_uid != os.geteuid():
        raise UnsafeFileError(path, f"belongs to another user (uid {st.st_uid})")
    if st.st_nlink > 1:
        raise UnsafeFileError(path, "has other hard links")


def open_private_file(
    path: str, flags: int, mode: int = 0o600, *, dir_fd: int | None = None
) -> int:
    """Open (or with ``O_CREAT`` create) *path* as a regular file of ours.

    Never follows a symbolic link in the last component, never blocks on a
    FIFO, and refuses (UnsafeFileError, an OSError) a file that is not
    regular, belongs to another user or has other hard links: writing to it
    would change some other file. Resuming our own temp file works as before.
    """
    try:
        fd = os.open(
            path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd
        )
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise UnsafeFileError(path, _describe(path, dir_fd)) from None
        raise
    try:
        _check_ours(fd, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_exclusive(path: str, mode: int = 0o600, *, dir_fd: int | None = None) -> int:
    """Create *path* anew for writing; whatever was at that name (a leftover temp file
    of an interrupted run, a planted symbolic link) is removed first, never followed."""
    for _ in range(8):
        try:
            return os.open(
                path,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=dir_fd,
            )
        except FileExistsError:
            try:
                os.unlink(path, dir_fd=dir_fd)  # removes a symlink itself, not its target
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                raise UnsafeFileError(path, "is a directory") from None
    raise UnsafeFileError(path, "keeps being re-created by someone else")


def open_subdirectory(dir_fd: int, names: list[str], *, shown_as: str, create: bool = True) -> int:
    """Open the directory ``dir_fd/names[0]/names[1]/...``, creating what is missing.

    No component may be a symbolic link or anything but a directory
    (UnsafeFileError, naming the component under *shown_as*, the path
    *dir_fd* stands for): the result is always inside *dir_fd*, whatever is
    planted beneath it or swapped in meanwhile. Returns a new descriptor
    (the caller closes it); *dir_fd* stays open.
    """
    fd = os.dup(dir_fd)
    shown = shown_as
    try:
        for name in names:
            shown = os.path.join(shown, name)
            try:
                sub = _open_dir_at(fd, name, shown)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile: fine
                    os.mkdir(name, 0o777, dir_fd=fd)
                sub = _open_dir_at(fd, name, shown)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_dir_at(dir_fd: int, name: str, shown: str) -> int:
    try:
        return os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFileError(shown, _describe(name, dir_fd, want_dir=True)) from None
        raise


def is_disk_full(error: BaseException) -> bool:
    """Whether *error* says the file system (or the user's quota) has no space left."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_reason(error: OSError) -> str:
    """``no space left on device`` or ``disk quota exceeded``, for a one-line message."""
    return "disk quota exceeded" if error.errno == errno.EDQUOT else "no space left on device"
