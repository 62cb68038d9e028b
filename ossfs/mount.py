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

import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyfuse3
import trio

from ossfs.cache.cachedir import CacheDir
from ossfs.client import ObjectClient
from ossfs.errors import OssfsError, UsageError, unwrap_groups
from ossfs.fetcher import Fetcher
from ossfs.fs import FsOptions, Operations
from ossfs.namespace import DEFAULT_MAX_DIR_ENTRIES, Namespace
from ossfs.prefetch import SiblingPrefetch

__all__ = ["MountConfig", "run", "check_mountpoint", "unmount"]

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
    max_dir_entries: int = DEFAULT_MAX_DIR_ENTRIES


def check_mountpoint(path: str) -> str:
    """The absolute mountpoint, or a UsageError saying why it cannot be used."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UsageError(f"mountpoint {path} holds a dead mount (its process is gone); "
                             f"run: ossfs unmount {path}") from None
        raise UsageError(f"mountpoint {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"mountpoint {path} is busy: something is already mounted there")
    del st
    return path


def unmount(path: str, *, lazy: bool = False) -> None:
    """Unmount a FUSE mount (also a dead one whose process is gone)."""
    import subprocess

    path = os.path.abspath(path)
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    try:
        result = subprocess.run(args, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        result = subprocess.run(["umount"] + (["-l"] if lazy else []) + [path],
                                capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise UsageError(f"cannot unmount {path}: {message[-1] if message else 'failed'}")


def _fuse_options(config: MountConfig) -> set[str]:
    opts = {"ro", "default_permissions", "noatime", "subtype=ossfs",
            f"fsname={config.source.replace(',', '_')}"}
    if config.allow_other:
        opts.add("allow_other")
    return opts


ClientFactory = Callable[[], ObjectClient]


async def _serve(config: MountConfig, make_client: ClientFactory,
                 ready: Callable[[str | None], None]) -> None:
    client = make_client()
    try:
        # One listing proves the endpoint, the credentials and the bucket.
        await client.list_page(config.bucket, prefix=config.prefix, delimiter="/", max_keys=1)
        cache = CacheDir(config.cache_dir, max_bytes=config.cache_size,
                         min_free_fraction=config.cache_min_free)

        async def reserve(store: Any, part: int, nbytes: int) -> None:
            cache.reserve_sync(store, part, nbytes)

        fetcher = Fetcher(client, connections=config.threads, reserve=reserve)
        ns = Namespace(client, config.bucket, config.prefix, ttl=config.ttl,
                       negative_ttl=config.negative_ttl, scheme=config.dialect,
                       max_dir_entries=config.max_dir_entries)
        started = time.time()

        def describe() -> dict[str, Any]:
            d = asdict(config)
            d["pid"] = os.getpid()
            return d

        def status() -> dict[str, Any]:
            # Kept small (an extended attribute holds at most 64 KiB): the per-object
            # list is read from the cache directory by `ossfs status` itself.
            return {
                "source": config.source,
                "pid": os.getpid(),
                "uptime": round(time.time() - started, 1),
                "cache_dir": cache.root,
                "cache_used_bytes": cache.rescan(),
                "cache_size_bytes": cache.max_bytes,
                "cache_evicted_bytes": cache.evicted_bytes,
                "bucket": config.bucket,
                "requests": client.stats.as_dict(),
                "parts_fetched": fetcher.parts_fetched,
                "bytes_fetched": fetcher.bytes_fetched,
                "fs_errors": ops.errors,
                "fs_reads": ops.reads,
                "parts_verified": ops.verifications,
                "sibling_prefetches": prefetch.started,
                "list_requests": ns.list_requests,
                "log_file": config.log_file,
            }

        fs_opts = FsOptions(uid=config.uid, gid=config.gid, umask=config.umask,
                            ttl=config.ttl, negative_ttl=config.negative_ttl,
                            part_size=config.part_size,
                            read_ahead_parts=max(1, config.read_ahead // config.part_size))
        prefetch = SiblingPrefetch(ns, cache, fetcher, config.part_size)
        ops = Operations(ns, fetcher, cache, fs_opts, describe=describe, status=status,
                         has_crc64=config.dialect == "oss", prefetch=prefetch)
        try:
            pyfuse3.init(ops, config.mountpoint, _fuse_options(config))
        except RuntimeError as e:
            raise UsageError(f"cannot mount on {config.mountpoint}: {e}") from None
        log.info("mounted %s on %s", config.source, config.mountpoint)
        ready(None)
        unmounted = False
        try:
            async with trio.open_nursery() as nursery:
                fetcher.attach(nursery)
                nursery.start_soon(_on_signals, nursery.cancel_scope)
                await pyfuse3.main()
                unmounted = True
                nursery.cancel_scope.cancel()
        finally:
            # After a signal pyfuse3.main was cancelled: unmount ourselves.
            pyfuse3.close(unmount=not unmounted)
            cache.close()
            log.info("unmounted %s", config.mountpoint)
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


async def _on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            scope.cancel()
            return


def run(config: MountConfig, make_client: ClientFactory,
        configure_logging: Callable[[str | None], None]) -> int:
    """Mount and serve until unmounted; daemonize first unless in the foreground."""
    if config.foreground:
        configure_logging(config.log_file)
        trio.run(_serve, config, make_client, lambda error: None)
        return 0

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("ready"):
            return 0
        os.waitpid(pid, 0)
        print(f"ossfs: error: {message.strip() or 'the mount process died during start-up'}",
              file=sys.stderr)
        return 1

    # The child: detach from the terminal, report readiness, serve.
    os.close(read_end)
    os.setsid()
    os.chdir("/")
    configure_logging(config.log_file)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    reported = False

    def ready(error: str | None) -> None:
        nonlocal reported
        if not reported:
            os.write(write_end, b"ready" if error is None else error.encode())
            os.close(write_end)
            reported = True

    code = 0
    try:
        with unwrap_groups():
            trio.run(_serve, config, make_client, ready)
    except OssfsError as e:
        log.error("%s", e)
        ready(str(e))
        code = 1
    except BaseException as e:  # the parent must hear about any failure
        log.exception("mount failed")
        ready(f"{type(e).__name__}: {e}")
        code = 1
    os._exit(code)

