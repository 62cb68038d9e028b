"""``ossfs materialize``: fill the part cache with whole objects, resumably.

Given an object or a prefix, list what is there (all of it, or a
deterministic 1/N shard), then fetch every missing part of every object into
the cache the mount uses, concurrently across parts and objects under one
connection limit. The cache's indexes are the checkpoint: running the same
command again fetches only what is still missing, and a mount that shares
the cache serves the new parts at once.

With ``--to DIR`` each object is also written out as a file under DIR (its
key relative to the prefix), copied from the cache once complete, so parts
already cached are never fetched again.

Must not import: pyfuse3.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ossfs.cache.cachedir import CacheDir, identity_for
from ossfs.cache.store import PartStore
from ossfs.client import ObjectClient
from ossfs.errors import NotFoundError, OssfsError, UsageError, unwrap_groups
from ossfs.fetcher import Fetcher
from ossfs.fsutil import fsync_dir, unlink_quietly
from ossfs.model import ObjectMeta, format_size
from ossfs.namespace import ListingGuard, valid_name

__all__ = ["MaterializeRequest", "MaterializeResult", "materialize", "in_shard", "list_objects"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class MaterializeRequest:
    """What to materialize.

    :bucket / key: an object, or a prefix (ending in ``/``, or any key that is
        not an object).
    :part_size: must match the mount's for the parts to be shared.
    :threads: parts fetched at once, across all objects.
    :to_dir: also write the objects out as files here.
    :shard: (I, N): take only the objects whose key hash falls in shard I of N.
    :progress: (bytes just fetched, bytes cached so far, total bytes).
    :on_object: (objects done, objects total) after each object completes.
    :notice: one-line messages for the user.
    """

    bucket: str
    key: str
    part_size: int
    threads: int = 16
    to_dir: str | None = None
    shard: tuple[int, int] | None = None
    progress: Callable[[int, int, int], None] | None = field(default=None, repr=False)
    on_object: Callable[[int, int], None] | None = field(default=None, repr=False)
    notice: Callable[[str], None] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class MaterializeResult:
    objects: int
    total_bytes: int
    bytes_fetched: int
    bytes_reused: int
    parts_fetched: int
    written: int
    skipped: int
    failed: list[str]
    elapsed: float


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """Whether *key* belongs to shard I of N: the same answer on every machine."""
    if shard is None:
        return True
    index, count = shard
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count == index


async def list_objects(client: ObjectClient, bucket: str, key: str) -> list[ObjectMeta]:
    """The object *key*, or every object under it when it is a prefix."""
    if key and not key.endswith("/"):
        try:
            return [await client.head(bucket, key)]
        except NotFoundError:
            key += "/"
    found: list[ObjectMeta] = []
    token: str | None = None
    guard = ListingGuard(f"{bucket}/{key}")
    while True:
        page = await client.list_page(bucket, prefix=key, continuation_token=token)
        guard.check(page, token)
        # "dir/" marker objects are directories, not data.
        found.extend(o for o in page.objects if not o.key.endswith("/"))
        token = page.next_token
        if token is None:
            return found


def _destination(to_dir: str, prefix: str, key: str) -> str | None:
    """Where object *key* goes under *to_dir*; None when the key is not a safe path."""
    rel = key[len(prefix):] if key.startswith(prefix) else key
    parts = rel.split("/")
    if not all(valid_name(p) for p in parts):
        return None
    path = os.path.join(to_dir, *parts)
    root = os.path.realpath(to_dir)
    if os.path.commonpath([root, os.path.realpath(os.path.dirname(path))]) != root:
        return None  # a symlink inside DIR points elsewhere: never write through it
    return path


def _write_out(store: PartStore, meta: ObjectMeta, path: str) -> bool:
    """Copy a complete object from the cache to *path* (temp + rename); False if current."""
    try:
        st = os.stat(path)
        if st.st_size == meta.size and int(st.st_mtime) == int(meta.mtime):
            return False
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".ossfs-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        offset = 0
        while offset < meta.size:
            n = os.copy_file_range(store.fileno(), fd, meta.size - offset, offset, offset)
            if n == 0:
                raise OSError(f"cache file of {meta.key} ended early")
            offset += n
        os.fsync(fd)
        os.utime(fd, (meta.mtime, meta.mtime))
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    return True


async def materialize(client: ObjectClient, cache: CacheDir,
                      request: MaterializeRequest) -> MaterializeResult:
    """Run *request*; per-object failures are collected, not raised."""
    began = time.monotonic()
    notice = request.notice or (lambda m: log.warning("%s", m))
    if request.shard is not None:
        index, count = request.shard
        if count < 1 or not 0 <= index < count:
            raise UsageError(f"shard {index}/{count} does not exist (use I/N with 0 <= I < N)")
    objects = [o for o in await list_objects(client, request.bucket, request.key)
               if in_shard(o.key, request.shard)]
    if not objects:
        raise NotFoundError(404, "NoSuchKey", "nothing to materialize",
                            resource=f"{request.bucket}/{request.key}")
    prefix = request.key if request.key.endswith("/") else (
        request.key.rsplit("/", 1)[0] + "/" if "/" in request.key else "")
    total = sum(o.size for o in objects)
    if request.to_dir is None and total > cache.max_bytes:
        notice(f"{format_size(total)} does not fit in the cache ({format_size(cache.max_bytes)});"
               " objects fetched first will be evicted again (use --to DIR or a larger "
               "--cache-size)")

    async def reserve(store: PartStore, part: int, nbytes: int) -> None:
        cache.reserve_sync(store, part, nbytes)

    fetcher = Fetcher(client, connections=request.threads, reserve=reserve)
    done_bytes = 0
    reused = 0
    objects_done = 0
    written = 0
    skipped = 0
    failed: list[str] = []

    def on_bytes(n: int) -> None:
        nonlocal done_bytes
        done_bytes += n
        if request.progress is not None:
            request.progress(n, done_bytes, total)

    # Every part of every object goes through one channel to `threads` workers, in
    # listing order, so early objects finish first (and can be written out early).
    send, receive = trio.open_memory_channel[tuple[int, PartStore, int]](request.threads * 2)
    remaining: dict[int, int] = {}
    stores: dict[int, PartStore] = {}
    object_failed: set[int] = set()

    async def object_finished(i: int) -> None:
        nonlocal objects_done, written, skipped
        store, meta = stores[i], objects[i]
        try:
            if i not in object_failed and request.to_dir is not None:
                dest = _destination(request.to_dir, prefix, meta.key)
                if dest is None:
                    skipped += 1
                    notice(f"skipping {meta.key}: it cannot be a file name under "
                           f"{request.to_dir}")
                elif await trio.to_thread.run_sync(_write_out, store, meta, dest):
                    written += 1
        except OSError as e:
            failed.append(f"{meta.key}: cannot write it out: {e}")
        finally:
            cache.unpin(store, range(store.layout.count))
            cache.release(store)
            objects_done += 1
            if request.on_object is not None:
                request.on_object(objects_done, len(objects))

    async def worker() -> None:
        async for i, store, part in receive:
            try:
                await fetcher.ensure(store, part, on_bytes=on_bytes)
            except OssfsError as e:
                if i not in object_failed:
                    object_failed.add(i)
                    failed.append(f"{objects[i].key}: {e}")
            remaining[i] -= 1
            if remaining[i] == 0:
                await object_finished(i)

    async def feed() -> None:
        nonlocal reused, done_bytes
        async with send:
            for i, meta in enumerate(objects):
                store = await fetcher.open_store(cache, identity_for(
                    request.bucket, meta.key, meta.etag, meta.size, request.part_size))
                stores[i] = store
                # The whole object stays until it is complete (and written out), even
                # when it is larger than the cache.
                cache.pin(store, range(store.layout.count))
                have = store.present_bytes
                reused += have
                done_bytes += have
                if request.progress is not None:
                    request.progress(0, done_bytes, total)
                missing = store.missing()
                remaining[i] = len(missing)
                if not missing:
                    await object_finished(i)
                    continue
                for part in missing:
                    await send.send((i, store, part))

    with unwrap_groups():
        async with trio.open_nursery() as nursery:
            for _ in range(request.threads):
                nursery.start_soon(worker)
            nursery.start_soon(feed)
    return MaterializeResult(
        objects=len(objects), total_bytes=total, bytes_fetched=fetcher.bytes_fetched,
        bytes_reused=reused, parts_fetched=fetcher.parts_fetched, written=written,
        skipped=skipped, failed=failed, elapsed=time.monotonic() - began,
    )
