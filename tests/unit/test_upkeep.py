"""The cache's background upkeep: eviction ahead of fetches runs in a worker thread,
never in the event loop, and never removes a store that is open."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import trio

from ossfs.cache.cachedir import CacheDir, identity_for
from ossfs.cache.upkeep import evict_ahead
from tests.unit.test_cachedir import PART, put

CAP = 100 * PART


def full_cache(root: Path) -> list[str]:
    """A cache at *root* holding 50 closed stores of 2 parts (the whole cap), oldest
    first; their directories."""
    filler = CacheDir(str(root), max_bytes=1 << 40, min_free_fraction=0.0)
    dirs = []
    for i in range(50):
        s = filler.acquire(identity_for("b", f"old{i}", "E", 2 * PART, PART))
        put(filler, s, [0, 1])
        dirs.append(os.path.dirname(s.data_path))
        filler.release(s)
        os.utime(dirs[-1], (1000 + i, 1000 + i))
    filler.close()
    return dirs


def record_walks(cache: CacheDir) -> list[bool]:
    """Whether each eviction walk of *cache* ran in the event loop's thread."""
    in_loop: list[bool] = []
    walk = cache._walk

    def recorded() -> Iterator[tuple[str, os.stat_result]]:
        in_loop.append(threading.current_thread() is threading.main_thread())
        return walk()

    cache._walk = recorded  # type: ignore[method-assign]
    return in_loop


async def until_room(cache: CacheDir) -> None:
    """Wait (as a fetch waits for the network) until the evictor has caught up."""
    with trio.fail_after(20):
        while cache.evict_wanted() > 0:
            await trio.sleep(0.005)


async def test_eviction_ahead_runs_in_a_worker_thread(tmp_path: Path) -> None:
    dirs = full_cache(tmp_path / "c")
    cache = CacheDir(str(tmp_path / "c"), max_bytes=CAP, min_free_fraction=0.0)
    cache.rescan()
    in_loop = record_walks(cache)
    new = cache.acquire(identity_for("b", "new", "E", 40 * PART, PART))
    async with trio.open_nursery() as nursery:
        await nursery.start(evict_ahead, cache)
        await until_room(cache)  # started on a full cache: room is made at once
        for p in range(40):
            put(cache, new, [p])
            await until_room(cache)
        nursery.cancel_scope.cancel()
    assert in_loop and not any(in_loop), in_loop  # walked, never in the event loop
    assert set(new.parts) == set(range(40))  # nothing of the open store was punched
    gone = [d for d in dirs if not os.path.exists(d)]
    assert gone == dirs[: len(gone)]  # least recently used first
    assert cache.evicted_bytes >= len(gone) * 2 * PART > 0
    assert cache.rescan() <= CAP
    assert cache.used_bytes <= CAP - CAP // 20 + PART
    cache.release(new)
    cache.close()


def test_a_store_open_here_survives_a_stale_snapshot(tmp_path: Path) -> None:
    """The worker thread's list of open stores may be old: a store opened since is
    kept by its lock alone."""
    dirs = full_cache(tmp_path / "c")
    cache = CacheDir(str(tmp_path / "c"), max_bytes=CAP, min_free_fraction=0.0)
    held = cache.acquire(identity_for("b", "old0", "E", 2 * PART, PART))  # the oldest
    assert set(held.parts) == {0, 1}
    freed = cache.evict_closed(1 << 40, frozenset())  # as if nothing were open here
    assert os.path.exists(dirs[0]) and held.is_present(0)
    assert not any(os.path.exists(d) for d in dirs[1:])
    assert freed >= 49 * 2 * PART
    cache.release(held)
    cache.close()
