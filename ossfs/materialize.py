"""``ossfs materialize``: fill the part cache with whole objects, resumably.

Given an object or a prefix, list what is there (all of it, or a
deterministic 1/N shard), then fetch every missing part of every object into
the cache the mount uses, concurrently across parts and objects under one
connection limit. The cache's indexes are the checkpoint: running the same
command again fetches only what is still missing, and a mount that shares
the cache serves the new parts at once.

With ``--to DIR`` each object is also written out as a file under DIR (its
key relative to the prefix), copied from the cache once complete, so parts
already cached are never fetched again. Nothing is written through a
symbolic link below DIR: directories are walked one component at a time
without following links, the temp file is created exclusively, and the final
rename replaces a link at the file's name instead of writing where it points.

A full disk (the cache's or DIR's) stops the run with `NoSpaceError` naming
the place; what was fetched and recorded stays, so a rerun after freeing
space fetches only the rest.

Must not import: pyfuse3.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

from ossfs.cache.cachedir import CacheDir, object_identity
from ossfs.cache.store import PartStore
from ossfs.cache.upkeep import run_upkeep
from ossfs.client import ObjectClient
from ossfs.errors import (
    NoSpaceError,
    NotFoundError,
    ObjectChangedError,
    OssfsError,
    UsageError,
    unwrap_groups,
)
from ossfs.escape import printable
from ossfs.fetcher import Fetcher
from ossfs.fsutil import (
    NAME_MAX,
    UnsafeFileError,
    create_exclusive,
    disk_full_reason,
    fitted_name,
    is_disk_full,
    open_subdirectory,
)
from ossfs.model import ObjectMeta, format_size, object_url
from ossfs.namespace import ListingGuard, valid_name
from ossfs.pool import run_pool

__all__ = [
    "MaterializeRequest",
    "MaterializeResult",
    "materialize",
    "check_shard",
    "in_shard",
    "list_objects",
    "shard_from_environment",
    "SHARD_COUNT_VARIABLE",
]

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
    :scheme: ``oss`` or ``s3``, for the URLs in messages.
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
    scheme: str = "oss"


# How often an object that changed while it was fetched (a 412 on If-Match) is
# fetched again in its new version before it counts as failed; as in download.
RESTARTS = 2
# Consecutive missing parts are fetched by one GET of up to this many bytes (or one
# part, if larger): small cache parts do not multiply the requests.
RUN_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class MaterializeResult:
    """:objects: objects listed (in the shard); :failed: one line per object that failed."""

    objects: int
    total_bytes: int
    bytes_fetched: int
    bytes_reused: int
    parts_fetched: int
    written: int
    skipped: int
    failed: list[str]
    elapsed: float


def check_shard(shard: tuple[int, int]) -> None:
    """ValueError unless *shard* (I, N) is one of N shards: ``0 <= I < N``."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count} does not exist (use I/N with 0 <= I < N)")


# The shard count of a Kubernetes Indexed Job (Kubernetes sets only the index).
SHARD_COUNT_VARIABLE = "OSSFS_SHARD_COUNT"


def _env_int(env: Mapping[str, str], name: str, *, least: int) -> int:
    text = env[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise UsageError(
            f"--shard auto: {name}='{printable(text)}' is not a whole number"
        ) from None
    if value < least:
        raise UsageError(f"--shard auto: {name}={value} must be at least {least}")
    return value


def shard_from_environment(
    env: Mapping[str, str], count: int | None = None
) -> tuple[tuple[int, int], str]:
    """``--shard auto``: shard (I, N) from the job runner's variables, and where it came from.

    - Kubernetes Indexed Job: ``JOB_COMPLETION_INDEX``; N is *count* (``--shard-count``)
      or ``$OSSFS_SHARD_COUNT``, since Kubernetes does not tell the pod the Job's
      completions.
    - Slurm job array: ``SLURM_ARRAY_TASK_ID`` among ``SLURM_ARRAY_TASK_COUNT`` tasks
      numbered from ``SLURM_ARRAY_TASK_MIN`` in steps of ``SLURM_ARRAY_TASK_STEP``
      (``--array=1-16`` is shards 0..15; ``--array=0-30:2`` shards 0..15).
    - torchrun and the like: ``RANK`` of ``WORLD_SIZE``.

    Several runners may be present (torchrun inside a Kubernetes Job): they must
    agree. A count given besides (*count* or the variable) must match too.
    UsageError, one line, when none is there or the values do not fit together.
    """
    given = count
    given_from = "--shard-count"
    if given is None and env.get(SHARD_COUNT_VARIABLE, "").strip():
        given, given_from = _env_int(env, SHARD_COUNT_VARIABLE, least=1), SHARD_COUNT_VARIABLE
    found = [
        shard
        for shard in (
            _kubernetes_shard(env, given, given_from),
            _slurm_shard(env),
            _torch_shard(env),
        )
        if shard is not None
    ]
    if not found:
        raise UsageError(
            "--shard auto found no job runner: set JOB_COMPLETION_INDEX "
            f"(Kubernetes Indexed Job, with --shard-count N or "
            f"{SHARD_COUNT_VARIABLE}), SLURM_ARRAY_TASK_ID and "
            "SLURM_ARRAY_TASK_COUNT (Slurm array), or RANK and WORLD_SIZE; "
            "or give --shard I/N"
        )
    shards = {shard for shard, _ in found}
    if len(shards) > 1:
        said = "; ".join(f"{i}/{n} from {why}" for (i, n), why in found)
        raise UsageError(f"--shard auto: the job runners disagree ({said}): give --shard I/N")
    shard, why = found[0]
    if given is not None and shard[1] != given:
        raise UsageError(
            f"--shard auto: {given_from}={given} does not match the {shard[1]} shards of {why}"
        )
    return shard, why


_Found = tuple[tuple[int, int], str] | None  # a shard and where it came from


def _kubernetes_shard(env: Mapping[str, str], given: int | None, given_from: str) -> _Found:
    if "JOB_COMPLETION_INDEX" not in env:
        return None
    index = _env_int(env, "JOB_COMPLETION_INDEX", least=0)
    if given is None:
        raise UsageError(
            f"--shard auto: JOB_COMPLETION_INDEX={index} (a Kubernetes "
            "Indexed Job) needs the shard count: give --shard-count N or "
            f"set {SHARD_COUNT_VARIABLE} to the Job's completions"
        )
    if index >= given:
        raise UsageError(
            f"--shard auto: JOB_COMPLETION_INDEX={index} is not below {given_from}={given}"
        )
    return (index, given), f"JOB_COMPLETION_INDEX={index}, {given_from}={given}"


def _slurm_shard(env: Mapping[str, str]) -> _Found:
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    if "SLURM_ARRAY_TASK_COUNT" not in env:
        raise UsageError(
            "--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not"
        )
    task = _env_int(env, "SLURM_ARRAY_TASK_ID", least=0)
    tasks = _env_int(env, "SLURM_ARRAY_TASK_COUNT", least=1)
    low = _env_int(env, "SLURM_ARRAY_TASK_MIN", least=0) if "SLURM_ARRAY_TASK_MIN" in env else 0
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP", least=1) if "SLURM_ARRAY_TASK_STEP" in env else 1
    index, off = divmod(task - low, step)
    high = env.get("SLURM_ARRAY_TASK_MAX", "").strip()
    last = low + (tasks - 1) * step
    if task < low or off or index >= tasks or (high and high != str(last)):
        raise UsageError(
            f"--shard auto: SLURM_ARRAY_TASK_ID={task} is not one of "
            f"SLURM_ARRAY_TASK_COUNT={tasks} evenly spaced tasks from "
            f"SLURM_ARRAY_TASK_MIN={low} (step {step}"
            + (f", SLURM_ARRAY_TASK_MAX={printable(high)}" if high else "")
            + "): use a range such as --array=0-N, or give --shard I/N"
        )
    why = f"SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_MIN={low}, SLURM_ARRAY_TASK_COUNT={tasks}"
    return (index, tasks), why


def _torch_shard(env: Mapping[str, str]) -> _Found:
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    if "RANK" not in env or "WORLD_SIZE" not in env:
        missing, present = ("WORLD_SIZE", "RANK") if "RANK" in env else ("RANK", "WORLD_SIZE")
        raise UsageError(f"--shard auto: {present} is set but {missing} is not")
    rank = _env_int(env, "RANK", least=0)
    size = _env_int(env, "WORLD_SIZE", least=1)
    if rank >= size:
        raise UsageError(f"--shard auto: RANK={rank} is not below WORLD_SIZE={size}")
    return (rank, size), f"RANK={rank}, WORLD_SIZE={size}"


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


def _destination(prefix: str, key: str) -> list[str] | None:
    """The path components of object *key* below the output directory; None when the
    key cannot be a safe relative path (``..``, empty components, overlong names)."""
    rel = key[len(prefix) :] if key.startswith(prefix) else key
    parts = rel.split("/")
    if not all(valid_name(p) for p in parts):
        return None
    return parts


_TEMP_SUFFIX = ".ossfs-tmp"


def _output_file(dir_fd: int, tmp: str) -> tuple[int, bool]:
    """A new file to write an object into, in the directory *dir_fd*: unnamed where the
    file system has O_TMPFILE, else named *tmp*; (descriptor, whether it is named)."""
    try:
        return os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666, dir_fd=dir_fd), False
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            raise
    return create_exclusive(tmp, 0o666, dir_fd=dir_fd), True


def _write_out(store: PartStore, meta: ObjectMeta, to_dir: str, parts: list[str]) -> bool:
    """Copy a complete object from the cache to ``to_dir/parts...`` (temp + rename).

    Returns False when the file there is already current. Raises UnsafeFileError
    when a directory on the way is a symbolic link (or not a directory).
    """
    root = os.open(to_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dir_fd = open_subdirectory(root, parts[:-1], shown_as=to_dir)
    finally:
        os.close(root)
    name = parts[-1]
    try:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (
                stat.S_ISREG(st.st_mode)
                and st.st_size == meta.size
                and int(st.st_mtime) == int(meta.mtime)
            ):
                return False
        except FileNotFoundError:
            pass
        # The bytes go to a file with no name (O_TMPFILE: nothing is left by a killed
        # run), which gets a name of its own only to be renamed over NAME. That name
        # is random: a fixed one ("NAME.ossfs-tmp") was taken over by a second run
        # writing NAME at the same time (the first then renamed the second's half-
        # written file into place), or was the finished output of a key so named.
        tail = f".{os.urandom(8).hex()}{_TEMP_SUFFIX}"
        tmp = fitted_name(name, NAME_MAX - len(tail)) + tail
        fd, named = _output_file(dir_fd, tmp)
        try:
            _copy(store.fileno(), fd, meta.size, meta.key)
            os.fsync(fd)
            os.utime(fd, (meta.mtime, meta.mtime))
            if not named:
                os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=dir_fd, follow_symlinks=True)
            # rename() replaces whatever has the name (a symlink too), never follows it.
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)
        os.fsync(dir_fd)
        return True
    finally:
        os.close(dir_fd)


# copy_file_range cannot copy between these (another file system on older kernels).
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


def _copy(src: int, dst: int, size: int, key: str) -> None:
    """Copy bytes ``[0, size)`` of *src* to *dst* (a new, empty file)."""
    offset = 0
    in_kernel = True
    while offset < size:
        if in_kernel:
            try:
                n = os.copy_file_range(src, dst, size - offset, offset, offset)
            except OSError as e:
                if e.errno not in _NO_COPY_RANGE:
                    raise
                in_kernel = False
                os.lseek(dst, offset, os.SEEK_SET)
                continue
        else:
            n = os.sendfile(dst, src, offset, min(size - offset, 8 << 20))
        if n == 0:
            raise OSError(errno.EIO, f"cache file of {printable(key)} ended early")
        offset += n


def _no_space(error: OSError, where: str) -> NoSpaceError:
    return NoSpaceError(
        f"{disk_full_reason(error)} writing {where}; what is already "
        "fetched is kept: free some space and run the same command again "
        "to continue",
        path=where,
    )


async def materialize(
    client: ObjectClient, cache: CacheDir, request: MaterializeRequest
) -> MaterializeResult:
    """Run *request*; per-object failures are collected, not raised."""
    began = time.monotonic()
    if request.shard is not None:
        try:
            check_shard(request.shard)
        except ValueError as e:
            raise UsageError(str(e)) from None
    run = _Run(client, cache, request)
    listed = await list_objects(client, request.bucket, request.key)
    if not listed:
        where = run.url(request.key)
        raise OssfsError(
            f"nothing to materialize: no object is {where} or under it"
            if request.key and not request.key.endswith("/")
            else f"nothing to materialize: no object under {where}"
        )
    run.objects = [o for o in listed if in_shard(o.key, request.shard)]
    if not run.objects and request.shard is not None:
        run.notice(
            f"shard {request.shard[0]}/{request.shard[1]} holds none of the "
            f"{len(listed)} object(s) under {run.url(request.key)}"
        )
    run.total = sum(o.size for o in run.objects)
    run.warn_if_too_large()
    # The cache is counted, and closed stores evicted ahead (a dataset larger than the
    # cache keeps it full), in worker threads; `admit` evicts inline only when
    # fetches outrun that.
    cache.apply_scan(await trio.to_thread.run_sync(cache.measure))
    with unwrap_groups():
        async with trio.open_nursery() as upkeep:
            run_upkeep(upkeep, cache, counted=True)
            await run.run_pass(list(range(len(run.objects))))
            await run.restart_changed()
            upkeep.cancel_scope.cancel()
    return MaterializeResult(
        objects=len(run.objects),
        total_bytes=run.total,
        bytes_fetched=run.fetcher.bytes_fetched,
        bytes_reused=run.reused,
        parts_fetched=run.fetcher.parts_fetched,
        written=run.written,
        skipped=run.skipped,
        failed=run.failed,
        elapsed=time.monotonic() - began,
    )


def consecutive_runs(parts: list[int], most: int) -> list[list[int]]:
    """*parts* (ascending) cut into runs of consecutive parts, of at most *most* each."""
    runs: list[list[int]] = []
    for part in parts:
        if runs and runs[-1][-1] == part - 1 and len(runs[-1]) < most:
            runs[-1].append(part)
        else:
            runs.append([part])
    return runs


class _Run:
    """One materialize run: the objects, what became of them, and the counters.

    Every part of every object goes through one channel to ``threads`` workers,
    in listing order, so early objects finish first (and can be written out early).
    """

    def __init__(self, client: ObjectClient, cache: CacheDir, request: MaterializeRequest) -> None:
        self.client = client
        self.cache = cache
        self.request = request
        self.fetcher = Fetcher(client, connections=request.threads, budget=cache)
        self.objects: list[ObjectMeta] = []
        self.total = 0  # bytes of all objects
        key = request.key
        self.prefix = (
            key if key.endswith("/") else (key.rsplit("/", 1)[0] + "/" if "/" in key else "")
        )
        self.done_bytes = 0  # cached so far, fetched or found
        self.reused = 0  # found in the cache
        self.objects_done = 0
        self.written = 0
        self.skipped = 0
        self.failed: list[str] = []
        self.remaining: dict[int, int] = {}  # object index -> runs of parts still to fetch
        self.stores: dict[int, PartStore] = {}
        self.object_failed: set[int] = set()
        self.changed: dict[int, str] = {}  # objects replaced while fetched: index -> the error

    def url(self, key: str) -> str:
        return object_url(self.request.scheme, self.request.bucket, key)

    def notice(self, message: str) -> None:
        say = self.request.notice or (lambda m: log.warning("%s", m))
        say(printable(message))

    def warn_if_too_large(self) -> None:
        cap = self.cache.max_bytes
        largest = max((o.size for o in self.objects), default=0)
        if self.request.to_dir is None and self.total > cap:
            self.notice(
                f"{format_size(self.total)} does not fit in the cache "
                f"({format_size(cap)}): the cache keeps its limit, so what is fetched "
                "first is evicted again (use --to DIR or a larger --cache-size)"
            )
        elif self.request.to_dir is not None and largest > cap:
            self.notice(
                f"the largest object ({format_size(largest)}) is larger than the "
                f"cache ({format_size(cap)}): each object passes through the cache "
                "whole on its way to --to, so the cache goes over its limit while it "
                "does (use ossfs download for such objects, or a larger --cache-size)"
            )

    def _progress(self, n: int) -> None:
        if self.request.progress is not None:
            self.request.progress(n, self.done_bytes, self.total)

    def on_bytes(self, n: int) -> None:
        self.done_bytes += n
        self._progress(n)

    async def run_pass(self, indexes: list[int]) -> None:
        async def feed(send: trio.MemorySendChannel[tuple[int, PartStore, list[int]]]) -> None:
            for i in indexes:
                await self._open(i, send)

        await run_pool(self.request.threads, feed, self._fetch_run, buffer=self.request.threads * 2)

    async def _open(
        self,
        i: int,
        send: trio.MemorySendChannel[tuple[int, PartStore, list[int]]],
    ) -> None:
        """Open object *i*'s store and send its missing parts to the workers."""
        meta, cache = self.objects[i], self.cache
        try:
            store = await self.fetcher.open_store(
                cache,
                object_identity(
                    self.request.bucket, meta.key, meta.etag, meta.size, self.request.part_size
                ),
            )
        except OSError as e:
            if is_disk_full(e):  # creating the store's index
                raise _no_space(e, f"the cache {cache.root}") from None
            raise
        self.stores[i] = store
        if self.request.to_dir is not None:
            # The whole object stays until it is complete and written out. Without
            # --to nothing is pinned: the cache keeps its cap and evicts what was
            # fetched first.
            cache.pin(store, range(store.layout.count))
            # Copied out as they are on disk: a part an earlier run (or another process)
            # cached is checked against its CRC-64 first, as a reader's first read of it
            # would (a crash can keep a record whose bytes never reached the disk).
            unchecked = [p for p in store.parts if p not in store.verified]
            bad = await trio.to_thread.run_sync(store.failing_parts, unchecked)
            if bad:
                log.warning(
                    "%s: %d cached part(s) failed their CRC check; fetching them again",
                    printable(self.url(meta.key)),
                    len(bad),
                )
                store.drop(bad)
        have = store.present_bytes
        self.reused += have
        self.done_bytes += have
        self._progress(0)
        runs = consecutive_runs(store.missing(), max(1, RUN_BYTES // store.layout.part_size))
        self.remaining[i] = len(runs)
        if not runs:
            await self._object_finished(i)
        for run in runs:
            await send.send((i, store, run))

    async def _fetch_run(self, item: tuple[int, PartStore, list[int]]) -> None:
        i, store, run = item
        cache = self.cache
        try:
            await self.fetcher.ensure_run(store, run, on_bytes=self.on_bytes)
        except NoSpaceError as e:
            # The cache's disk is full (or at its free-space floor): every other part
            # would fail the same way. Stop; what is cached stays.
            if isinstance(e.__cause__, OSError):
                raise _no_space(e.__cause__, f"the cache {cache.root}") from None
            raise NoSpaceError(
                f"{e}; what is already fetched is kept: free some space "
                "and run the same command again to continue",
                path=cache.root,
            ) from None
        except ObjectChangedError as e:
            if i not in self.object_failed:
                self.object_failed.add(i)
                self.changed[i] = str(e)
        except OssfsError as e:
            if i not in self.object_failed:
                self.object_failed.add(i)
                self.failed.append(printable(f"{self.url(self.objects[i].key)}: {e}"))
        except OSError as e:
            if is_disk_full(e):
                # Every other part would fail the same way: stop, keep what is cached.
                raise _no_space(e, f"the cache {cache.root}") from None
            raise
        self.remaining[i] -= 1
        if self.remaining[i] == 0:
            await self._object_finished(i)

    async def _object_finished(self, i: int) -> None:
        """Write object *i* out (with --to) and release its store."""
        store, meta = self.stores[i], self.objects[i]
        to_dir = self.request.to_dir
        dest = _destination(self.prefix, meta.key)
        try:
            if i not in self.object_failed and to_dir is not None:
                if dest is None:
                    self.skipped += 1
                    self.notice(f"skipping {meta.key}: it cannot be a file name under {to_dir}")
                elif await trio.to_thread.run_sync(_write_out, store, meta, to_dir, dest):
                    self.written += 1
        except UnsafeFileError as e:
            self.skipped += 1
            self.notice(f"skipping {meta.key}: {e}; nothing is written through it")
        except OSError as e:
            if is_disk_full(e):
                raise _no_space(e, os.path.join(to_dir or "", *(dest or []))) from None
            self.failed.append(printable(f"{self.url(meta.key)}: cannot write it out: {e}"))
        finally:
            if to_dir is not None:
                self.cache.unpin(store, range(store.layout.count))
            self.cache.release(store)
            self.objects_done += 1
            if self.request.on_object is not None:
                self.request.on_object(self.objects_done, len(self.objects))

    async def restart_changed(self) -> None:
        """Fetch again the objects replaced while they were fetched, like download does:
        the version there now, at most RESTARTS times."""
        for restart in range(RESTARTS + 1):
            if not self.changed:
                return
            again = sorted(self.changed)
            if restart == RESTARTS:
                for i in again:
                    self.failed.append(
                        f"{self.url(self.objects[i].key)}: it kept changing "
                        f"while it was fetched ({self.changed[i]})"
                    )
                return
            retry: list[int] = []
            for i in again:
                key = self.objects[i].key
                self.notice(f"{self.url(key)} changed while it was fetched: starting it over")
                try:
                    self.objects[i] = await self.client.head(self.request.bucket, key)
                except OssfsError as e:
                    self.failed.append(f"{self.url(key)}: {e}")
                    continue
                self.object_failed.discard(i)
                self.objects_done -= 1
                retry.append(i)
            self.changed.clear()
            self.total = sum(o.size for o in self.objects)
            if retry:
                await self.run_pass(retry)
