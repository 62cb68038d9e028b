"""Resumable, parallel download of one object to a file.

The equal of the OSS C++ SDK's ``ResumableDownloadObject``, built on the same
part store as the mount's cache: the data file is a temp file beside the
destination (``FILE.ossfs-tmp``) and the index is the checkpoint (in the
checkpoint directory, FILE's directory by default). Where the SDKs fall short
(see ``docs/download.md``) this module:

- pins every ranged GET to the ETag read at the start (``If-Match``), so bytes
  of two versions are never mixed, and starts over cleanly when it changes;
- records each part with its CRC-64 and re-checks recorded parts on resume,
  so a torn or lost write is fetched again instead of trusted;
- verifies the combined CRC-64 against ``x-oss-hash-crc64ecma`` (and the MD5
  ETag of single-part S3 objects), also when resuming;
- renames over FILE only on success, leaving an existing FILE untouched on
  failure, and deletes the checkpoint only then;
- never writes through a symbolic link: the temp file is opened with
  ``O_NOFOLLOW`` and used only when it is a regular file of ours with no other
  name, a checkpoint that is a link (or not ours) is discarded, and the final
  rename replaces FILE's name instead of following it;
- stops on a full disk with `NoSpaceError` naming the file, keeping the temp
  file and the checkpoint, so the same request resumes once space is freed.

`DownloadRequest` / `download` are the Python API; ``ossfs download`` is a
thin command around them.

Must not import: pyfuse3.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import trio

from ossfs.cache.index import StoreIdentity
from ossfs.cache.store import Discarded, PartStore
from ossfs.client import ObjectClient
from ossfs.errors import (
    CheckpointError,
    IntegrityError,
    NoSpaceError,
    ObjectChangedError,
    UsageError,
)
from ossfs.escape import printable
from ossfs.fetcher import Fetcher
from ossfs.fsutil import (
    NAME_MAX,
    WRITE_TEMP_EXTRA,
    UnsafeFileError,
    disk_full_reason,
    fitted_name,
    fsync_dir,
    is_disk_full,
    open_private_file,
    unlink_quietly,
)
from ossfs.model import (
    DEFAULT_PART_SIZE,
    ObjectMeta,
    format_size,
    object_url,
    resolve_range,
    validate_part_size,
)
from ossfs.pool import run_pool

__all__ = [
    "DownloadRequest",
    "DownloadResult",
    "ProgressCallback",
    "Verification",
    "download",
    "checkpoint_path_for",
    "temp_path_for",
]

log = logging.getLogger(__name__)

# (bytes just transferred, bytes done so far, total bytes): as the SDK's callback.
ProgressCallback = Callable[[int, int, int], None]

# What a finished download's bytes were checked against (DownloadResult.verified_by).
Verification = Literal["crc64", "md5", "parts"]

TEMP_SUFFIX = ".ossfs-tmp"
CHECKPOINT_SUFFIX = ".ossfs-checkpoint"
_MD5_ETAG = re.compile(r"^[0-9a-fA-F]{32}$")
# How often the object may change during one run (a 412 on If-Match) before the run
# fails: each time the download starts over with the version there now.
RESTARTS = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class DownloadRequest:
    """What to download, where, and how.

    :bucket / key: the object.
    :file_path: the destination file.
    :part_size: bytes per part, 100 KiB to 5 GiB (default 8 MiB).
    :threads: parts fetched at once (default 3).
    :checkpoint_dir: where the checkpoint lives (default: file_path's directory).
    :enable_checkpoint: False keeps no checkpoint (an interrupted run starts over).
    :range_start / range_end: inclusive byte range; None means from 0 / to the end.
    :progress: called as bytes arrive, with (increment, transferred, total).
    :on_part: called with (parts done, parts total) each time a part completes.
    :notice: called with one-line messages a user should see (a checkpoint
        discarded, an integrity check skipped ...).
    :scheme: ``oss`` or ``s3``, for the URLs in messages.
    """

    bucket: str
    key: str
    file_path: str
    part_size: int = DEFAULT_PART_SIZE
    threads: int = 3
    checkpoint_dir: str | None = None
    enable_checkpoint: bool = True
    range_start: int | None = None
    range_end: int | None = None
    progress: ProgressCallback | None = field(default=None, repr=False)
    on_part: Callable[[int, int], None] | None = field(default=None, repr=False)
    notice: Callable[[str], None] | None = field(default=None, repr=False)
    scheme: str = "oss"


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """What a finished download did.

    :verified_by: what the whole file was checked against: "crc64" (the service's
        CRC-64), "md5" (its MD5 ETag), "parts" (a ranged download: each part's
        CRC-64 only), or None when the service gave nothing to check against.
    """

    path: str
    size: int
    etag: str
    crc64: int
    parts: int
    parts_fetched: int
    parts_reused: int
    bytes_fetched: int
    verified_by: Verification | None
    restarts: int
    elapsed: float


def temp_path_for(file_path: str) -> str:
    directory, name = os.path.split(file_path)
    return os.path.join(directory, fitted_name(name, NAME_MAX - len(TEMP_SUFFIX)) + TEMP_SUFFIX)


def checkpoint_path_for(request: DownloadRequest, file_path: str) -> str:
    """Where the checkpoint of *request* lives: one per object, range and destination."""
    directory = request.checkpoint_dir or os.path.dirname(file_path) or "."
    ident = "\n".join(
        [
            request.bucket,
            request.key,
            os.path.abspath(file_path),
            str(request.range_start),
            str(request.range_end),
        ]
    )
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    room = NAME_MAX - len(f".{digest}{CHECKPOINT_SUFFIX}") - WRITE_TEMP_EXTRA
    name = fitted_name(os.path.basename(file_path), room)
    return os.path.join(directory, f"{name}.{digest}{CHECKPOINT_SUFFIX}")


def _resolve_range(request: DownloadRequest, meta: ObjectMeta) -> tuple[int, int]:
    if request.range_start is None and request.range_end is None:
        return 0, meta.size
    try:
        return resolve_range(request.range_start or 0, request.range_end, meta.size)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _url(request: DownloadRequest) -> str:
    return object_url(request.scheme, request.bucket, request.key)


def _validate(request: DownloadRequest) -> str:
    validate_part_size(request.part_size)
    if request.threads < 1:
        raise UsageError("threads must be at least 1")
    if not request.key or request.key.endswith("/"):
        raise UsageError(
            f"{_url(request)} names a prefix, not an object (use ossfs materialize for prefixes)"
        )
    path = os.path.abspath(request.file_path)
    if os.path.isdir(path):
        raise UsageError(f"{request.file_path} is a directory")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise UsageError(f"directory {parent} does not exist")
    if request.checkpoint_dir is not None and not os.path.isdir(request.checkpoint_dir):
        raise UsageError(f"checkpoint directory {request.checkpoint_dir} does not exist")
    return path


class _Lock:
    """An exclusive lock on the temp file, so two runs never write one destination.

    Opening it is also the temp file's safety check: it must be a regular file
    of ours with no other name, never a symbolic link (planted by someone who
    can write FILE's directory, it would make the download overwrite the file
    it points to).
    """

    def __init__(self, path: str, dest: str) -> None:
        try:
            self.fd = open_private_file(path, os.O_RDWR | os.O_CREAT, 0o666)
        except UnsafeFileError as e:
            raise UsageError(
                f"{e}: it is not a temp file of ossfs download, so nothing is "
                "written through it (remove it and run again)"
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(f"another download to {dest} is running") from None

    def same_file(self, fd: int) -> bool:
        """Whether *fd* is the locked temp file (and not what a swapped name points to)."""
        a, b = os.fstat(self.fd), os.fstat(fd)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def close(self) -> None:
        os.close(self.fd)


class _DownloadStore(PartStore):
    """The download's part store: a full disk becomes `NoSpaceError` naming the file.

    The data file is the temp file, the index is the checkpoint; they may be on
    different file systems, so the error says which one is full.
    """

    def write(self, offset: int, data: bytes | memoryview) -> None:
        try:
            super().write(offset, data)
        except OSError as e:
            if is_disk_full(e):
                raise _no_space(e, self.data_path) from None
            raise

    def commit(self, part: int, crc: int) -> None:
        try:
            super().commit(part, crc)
        except OSError as e:
            if is_disk_full(e):
                raise _no_space(e, self.index_path or self.data_path) from None
            raise

    def drop(self, parts: Iterable[int]) -> None:
        try:
            super().drop(parts)
        except OSError as e:
            if is_disk_full(e):
                raise _no_space(e, self.index_path or self.data_path) from None
            raise


def _no_space(error: OSError, path: str) -> NoSpaceError:
    """The one-line error for a full disk (or quota) at *path*."""
    return NoSpaceError(
        f"{disk_full_reason(error)} writing {path} (free some space there)", path=path
    )


def _discard_unsafe_checkpoint(ckpt: str, notice: Callable[[str], None]) -> None:
    """Remove a checkpoint name that is a symbolic link or not a file of ours.

    Reading or appending to it would follow the link; its records cannot be
    trusted either. The name is ours (it carries a digest of the request), so
    removing it is safe; the download then starts over.
    """
    try:
        st = os.lstat(ckpt)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1:
        return
    why = (
        "it is a symbolic link"
        if stat.S_ISLNK(st.st_mode)
        else "it is not a regular file"
        if not stat.S_ISREG(st.st_mode)
        else "it is not a file of ours"
    )
    try:
        os.unlink(ckpt)
    except IsADirectoryError:
        raise UsageError(
            f"checkpoint path {ckpt} is a directory (remove it and run again)"
        ) from None
    notice(f"not resuming from checkpoint {ckpt}: {why}; starting over")


async def download(client: ObjectClient, request: DownloadRequest) -> DownloadResult:
    """Run *request*; return what was done, or raise an `OssfsError`.

    Interrupted (cancelled, killed, failed), it leaves the temp file and the
    checkpoint so that the same request resumes; the destination is only
    ever replaced by a complete, verified file.
    """
    began = time.monotonic()
    path = _validate(request)
    temp = temp_path_for(path)
    ckpt = checkpoint_path_for(request, path) if request.enable_checkpoint else None
    say = request.notice or (lambda msg: log.warning("%s", msg))

    def notice(message: str) -> None:
        say(printable(message))

    temp_existed = os.path.lexists(temp)
    lock = _Lock(temp, path)  # creates the temp file when it is missing
    ok = False
    try:
        if ckpt is not None:
            _discard_unsafe_checkpoint(ckpt, notice)
        if ckpt is not None and not temp_existed and os.path.exists(ckpt):
            # The checkpoint describes bytes that are gone: trust none of it.
            notice(
                f"not resuming from checkpoint {ckpt}: its data file {temp} is missing; "
                "starting over"
            )
            unlink_quietly(ckpt)
        restarts = 0
        while True:
            try:
                result = await _attempt(
                    client, request, path, temp, ckpt, lock, notice, began, restarts
                )
                ok = True
                return result
            except ObjectChangedError as e:
                restarts += 1
                if restarts > RESTARTS:
                    e.args = (
                        f"{_url(request)} kept changing during the download (replaced "
                        f"{restarts} times; the last time: {e}); no part of it is kept "
                        f"and {request.file_path} is not written: run the same command "
                        "again once the object stays the same",
                    )
                    raise
                notice(f"{_url(request)} changed during the download; starting over")
    finally:
        if not ok and (ckpt is None or not os.path.exists(ckpt)):
            # Without a checkpoint the temp file can never be resumed: leave nothing.
            unlink_quietly(temp)
        lock.close()


async def _attempt(
    client: ObjectClient,
    request: DownloadRequest,
    path: str,
    temp: str,
    ckpt: str | None,
    lock: _Lock,
    notice: Callable[[str], None],
    began: float,
    restarts: int,
) -> DownloadResult:
    meta = await client.head(request.bucket, request.key)
    start, length = _resolve_range(request, meta)
    identity = StoreIdentity(
        bucket=request.bucket,
        key=request.key,
        etag=meta.etag,
        size=meta.size,
        part_size=request.part_size,
        start=start,
        length=length,
    )

    def discarded(d: Discarded) -> None:
        notice(f"not resuming from checkpoint {d.path}: {d.reason}; starting over")

    try:
        store = _DownloadStore.open(identity, temp, ckpt, data_mode=0o666, on_discard=discarded)
    except OSError as e:
        if is_disk_full(e):
            raise _no_space(e, ckpt or temp) from None
        raise CheckpointError(f"cannot open {temp} or its checkpoint: {e.strerror}") from e
    try:
        if not lock.same_file(store.fileno()):
            # The name was swapped between our check and the store's open.
            raise UsageError(
                f"{temp} was replaced while the download started; nothing is "
                "written through it (run again)"
            )
        return await _run(client, request, store, meta, path, temp, notice, began, restarts)
    except ObjectChangedError:
        # The recorded parts belong to the old version: throw them away now so the
        # restart (or the next run) begins clean.
        store.drop(list(store.parts))
        raise
    finally:
        store.close()


async def _run(
    client: ObjectClient,
    request: DownloadRequest,
    store: PartStore,
    meta: ObjectMeta,
    path: str,
    temp: str,
    notice: Callable[[str], None],
    began: float,
    restarts: int,
) -> DownloadResult:
    reused = await _reuse_checked(store, notice)
    missing = store.missing()
    _check_space(temp, sum(store.layout.part_length(i) for i in missing))
    counts = _Counts(request, store)
    fetcher = Fetcher(client, connections=request.threads)

    async def feed(send: trio.MemorySendChannel[int]) -> None:
        for part in missing:
            send.send_nowait(part)

    async def fetch(part: int) -> None:
        await fetcher.ensure(store, part, on_bytes=counts.add_bytes)
        counts.add_part()

    await run_pool(min(request.threads, len(missing)), feed, fetch, buffer=len(missing))

    checked = await trio.to_thread.run_sync(_check_integrity, store, meta)
    await trio.to_thread.run_sync(_finish, store, path, temp, meta)
    return DownloadResult(
        path=path,
        size=store.identity.length,
        etag=meta.etag,
        crc64=store.combined_crc() if store.layout.count else 0,
        parts=store.layout.count,
        parts_fetched=fetcher.parts_fetched,
        parts_reused=len(reused),
        bytes_fetched=fetcher.bytes_fetched,
        verified_by=checked,
        restarts=restarts,
        elapsed=time.monotonic() - began,
    )


async def _reuse_checked(store: PartStore, notice: Callable[[str], None]) -> list[int]:
    """The parts an earlier run recorded, each checked against its CRC: those that fail
    are dropped (to be fetched again); the others are reused."""
    reused = sorted(store.parts)
    if reused:
        bad = await trio.to_thread.run_sync(store.failing_parts, reused)
        if bad:
            notice(f"{len(bad)} recorded part(s) failed their CRC check and will be fetched again")
            store.drop(bad)
            reused = sorted(store.parts)
    return reused


class _Counts:
    """Bytes and parts done, told to the request's callbacks as they change (and once
    at the start, with what earlier runs left)."""

    def __init__(self, request: DownloadRequest, store: PartStore) -> None:
        self.progress = request.progress
        self.on_part = request.on_part
        self.total = store.identity.length
        self.parts = store.layout.count
        self.bytes_done = store.present_bytes
        self.parts_done = len(store.parts)
        if self.progress is not None:
            self.progress(0, self.bytes_done, self.total)
        if self.on_part is not None:
            self.on_part(self.parts_done, self.parts)

    def add_bytes(self, n: int) -> None:
        self.bytes_done += n
        if self.progress is not None:
            self.progress(n, self.bytes_done, self.total)

    def add_part(self) -> None:
        self.parts_done += 1
        if self.on_part is not None:
            self.on_part(self.parts_done, self.parts)


def _check_space(temp: str, needed: int) -> None:
    st = os.statvfs(os.path.dirname(temp))
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise NoSpaceError(
            f"no space left for {temp}: {format_size(needed)} more needed, "
            f"{format_size(free)} free",
            path=temp,
        )


def _check_integrity(store: PartStore, meta: ObjectMeta) -> Verification | None:
    """Compare the download with the service's checksum; drop the parts when it fails."""
    ident = store.identity
    if ident.start != 0 or ident.length != meta.size:
        return "parts"
    store.server_crc64 = meta.crc64
    if store.check_crc():
        return "crc64"
    if (
        _MD5_ETAG.match(meta.etag)
        and meta.object_type in (None, "Normal")
        and meta.encryption in (None, "AES256")
    ):
        # A single-part S3 object's ETag is the MD5 of its content, unless it is
        # encrypted with a KMS key or one of the customer's: then it is not, and a
        # check would fail every time.
        md5 = hashlib.md5(usedforsecurity=False)
        pos, end = ident.start, ident.start + ident.length
        while pos < end and (chunk := store.read(pos, min(8 << 20, end - pos))):
            md5.update(chunk)
            pos += len(chunk)
        if md5.hexdigest().lower() != meta.etag.lower():
            store.drop(list(store.parts))
            raise IntegrityError(
                f"MD5 mismatch: the ETag says {meta.etag}, the downloaded "
                f"bytes give {md5.hexdigest()}; dropped every part, run "
                "again to fetch them"
            )
        return "md5"
    return None


def _finish(store: PartStore, path: str, temp: str, meta: ObjectMeta) -> None:
    """Make the temp file durable, give it the object's mtime, rename it over FILE.

    rename() replaces whatever FILE is (a symbolic link too) without following
    it; the temp file's name must still be our file, or FILE would become
    whatever was swapped in.
    """
    try:
        store.sync()
    except OSError as e:
        if is_disk_full(e):
            raise _no_space(e, temp) from None
        raise
    if meta.mtime:
        os.utime(store.fileno(), (meta.mtime, meta.mtime))
    mine, there = os.fstat(store.fileno()), os.lstat(temp)
    if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
        raise UsageError(
            f"{temp} was replaced during the download; {path} is left as it was (run again)"
        )
    os.replace(temp, path)
    fsync_dir(os.path.dirname(path))
    store.remove_index()
