"""The cache's background upkeep: eviction ahead of fetches runs in a worker thread,
never in the event loop, and never removes a store that is open."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import trio

from ossfs.cache.cachedir import CacheDir, identity_for
from ossfs.cache.upkeep import evict_ahead
from tests.unit.test_cachedir import PART, closed_stores, put

CAP = 100 * PART


def full_cache(root: Path) -> list[str]:
    """A cache at *root* holding 50 closed stores of 2 parts (the whole cap), oldest
    first; their directories."""
    return closed_stores(root, 50, PART)


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
    """Wait (as a fetch waits for the network) until the evictor has caught up: it
    starts when less than half of its room (a twentieth of the cap) is left, and
    frees all of it."""
    with trio.fail_after(20):
        while cache.used_bytes > CAP - CAP // 40:
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


async def test_while_the_evictor_is_behind_guesses_wait_and_readers_take_the_slack(
    tmp_path: Path,
) -> None:
    full_cache(tmp_path / "c")
    cache = CacheDir(str(tmp_path / "c"), max_bytes=CAP, min_free_fraction=0.0)
    cache.rescan()
    slack = CAP // 20  # 5 parts
    gate = threading.Event()
    evict = cache.evict_closed

    def slow_evict(want: int, open_here: frozenset[str]) -> int:
        if threading.current_thread() is not threading.main_thread():
            gate.wait(20)  # the evictor's disk is slow to remove files
        return evict(want, open_here)

    cache.evict_closed = slow_evict  # type: ignore[method-assign]
    in_loop = record_walks(cache)
    new = cache.acquire(identity_for("b", "new", "E", 40 * PART, PART))
    async with trio.open_nursery() as nursery:
        await nursery.start(evict_ahead, cache)
        await trio.sleep(0.05)  # the evictor's first pass has started, and waits
        assert not cache.admit(new, 0, PART, readahead=True)  # a guess waits
        for p in range(slack // PART):  # readers take the slack, nothing walked
            put(cache, new, [p])
        assert not in_loop
        assert cache.used_bytes <= CAP + slack
        put(cache, new, [slack // PART])  # beyond the slack: evicted inline
        assert in_loop == [True]
        gate.set()
        await until_room(cache)
        assert cache.admit(new, 10, PART, readahead=True)  # room again for guesses
        cache.settle(new, 10, PART, written=0, committed=False, readahead=True)
        nursery.cancel_scope.cancel()
    assert cache.used_bytes <= CAP
    cache.release(new)
    cache.close()


async def test_with_no_closed_store_left_eviction_takes_parts_without_walking(
    tmp_path: Path,
) -> None:
    """An object larger than the cache, read through it: once the evictor found no
    closed store, read-ahead evicts the parts already read, as without an evictor."""
    cache = CacheDir(str(tmp_path / "c"), max_bytes=20 * PART, min_free_fraction=0.0)
    in_loop = record_walks(cache)
    big = cache.acquire(identity_for("b", "big", "E", 60 * PART, PART))
    async with trio.open_nursery() as nursery:
        await nursery.start(evict_ahead, cache)
        for p in range(60):
            assert cache.admit(big, p, PART, readahead=True), p  # never refused for long
            data = os.urandom(PART)
            big.write(p * PART, data)
            big.commit(p, 0)
            cache.settle(big, p, PART, written=PART, committed=True, readahead=False)
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert len(big.parts) <= 20
    assert in_loop.count(True) <= 2  # walked inline at most until the evictor ran dry
    cache.release(big)
    cache.close()


def test_a_store_being_deleted_is_not_counted_again(tmp_path: Path) -> None:
    """Two evictors (a worker thread and the event loop, or two processes) walk the
    cache at once: a store the other has renamed away for deletion is not freed, nor
    counted, a second time. A deleter that died leaves it for the next walk to delete."""
    dirs = full_cache(tmp_path / "c")
    mine = f"{dirs[0]}.evicted-{os.getpid()}"
    os.rename(dirs[0], mine)  # being deleted by this process (the other thread)
    gone = f"{dirs[1]}.evicted-{dead_pid()}"
    os.rename(dirs[1], gone)
    cache = CacheDir(str(tmp_path / "c"), max_bytes=CAP, min_free_fraction=0.0)
    assert cache.measure() == 48 * 2 * PART
    freed = cache.evict_closed(1 << 40, frozenset())
    assert freed == 48 * 2 * PART
    assert os.path.exists(mine)  # its deleter finishes it
    assert not os.path.exists(gone)
    cache.close()


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def test_stray_entries_in_the_cache_do_not_stop_counting_or_eviction(
    tmp_path: Path,
) -> None:
    """A file of somebody else's in a shard directory (an editor's backup, NFS's
    .nfsXXXX of a file unlinked while open), a symbolic link, a store whose data file
    cannot be opened: each is left alone, and the count and the evictor go on (they
    run in the mount's nursery, so an error there unmounted the file system)."""
    dirs = full_cache(tmp_path / "c")
    shard = os.path.dirname(dirs[0])
    Path(shard, ".nfs0000000000abcd").write_bytes(b"x" * 100)
    os.symlink("/etc", os.path.join(shard, "link"))
    os.mkdir(os.path.join(shard, "no-data-file"))  # (not a store)
    cache = CacheDir(str(tmp_path / "c"), max_bytes=CAP, min_free_fraction=0.0)
    counted = cache.rescan()
    assert counted >= 100 * PART
    new = cache.acquire(identity_for("b", "new", "E", 20 * PART, PART))
    async with trio.open_nursery() as nursery:
        await nursery.start(evict_ahead, cache)
        for p in range(20):
            put(cache, new, [p])
            await until_room(cache)
        nursery.cancel_scope.cancel()
    assert any(not os.path.exists(d) for d in dirs)  # evicted
    assert Path(shard, ".nfs0000000000abcd").exists() and os.path.islink(
        os.path.join(shard, "link")
    )
    cache.release(new)
    cache.close()


def test_when_the_evictor_finds_nothing_to_remove_the_cap_holds_at_rest(tmp_path: Path) -> None:
    """A reader's part went into the slack over the cap while the evictor was to make
    room; the evictor then found no closed store to remove. What is over the cap must
    come from the open stores' parts then, not stay until some later read."""
    cache = CacheDir(str(tmp_path / "c"), max_bytes=CAP, min_free_fraction=0.0)
    woken: list[bool] = []
    cache.on_room_low = lambda: woken.append(True)  # an evictor, busy elsewhere
    big = cache.acquire(identity_for("b", "big", "E", 200 * PART, PART))
    put(cache, big, list(range(100)))  # the whole cap
    with cache.pinned(big, [100]):
        put(cache, big, [100])  # a reader's part: into the slack
    assert cache.used_bytes > CAP and woken  # the evictor was asked
    token = cache.eviction_pass()
    want = cache.evict_wanted()
    freed = cache.evict_closed(want, cache.open_directories())  # (its pass: nothing)
    assert freed == 0
    cache.account_evicted(freed, want, token)
    assert cache.used_bytes <= CAP
    assert 100 in big.parts  # the reader's part stays; older ones went
    cache.on_room_low = None
    cache.release(big)
    cache.close()
