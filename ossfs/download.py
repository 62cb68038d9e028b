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
  failure, and deletes the checkpoint only then.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ossfs.cache.index import StoreIdentity
from ossfs.cache.store import Discarded, PartStore
from ossfs.client import ObjectClient
from ossfs.errors import (
    CheckpointError,
    IntegrityError,
    ObjectChangedError,
    UsageError,
    unwrap_groups,
)
from ossfs.fetcher import Fetcher
from ossfs.fsutil import fsync_dir, unlink_quietly
from ossfs.model import (
    DEFAULT_PART_SIZE,
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    ObjectMeta,
    format_size,
)

__all__ = [
    "DownloadRequest",
    "DownloadResult",
    "ProgressCallback",
    "download",
    "checkpoint_path_for",
    "temp_path_for",
    "validate_part_size",
]

log = logging.getLogger(__name__)

# (bytes just transferred, bytes done so far, total bytes): as the SDK's callback.
ProgressCallback = Callable[[int, int, int], None]

TEMP_SUFFIX = ".ossfs-tmp"
CHECKPOINT_SUFFIX = ".ossfs-checkpoint"
_MD5_ETAG = re.compile(r"^[0-9a-fA-F]{32}$")


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


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """What a finished download did.

    :crc_checked: "crc64", "md5" or None when the service gave nothing to check against.
    """

    path: str
    size: int
    etag: str
    crc64: int
    parts: int
    parts_fetched: int
    parts_reused: int
    bytes_fetched: int
    crc_checked: str | None
    restarts: int
    elapsed: float


def validate_part_size(part_size: int) -> None:
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise UsageError(f"part size {format_size(part_size)} is out of range "
                         f"({format_size(MIN_PART_SIZE)} to {format_size(MAX_PART_SIZE)})")


def temp_path_for(file_path: str) -> str:
    return file_path + TEMP_SUFFIX


def checkpoint_path_for(request: DownloadRequest, file_path: str) -> str:
    """Where the checkpoint of *request* lives: one per object, range and destination."""
    directory = request.checkpoint_dir or os.path.dirname(file_path) or "."
    ident = "\n".join([request.bucket, request.key, os.path.abspath(file_path),
                       str(request.range_start), str(request.range_end)])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return os.path.join(directory, f"{os.path.basename(file_path)}.{digest}{CHECKPOINT_SUFFIX}")


def _resolve_range(request: DownloadRequest, meta: ObjectMeta) -> tuple[int, int]:
    if request.range_start is None and request.range_end is None:
        return 0, meta.size
    start = request.range_start or 0
    if start >= meta.size:
        raise UsageError(f"range starts at byte {start}, past the end of the object "
                         f"({meta.size} bytes)")
    end = meta.size - 1 if request.range_end in (None, -1) else request.range_end
    assert end is not None
    if start < 0 or end < start:
        raise UsageError(f"invalid range {start}-{end}")
    end = min(end, meta.size - 1)
    return start, end - start + 1


def _validate(request: DownloadRequest) -> str:
    validate_part_size(request.part_size)
    if request.threads < 1:
        raise UsageError("threads must be at least 1")
    if not request.key or request.key.endswith("/"):
        raise UsageError(f"oss://{request.bucket}/{request.key} names a prefix, not an "
                         "object (use ossfs materialize for prefixes)")
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
    """An exclusive lock on the temp file, so two runs never write one destination."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(f"another download to {path[:-len(TEMP_SUFFIX)]} is running") from None

    def close(self) -> None:
        os.close(self.fd)


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
    notice = request.notice or (lambda msg: log.warning("%s", msg))
    temp_existed = os.path.exists(temp)
    lock = _Lock(temp)  # creates the temp file when it is missing
    ok = False
    try:
        if ckpt is not None and not temp_existed and os.path.exists(ckpt):
            # The checkpoint describes bytes that are gone: trust none of it.
            notice(f"not resuming from checkpoint {ckpt}: its data file {temp} is missing; "
                   "starting over")
            unlink_quietly(ckpt)
        restarts = 0
        while True:
            try:
                result = await _attempt(client, request, path, temp, ckpt, notice, began,
                                        restarts)
                ok = True
                return result
            except ObjectChangedError:
                restarts += 1
                if restarts > 2:
                    raise
                notice(f"oss://{request.bucket}/{request.key} changed during the download; "
                       "starting over")
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
    notice: Callable[[str], None],
    began: float,
    restarts: int,
) -> DownloadResult:
    meta = await client.head(request.bucket, request.key)
    start, length = _resolve_range(request, meta)
    identity = StoreIdentity(bucket=request.bucket, key=request.key, etag=meta.etag,
                             size=meta.size, part_size=request.part_size,
                             start=start, length=length)

    def discarded(d: Discarded) -> None:
        notice(f"not resuming from checkpoint {d.path}: {d.reason}; starting over")

    try:
        store = PartStore.open(identity, temp, ckpt, data_mode=0o666, on_discard=discarded)
    except OSError as e:
        raise CheckpointError(f"cannot open {temp} or its checkpoint: {e.strerror}") from e
    try:
        return await _run(client, request, store, meta, path, notice, began, restarts)
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
    notice: Callable[[str], None],
    began: float,
    restarts: int,
) -> DownloadResult:
    total = store.identity.length
    reused = sorted(store.parts)
    if reused:
        bad = await trio.to_thread.run_sync(_find_bad_parts, store, reused)
        if bad:
            notice(f"{len(bad)} recorded part(s) failed their CRC check and will be fetched "
                   "again")
            store.drop(bad)
        reused = sorted(store.parts)
    done = store.present_bytes
    missing = store.missing()
    _check_space(path, sum(store.layout.part_length(i) for i in missing))

    progress = request.progress
    if progress is not None:
        progress(0, done, total)

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(n, done, total)

    fetcher = Fetcher(client, connections=request.threads)
    send, receive = trio.open_memory_channel[int](len(missing))
    for part in missing:
        send.send_nowait(part)
    send.close()

    parts_done = len(store.parts)
    if request.on_part is not None:
        request.on_part(parts_done, store.layout.count)

    async def worker() -> None:
        nonlocal parts_done
        async for part in receive:
            await fetcher.ensure(store, part, on_bytes=on_bytes)
            parts_done += 1
            if request.on_part is not None:
                request.on_part(parts_done, store.layout.count)

    with unwrap_groups():
        async with trio.open_nursery() as nursery:
            for _ in range(min(request.threads, len(missing))):
                nursery.start_soon(worker)

    checked = await trio.to_thread.run_sync(_check_integrity, store, meta)
    await trio.to_thread.run_sync(_finish, store, path, meta)
    return DownloadResult(
        path=path,
        size=total,
        etag=meta.etag,
        crc64=store.combined_crc() if store.layout.count else 0,
        parts=store.layout.count,
        parts_fetched=fetcher.parts_fetched,
        parts_reused=len(reused),
        bytes_fetched=fetcher.bytes_fetched,
        crc_checked=checked,
        restarts=restarts,
        elapsed=time.monotonic() - began,
    )


def _find_bad_parts(store: PartStore, parts: list[int]) -> list[int]:
    return [p for p in parts if not store.verify(p)]


def _check_space(path: str, needed: int) -> None:
    st = os.statvfs(os.path.dirname(path))
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise UsageError(f"not enough free space in {os.path.dirname(path)}: "
                         f"{format_size(needed)} needed, {format_size(free)} free")


def _check_integrity(store: PartStore, meta: ObjectMeta) -> str | None:
    """Compare the download with the service's checksum; drop the parts when it fails."""
    ident = store.identity
    if ident.start != 0 or ident.length != meta.size:
        return "parts"
    store.server_crc64 = meta.crc64
    if store.check_crc():
        return "crc64"
    if _MD5_ETAG.match(meta.etag) and meta.object_type in (None, "Normal"):
        # A single-part S3 object's ETag is the MD5 of its content.
        md5 = hashlib.md5(usedforsecurity=False)
        with open(store.data_path, "rb") as f:
            while chunk := f.read(8 << 20):
                md5.update(chunk)
        if md5.hexdigest().lower() != meta.etag.lower():
            store.drop(list(store.parts))
            raise IntegrityError(f"MD5 mismatch: the ETag says {meta.etag}, the downloaded "
                                 f"bytes give {md5.hexdigest()}; dropped every part, run "
                                 "again to fetch them")
        return "md5"
    return None


def _finish(store: PartStore, path: str, meta: ObjectMeta) -> None:
    """Make the temp file durable, give it the object's mtime, rename it over FILE."""
    store.sync()
    if meta.mtime:
        os.utime(store.fileno(), (meta.mtime, meta.mtime))
    os.replace(store.data_path, path)
    fsync_dir(os.path.dirname(path))
    store.remove_index()
