"""The cache directory: keys never become paths, the cap holds, readers are respected."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
from pathlib import Path

import pytest

from ossfs.cache.cachedir import CacheDir, identity_for
from ossfs.cache.store import UPGRADE_BYTE, PartStore, _ofd_lock
from ossfs.crc import crc64

PART = 64 * 1024


def put(cache: CacheDir, store: PartStore, parts: list[int]) -> None:
    for p in parts:
        first, end = store.layout.bounds(p)
        assert cache.admit(store, p, end - first, readahead=False)
        data = os.urandom(end - first)
        store.write(first, data)
        store.commit(p, crc64(data))
        cache.settle(store, p, end - first, written=end - first, committed=True, readahead=False)


def closed_stores(root: Path, count: int, part_size: int) -> list[str]:
    """*count* closed stores of 2 parts (``old0``, ``old1``...) in the cache at *root*,
    least recently used first; their directories."""
    filler = CacheDir(str(root), max_bytes=1 << 40, min_free_fraction=0.0)
    dirs = []
    for i in range(count):
        s = filler.acquire(identity_for("b", f"old{i}", "E", 2 * part_size, part_size))
        put(filler, s, [0, 1])
        dirs.append(os.path.dirname(s.data_path))
        filler.release(s)
        os.utime(dirs[-1], (1000 + i, 1000 + i))
    filler.close()
    return dirs


def test_layout_is_private_and_keys_are_hashed(tmp_path: Path) -> None:
    cache = CacheDir(str(tmp_path / "c"), max_bytes=1 << 30)
    store = cache.acquire(identity_for("b", "../../etc/passwd", "E", PART, PART))
    assert store.data_path.startswith(str(tmp_path / "c" / "objects"))
    assert "passwd" not in store.data_path
    assert os.stat(tmp_path / "c").st_mode & 0o777 == 0o700
    assert os.stat(os.path.dirname(store.data_path)).st_mode & 0o777 == 0o700
    cache.release(store)


def test_lru_objects_are_evicted_first(tmp_path: Path) -> None:
    cache = CacheDir(str(tmp_path / "c"), max_bytes=6 * PART, min_free_fraction=0.0)
    stores = []
    for i in range(3):
        s = cache.acquire(identity_for("b", f"k{i}", "E", 2 * PART, PART))
        put(cache, s, [0, 1])
        cache.release(s)
        stores.append(s)
        # Make k0 the least recently used on disk.
        os.utime(os.path.dirname(s.data_path), (1000 + i, 1000 + i))
    s = cache.acquire(identity_for("b", "k3", "E", 2 * PART, PART))
    put(cache, s, [0, 1])
    keys = sorted(o.key for o in cache.objects())
    assert keys == ["k1", "k2", "k3"]
    assert cache.rescan() <= 6 * PART + 4 * 4096


def test_object_larger_than_cap_keeps_pinned_parts(tmp_path: Path) -> None:
    cache = CacheDir(str(tmp_path / "c"), max_bytes=3 * PART, min_free_fraction=0.0)
    s = cache.acquire(identity_for("b", "huge", "E", 10 * PART, PART))
    with cache.pinned(s, [0]):
        put(cache, s, list(range(10)))
        assert s.is_present(0)  # pinned: never evicted
    assert len(s.parts) <= 4
    assert s.is_present(9)  # the newest stays
    assert cache.rescan() <= 4 * PART + 4 * 4096  # holes were punched


def _hold(root: str, ready: object, stop: object) -> None:
    cache = CacheDir(root, max_bytes=1 << 30)
    s = cache.acquire(identity_for("b", "held", "E", PART, PART))
    ready.set()  # type: ignore[attr-defined]
    stop.wait(20)  # type: ignore[attr-defined]
    cache.release(s)


def test_store_held_by_another_process_is_not_evicted(tmp_path: Path) -> None:
    root = str(tmp_path / "c")
    cache = CacheDir(root, max_bytes=1 << 30)
    s = cache.acquire(identity_for("b", "held", "E", PART, PART))
    put(cache, s, [0])
    cache.release(s)
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(root, ready, stop))
    proc.start()
    try:
        assert ready.wait(20)
        cache.max_bytes = 0  # everything must go, if it can
        other = cache.acquire(identity_for("b", "new", "E", PART, PART))
        put(cache, other, [0])
        assert "held" in {o.key for o in cache.objects()}
    finally:
        stop.set()
        proc.join(20)
    assert proc.exitcode == 0


def test_failed_part_eviction_keeps_our_shared_lock(tmp_path: Path) -> None:
    # Our own open store, also held by another process: evicting its parts must fail,
    # and must not cost us the shared lock that keeps others from evicting it.
    root = str(tmp_path / "c")
    cache = CacheDir(root, max_bytes=1 << 30, min_free_fraction=0.0)
    store = cache.acquire(identity_for("b", "held", "E", PART, PART))
    put(cache, store, [0])
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(root, ready, stop))
    proc.start()
    try:
        assert ready.wait(20)
        cache.max_bytes = 0
        other = cache.acquire(identity_for("b", "new", "E", PART, PART))
        put(cache, other, [0])  # tries (and fails) to punch parts out of "held"
        assert store.is_present(0)
    finally:
        stop.set()
        proc.join(20)
    assert proc.exitcode == 0
    probe = os.open(store.data_path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)


def test_a_store_is_not_evicted_while_another_process_tries_to_take_it(tmp_path: Path) -> None:
    """Two processes share a store (two caches of one directory: their locks are as
    two processes' are). The first tries to take it for itself to evict parts, and
    fails, which drops its shared lock for a moment (flock(2) converts by unlocking
    first). In that moment the second must not take it and punch parts the first is
    reading: it sees the first one's claim (an OFD lock on a byte far past the end)."""
    a = CacheDir(str(tmp_path / "c"), max_bytes=1 << 30, min_free_fraction=0.0)
    b = CacheDir(str(tmp_path / "c"), max_bytes=1 << 30, min_free_fraction=0.0)
    ident = identity_for("b", "k", "E", 4 * PART, PART)
    sa, sb = a.acquire(ident), b.acquire(ident)
    put(a, sa, [0, 1, 2, 3])
    sb.refresh()
    # The first process, in the middle of its failed conversion:
    assert _ofd_lock(sa.fileno(), UPGRADE_BYTE, 1, fcntl.F_WRLCK)
    fcntl.flock(sa.fileno(), fcntl.LOCK_UN)
    assert not b._evict_parts(b._by_store[id(sb)], [1])
    assert set(sb.parts) == {0, 1, 2, 3}
    fcntl.flock(sa.fileno(), fcntl.LOCK_SH)
    _ofd_lock(sa.fileno(), UPGRADE_BYTE, 1, fcntl.F_UNLCK)
    a.release(sa)
    # Alone now, the second one may.
    assert b._evict_parts(b._by_store[id(sb)], [1])
    assert set(sb.parts) == {0, 2, 3}
    b.release(sb)
    a.close()
    b.close()
