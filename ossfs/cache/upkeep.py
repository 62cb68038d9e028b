"""A cache's background upkeep: the work a long-running process (a mount, a
`materialize` run) does in worker threads so its event loop never walks the cache.

- `count_cache`: recount the bytes on disk (all processes) now and every 30 s;
- `keep_spares`: make unnamed files for new small objects a batch at a time;
- `evict_ahead`: when a fetch is admitted with less than a twentieth of the cap
  (256 MiB at most) left below it, remove closed stores (least recently used first) until
  that room is free again. `CacheDir.admit` still evicts inline when fetches
  outrun this (the cap holds either way); with it, a cache kept full by a
  dataset larger than the cap is walked in the event loop only then.

`run_upkeep` starts all three in a nursery. `ossfs.cache.cachedir` stays free of
trio; this module is its only link to the event loop.

Must not import: httpx, pyfuse3.
"""

from __future__ import annotations

import logging

import trio

from ossfs.cache.cachedir import CacheDir

__all__ = [
    "COUNT_INTERVAL",
    "count_cache",
    "evict_ahead",
    "keep_spares",
    "run_upkeep",
]

log = logging.getLogger(__name__)

# How often the bytes in the cache are recounted (other processes write to it too).
COUNT_INTERVAL = 30.0


def run_upkeep(nursery: trio.Nursery, cache: CacheDir, *, counted: bool = False) -> None:
    """Start the cache's background tasks in *nursery* (they run until it is cancelled).

    *counted*: the caller has just counted the cache (the first recount waits).
    """
    cache.background_scan = True
    nursery.start_soon(count_cache, cache, counted)
    nursery.start_soon(keep_spares, cache)
    nursery.start_soon(evict_ahead, cache)


async def count_cache(cache: CacheDir, counted: bool = False) -> None:
    """Recount the cache's bytes in a worker thread, now (unless *counted*) and every
    `COUNT_INTERVAL`.

    A mount is ready before the first count ends: with 100k cached objects a walk
    of the cache takes a while, and a reader should not wait for it. (Until then the
    cache counts only what this process fetches.)
    """
    if counted:
        await trio.sleep(COUNT_INTERVAL)
    while True:
        try:
            on_disk = await trio.to_thread.run_sync(cache.measure)
        except Exception as e:  # (the mount must go on: counted again next time)
            log.warning("cache: cannot count %s: %s", cache.root, e)
        else:
            cache.apply_scan(on_disk)
        await trio.sleep(COUNT_INTERVAL)


class _Wakeup:
    """A call that wakes a waiting task: calls that come while it works count as one,
    and it is awake at first."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._event.set()

    def __call__(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


async def keep_spares(cache: CacheDir) -> None:
    """Keep unnamed files ready for new small objects, made in a worker thread a batch
    at a time (a new inode costs up to 200 us; one thread hop per batch, not per object)."""
    wakeup = cache.on_spares_low = _Wakeup()
    try:
        while True:
            await wakeup.wait()
            want = cache.spares_wanted()
            if want:
                try:
                    spares = await trio.to_thread.run_sync(cache.make_spares, want)
                except Exception as e:  # (a new small object then makes its own file)
                    log.warning("cache: cannot make spare files: %s", e)
                    continue
                cache.add_spares(spares)
    finally:
        cache.on_spares_low = None


async def evict_ahead(
    cache: CacheDir, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Free a twentieth of the cap (256 MiB at most) in a worker thread at start and
    whenever the cache says the room is running low (`CacheDir.on_room_low`: a fetch
    admitted, or a recount)."""
    wakeup = cache.on_room_low = _Wakeup()
    task_status.started()
    try:
        while True:
            await wakeup.wait()
            want = cache.evict_wanted()
            if want <= 0:
                continue
            open_here = cache.open_directories()
            token = cache.eviction_pass()
            try:
                freed = await trio.to_thread.run_sync(cache.evict_closed, want, open_here)
                cache.account_evicted(freed, want, token)
            except Exception as e:  # (the mount must go on: fetches evict inline)
                log.warning("cache: eviction pass failed: %s", e)
                continue
            log.debug("cache: evicted %d bytes ahead of fetches (wanted %d)", freed, want)
    finally:
        cache.on_room_low = None
