"""``ossfs mount``: wire client, cache, namespace, fetcher and FUSE together.

Start-up order matters for a good failure: the bucket is listed once before
anything is mounted, so bad credentials, a missing bucket or a busy
mountpoint end the command with one clear line and a non-zero exit. Without
``--foreground`` the process forks; the child mounts and tells the parent
through a pipe whether it is ready (exit 0) or why it failed (exit 1).

SIGINT and SIGTERM unmount cleanly; so does ``ossfs unmount`` (or
``fusermount3 -u``), after which `run` returns.

Must not import: httpx (the client is made by the caller's factory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from ossfs.cache.cachedir import CacheDir
from ossfs.cache.memory import DEFAULT_MEMORY_BUDGET, MemoryBudget
from ossfs.cache.upkeep import run_upkeep
from ossfs.client import ObjectClient
from ossfs.errors import OssfsError, UsageError, unwrap_groups
from ossfs.fetcher import Fetcher
from ossfs.fs import FsOptions, Operations
from ossfs.model import utc_stamp
from ossfs.mounttable import tune_kernel_read_ahead
from ossfs.namespace import DEFAULT_MAX_DIR_ENTRIES, Namespace
from ossfs.prefetch import SiblingPrefetch
from ossfs.pressure import DirtyPressure, read_cgroup, read_meminfo

if TYPE_CHECKING:
    # (imported when used: prometheus_client takes 65 ms to import)
    from ossfs.metrics import MetricsServer, OpTimes

__all__ = ["MountConfig", "run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class MountConfig:
    """Everything ``ossfs mount`` needs besides the client."""

    source: str
    bucket: str
    prefix: str
    mountpoint: str
    cache_dir: str
    cache_size: int
    cache_min_free: float
    part_size: int
    threads: int
    read_ahead: int
    kernel_read_ahead: int = 1 << 20  # bytes; 0: the kernel's default
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes; 0: never fetch into memory
    ttl: float
    negative_ttl: float
    uid: int
    gid: int
    umask: int
    allow_other: bool
    foreground: bool
    log_file: str | None
    profile: str | None
    endpoint: str
    dialect: str
    # How the connection was configured, so that `ossfs materialize PATH-IN-MOUNT`
    # finds the same credentials (e.g. a config file named by an fstab line).
    config_path: str | None = None
    region: str | None = None
    signature_version: str | None = None
    path_style: bool | None = None
    anonymous: bool = False
    max_dir_entries: int = DEFAULT_MAX_DIR_ENTRIES
    metrics: str | None = None  # ADDR:PORT of the Prometheus endpoint, for `describe`
    credentials: str = ""  # where the credentials come from (the provider), for `status`


def _fuse_options(config: MountConfig) -> set[str]:
    opts = {
        "ro",
        "default_permissions",
        "noatime",
        "subtype=ossfs",
        f"fsname={config.source.replace(',', '_')}",
    }
    if config.allow_other:
        opts.add("allow_other")
    return opts


ClientFactory = Callable[[], ObjectClient]
# Request loops pyfuse3 keeps waiting for the kernel. With its default of one, every
# request of a busy mount started a new loop (a task and a fresh request buffer) and
# ended another: that was about half the cost of a cached `ls -l` entry or open.
_FUSE_WORKERS = 16
# Recently closed small objects kept open for quick re-opens (ossfs.cache.cachedir).
_KEEP_IDLE = 1024


async def _serve(
    config: MountConfig,
    make_client: ClientFactory,
    ready: Callable[[str | None], None],
    metrics: MetricsServer | None = None,
) -> int | None:
    """Serve the mount; the signal that ended it, None when it was unmounted."""
    client = make_client()
    try:
        # One listing proves the endpoint, the credentials and the bucket.
        await client.list_page(config.bucket, prefix=config.prefix, delimiter="/", max_keys=1)
        _raise_fd_limit()
        m = _Mounted.build(config, client, timed=metrics is not None)
        try:
            pyfuse3.init(m.ops, config.mountpoint, _fuse_options(config))
        except RuntimeError as e:
            raise UsageError(f"cannot mount on {config.mountpoint}: {e}") from None
        log.info("mounted %s on %s", config.source, config.mountpoint)
        if metrics is not None:
            from ossfs.metrics import status_reader

            metrics.start(status_reader(m.status))
        ready(None)
        return await _run(config, m)
    finally:
        if metrics is not None:
            metrics.close()
        with trio.CancelScope(shield=True):
            await client.aclose()


@dataclass
class _Mounted:
    """What a mount is made of, wired together; `status` and `describe` read it."""

    config: MountConfig
    client: ObjectClient
    cache: CacheDir
    fetcher: Fetcher
    ns: Namespace
    prefetch: SiblingPrefetch
    pressure: DirtyPressure
    ops: Operations = field(init=False)
    op_times: OpTimes | None = None
    started: float = field(default_factory=time.time)

    @classmethod
    def build(cls, config: MountConfig, client: ObjectClient, *, timed: bool) -> _Mounted:
        cache = CacheDir(
            config.cache_dir,
            max_bytes=config.cache_size,
            min_free_fraction=config.cache_min_free,
            keep_idle=_KEEP_IDLE,
        )
        pressure = _dirty_pressure(config.cache_dir)
        memory = None
        if config.memory_budget > 0:
            memory = MemoryBudget(
                config.memory_budget, pinned=cache.is_pinned, left_over=cache.left_over
            )
        fetcher = Fetcher(
            client,
            connections=config.threads,
            budget=cache,
            read_ahead=config.read_ahead,
            memory=memory,
            pressure=pressure,
        )
        ns = Namespace(
            client,
            config.bucket,
            config.prefix,
            ttl=config.ttl,
            negative_ttl=config.negative_ttl,
            scheme=config.dialect,
            max_dir_entries=config.max_dir_entries,
        )
        prefetch = SiblingPrefetch(ns, cache, fetcher, config.part_size)
        m = cls(config, client, cache, fetcher, ns, prefetch, pressure)
        fs_opts = FsOptions(
            uid=config.uid,
            gid=config.gid,
            umask=config.umask,
            ttl=config.ttl,
            negative_ttl=config.negative_ttl,
            part_size=config.part_size,
        )
        m.ops = Operations(
            ns,
            fetcher,
            cache,
            fs_opts,
            describe=m.describe,
            status=m.status,
            has_crc64=config.dialect == "oss",
            prefetch=prefetch,
        )
        if timed:
            from ossfs.metrics import OpTimes, time_operations

            m.op_times = OpTimes()
            time_operations(m.ops, m.op_times)
        return m

    def describe(self) -> dict[str, Any]:
        d = asdict(self.config)
        d["pid"] = os.getpid()
        return d

    def status(self) -> dict[str, Any]:
        # Kept small (an extended attribute holds at most 64 KiB): the per-object
        # list is read from the cache directory by `ossfs status` itself.
        config, cache, fetcher, ops = self.config, self.cache, self.fetcher, self.ops
        return {
            "source": config.source,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "cache_dir": cache.root,
            # The count kept up to date by `ossfs.cache.upkeep` (a walk of a cache
            # of 100k objects here would stall every request for seconds).
            "cache_used_bytes": cache.used_bytes,
            "cache_size_bytes": cache.max_bytes,
            "cache_evicted_bytes": cache.evicted_bytes,
            "bucket": config.bucket,
            "requests": self.client.stats.as_dict(),
            "parts_fetched": fetcher.parts_fetched,
            "bytes_fetched": fetcher.bytes_fetched,
            "fs_errors": ops.errors,
            "fs_reads": ops.reads,
            "fs_requests": dict(ops.requests),
            "parts_verified": ops.reader.verifications,
            "cache_hit_bytes": ops.reader.hit_bytes,
            "cache_miss_bytes": ops.reader.miss_bytes,
            "buffered_bytes": getattr(self.client, "buffered_bytes", 0),
            "crc_mismatches": fetcher.crc_mismatches,
            "uncached_bytes": fetcher.uncached_bytes,
            "memory_bytes": fetcher.memory.fetched_bytes if fetcher.memory else 0,
            "memory_held_bytes": fetcher.memory.held if fetcher.memory else 0,
            "memory_peak_bytes": fetcher.memory.peak if fetcher.memory else 0,
            "memory_budget": config.memory_budget,
            "cache_disk_behind": self.pressure(),
            "dirty_cgroup": self.pressure.cgroup_dir,
            "sibling_prefetches": self.prefetch.started,
            "list_requests": self.ns.list_requests,
            "log_file": config.log_file,
            "metrics": config.metrics,
            "credentials": config.credentials,
            "credentials_expire": _expiration(self.client),
            **({"fs_op_seconds": self.op_times.as_dict()} if self.op_times is not None else {}),
        }


def _dirty_pressure(cache_dir: str) -> DirtyPressure:
    # The tests' way to make a mount see a cache disk that is behind (or not) without
    # slowing a real disk: OSSFS_MEMINFO names a file read instead of /proc/meminfo,
    # OSSFS_CGROUP a directory read as the daemon's memory cgroup.
    meminfo = os.environ.get("OSSFS_MEMINFO")
    cgroup = os.environ.get("OSSFS_CGROUP")
    return DirtyPressure(
        meminfo=(lambda: read_meminfo(meminfo)) if meminfo else read_meminfo,
        cgroup=(lambda: read_cgroup([cgroup])) if cgroup else None,
        cgroup_dir=cgroup,
        cache_dir=cache_dir,
    )


async def _run(config: MountConfig, m: _Mounted) -> int | None:
    """Answer the kernel until unmounted or signalled (the signal's number), then
    unmount and close the cache."""
    unmounted = False
    received: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            m.fetcher.attach(nursery)
            m.ns.attach(nursery)
            run_upkeep(nursery, m.cache)
            nursery.start_soon(_on_signals, nursery.cancel_scope, received)
            if config.kernel_read_ahead > 0:
                nursery.start_soon(
                    _after_init, config.mountpoint, max(4, config.kernel_read_ahead // 1024)
                )
            await pyfuse3.main(min_tasks=_FUSE_WORKERS)
            unmounted = True
            nursery.cancel_scope.cancel()
    finally:
        # After a signal pyfuse3.main was cancelled: unmount ourselves.
        pyfuse3.close(unmount=not unmounted)
        m.cache.close()
        log.info("unmounted %s", config.mountpoint)
    return received[0] if received else None


def _expiration(client: ObjectClient) -> str | None:
    """When the temporary credentials in use expire (ISO 8601, UTC); None for keys
    that do not, or before the first are fetched."""
    source = getattr(client, "credentials", None)
    issued = getattr(source, "current", None)
    expiration = getattr(issued, "expiration", None)
    if expiration is None:
        return None
    return utc_stamp(expiration)


async def _after_init(mountpoint: str, kb: int) -> None:
    """Set the kernel read-ahead once the kernel has our INIT answer (which would lower
    it again): a stat from a worker thread returns only after that."""

    def stat_then_tune() -> None:
        with suppress(OSError):
            os.stat(mountpoint)
        if tune_kernel_read_ahead(mountpoint, kb):
            log.debug("kernel read-ahead of %s set to %d KiB", mountpoint, kb)

    await trio.to_thread.run_sync(stat_then_tune, abandon_on_cancel=True)


def _raise_fd_limit() -> None:
    """Allow as many open files as the system lets this user (idle small objects are
    kept open, and every open file and fetch holds one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _on_signals(scope: trio.CancelScope, received: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            received.append(signum)
            scope.cancel()
            return


def _captured(fd: int) -> str:
    """What was written to *fd* (a memory file): its lines joined, control bytes escaped."""
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, min(size, 4096), 0)
    except OSError:
        return ""
    lines = [ln.strip() for ln in raw.decode(errors="replace").splitlines() if ln.strip()]
    text = "; ".join(lines)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run(
    config: MountConfig,
    make_client: ClientFactory,
    configure_logging: Callable[[str | None], None],
    metrics: MetricsServer | None = None,
) -> int:
    """Mount and serve until unmounted; daemonize first unless in the foreground.

    *metrics* (bound by the caller, so that a port in use fails before anything
    starts) serves from the process that serves the mount.
    """
    if config.foreground:
        configure_logging(config.log_file)
        # Ctrl-C: 130 as for every command. SIGTERM and SIGHUP are how a service
        # manager stops a mount: a clean stop, like an unmount.
        signum = trio.run(_serve, config, make_client, lambda error: None, metrics)
        return 130 if signum == signal.SIGINT else 0

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        if metrics is not None:
            metrics.close()  # the child serves it (its copy of the socket stays open)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("ready"):
            return 0
        os.waitpid(pid, 0)
        print(
            f"ossfs: error: {message.strip() or 'the mount process died during start-up'}",
            file=sys.stderr,
        )
        return 1

    # The child: detach from the terminal, report readiness, serve.
    os.close(read_end)
    os.setsid()
    os.chdir("/")
    configure_logging(config.log_file)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    # Until the mount is up, stderr goes to a memory file: libfuse and fusermount3
    # write the reason a mount fails there (not into the exception), and the parent
    # must be able to show it.
    early = os.memfd_create("ossfs-mount-stderr")
    os.dup2(early, 2)
    reported = False

    def ready(error: str | None) -> None:
        nonlocal reported
        if not reported:
            if error is not None:
                said = _captured(early)
                if said and said not in error:
                    error = f"{error} ({said})"
            os.write(write_end, b"ready" if error is None else error.encode())
            os.close(write_end)
            os.dup2(devnull, 2)
            os.close(early)
            reported = True

    code = 0
    try:
        with unwrap_groups():
            trio.run(_serve, config, make_client, ready, metrics)
    except OssfsError as e:
        log.error("%s", e)
        ready(str(e))
        code = 1
    except BaseException as e:  # the parent must hear about any failure
        log.exception("mount failed")
        ready(f"{type(e).__name__}: {e}")
        code = 1
    os._exit(code)
