"""Small objects in the cache: one file each, published whole, CRC-checked, evicted by unlink."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from ossfs.cache import cachedir as cachedir_module
from ossfs.cache.cachedir import CacheDir, identity_for
from ossfs.cache.small import SmallStore
from ossfs.cache.store import PartStore
from ossfs.crc import crc64

PART = 64 * 1024


def fetch(cache: CacheDir, store: PartStore, data: bytes) -> None:
    """What the fetcher does for a small object: admit, write, commit, settle."""
    assert cache.admit(store, 0, len(data), readahead=False)
    store.write(0, data)
    store.commit(0, crc64(data))
    cache.settle(store, 0, len(data), written=len(data), committed=True, readahead=False)


def entries(root: Path) -> list[Path]:
    """Everything under objects/ (files and directories)."""
    return sorted(p for p in (root / "objects").rglob("*"))


def files(root: Path) -> list[Path]:
    return [p for p in entries(root) if p.is_file()]


def test_a_small_object_is_one_file_with_its_crc(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = CacheDir(str(root), max_bytes=1 << 30)
    data = os.urandom(5000)
    store = cache.acquire(identity_for("b", "dir/x.txt", "E1", len(data), PART))
    assert isinstance(store, SmallStore)
    # Nothing is visible until the object is complete (the bytes go to an unnamed file).
    store.write(0, data[:100])
    assert files(root) == []
    fetch(cache, store, data)
    cache.release(store)
    (entry,) = files(root)
    assert entry.name.endswith(".o") and "x.txt" not in entry.name
    assert entry.parent.parent == root / "objects"  # objects/ab/<hash>.o: no directory
    assert entry.stat().st_mode & 0o777 == 0o600
    assert entry.read_bytes()[: len(data)] == data
    # Another process (another CacheDir) finds it, complete, and its CRC holds.
    other = CacheDir(str(root), max_bytes=1 << 30)
    again = other.acquire(identity_for("b", "dir/x.txt", "E1", len(data), PART))
    assert again.complete and again.read(0, len(data)) == data
    assert again.verify(0)
    # ... also with another part size (materialize with its own --part-size).
    third = CacheDir(str(root), max_bytes=1 << 30)
    big_parts = third.acquire(identity_for("b", "dir/x.txt", "E1", len(data), 4 * PART))
    assert big_parts.complete
    info = [o for o in cachedir_module.cached_objects(str(root))]
    assert [(o.key, o.etag, o.size, o.cached_bytes) for o in info] == [
        ("dir/x.txt", "E1", len(data), len(data))
    ]
    for c, s in ((other, again), (third, big_parts)):
        c.release(s)
    # Another version of the key is another file.
    new = cache.acquire(identity_for("b", "dir/x.txt", "E2", len(data), PART))
    assert not new.complete
    cache.release(new)


def test_opening_does_not_walk_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "c"
    cache = CacheDir(str(root), max_bytes=1 << 30)
    for i in range(50):
        s = cache.acquire(identity_for("b", f"k{i}", "E", 100, PART))
        fetch(cache, s, os.urandom(100))
        cache.release(s)

    def no_walk(root: str) -> object:
        raise AssertionError("the cache was walked")

    monkeypatch.setattr(cachedir_module, "_walk", no_walk)
    again = CacheDir(str(root), max_bytes=1 << 30)  # a mount starting over 100k objects
    again.background_scan = True  # the mount counts in a worker thread
    s = again.acquire(identity_for("b", "k7", "E", 100, PART))
    assert s.complete
    t = again.acquire(identity_for("b", "new", "E", 100, PART))
    fetch(again, t, b"y" * 100)
    again.release(s)
    again.release(t)
    monkeypatch.undo()
    assert again.rescan() >= 51 * 100


def _die_while_writing(root: str, ready: multiprocessing.synchronize.Event) -> None:
    cache = CacheDir(root, max_bytes=1 << 30)
    store = cache.acquire(identity_for("b", "half", "E", 60000, PART))
    store.write(0, b"z" * 30000)
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


def test_kill_during_a_write_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "c"
    CacheDir(str(root), max_bytes=1 << 30)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_die_while_writing, args=(str(root), ready))
    child.start()
    child.join(30)
    assert ready.is_set() and child.exitcode == -signal.SIGKILL
    assert files(root) == []  # no half object, no temp file
    cache = CacheDir(str(root), max_bytes=1 << 30)
    store = cache.acquire(identity_for("b", "half", "E", 60000, PART))
    assert not store.complete
    data = os.urandom(60000)
    fetch(cache, store, data)
    assert store.read(0, 60000) == data
    cache.release(store)


def test_a_torn_file_is_discarded(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = CacheDir(str(root), max_bytes=1 << 30)
    ident = identity_for("b", "t", "E", 8000, PART)
    s = cache.acquire(ident)
    fetch(cache, s, os.urandom(8000))
    cache.release(s)
    (entry,) = files(root)
    # A power loss kept the name but not all of the bytes: the trailer is gone.
    with open(entry, "r+b") as f:
        f.truncate(8010)
    seen: list[str] = []
    cache2 = CacheDir(str(root), max_bytes=1 << 30)
    s2 = SmallStore.open_small(ident, str(entry), on_discard=lambda d: seen.append(d.reason))
    assert not s2.complete and seen and "torn" in seen[0]
    assert not entry.exists()  # discarded
    s2.close()
    # Bytes lost but the trailer intact (zeros where data was): the CRC check finds it.
    s3 = cache2.acquire(ident)
    fetch(cache2, s3, os.urandom(8000))
    cache2.release(s3)
    with open(entry, "r+b") as f:
        f.write(b"\0" * 4096)
    cache3 = CacheDir(str(root), max_bytes=1 << 30)
    s4 = cache3.acquire(ident)
    assert s4.complete and not s4.verify(0)
    s4.drop([0])
    assert not s4.complete and not entry.exists()
    data = os.urandom(8000)
    fetch(cache3, s4, data)  # fetched again into a new file
    assert entry.exists() and s4.read(0, 8000) == data
    cache3.release(s4)
    assert CacheDir(str(root), max_bytes=1 << 30).acquire(ident).verify(0)


def test_a_file_of_another_version_is_not_used(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = CacheDir(str(root), max_bytes=1 << 30)
    old = identity_for("b", "v", "OLD", 3000, PART)
    new = identity_for("b", "v", "NEW", 3000, PART)
    s = cache.acquire(old)
    fetch(cache, s, b"o" * 3000)
    cache.release(s)
    (entry,) = files(root)
    # Plant the old version's file under the new version's name.
    target = Path(cache._dir_for(new))
    target.parent.mkdir(exist_ok=True)
    os.rename(entry, target)
    reasons: list[str] = []
    s2 = SmallStore.open_small(new, str(target), on_discard=lambda d: reasons.append(d.reason))
    assert not s2.complete and "changed" in reasons[0]
    s2.close()


def test_eviction_spares_what_readers_hold(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = CacheDir(str(root), max_bytes=10 * 4096 * 2, min_free_fraction=0.0)
    held = cache.acquire(identity_for("b", "held", "E", 4096, PART))
    fetch(cache, held, b"h" * 4096)
    # Open here and pinned by a reader (between its presence check and its copy).
    cache.pin(held, [0])
    # Open in another process: it holds a shared lock on the file.
    kept = cache.acquire(identity_for("b", "kept", "E", 4096, PART))
    fetch(cache, kept, b"k" * 4096)
    cache.release(kept)
    (kept_file,) = [p for p in files(root) if p.name == os.path.basename(kept.data_path)]
    other_fd = os.open(kept_file, os.O_RDONLY)
    fcntl.flock(other_fd, fcntl.LOCK_SH)
    try:
        for i in range(40):  # far more than fits: everything else is evicted
            s = cache.acquire(identity_for("b", f"x{i}", "E", 4096, PART))
            fetch(cache, s, b"x" * 4096)
            cache.release(s)
        assert held.is_present(0) and held.read(0, 4096) == b"h" * 4096
        assert os.path.exists(held.data_path)
        assert kept_file.exists()
        assert len(files(root)) < 40
    finally:
        os.close(other_fd)
    cache.unpin(held, [0])
    # Not held any more: an open store's object goes like any unheld part (here every
    # other store is open too, so whole closed stores cannot make the room).
    opened = []
    for i in range(40, 80):
        s = cache.acquire(identity_for("b", f"x{i}", "E", 4096, PART))
        fetch(cache, s, b"x" * 4096)
        opened.append(s)
    assert not held.is_present(0) and not os.path.exists(held.data_path)
    assert not kept_file.exists()
    for s in opened:
        cache.release(s)
    # The evicted object reads again after a new fetch.
    fetch(cache, held, b"H" * 4096)
    assert held.read(0, 4096) == b"H" * 4096 and os.path.exists(held.data_path)
    cache.release(held)


def test_new_small_objects_use_unnamed_files_made_ahead(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = CacheDir(str(root), max_bytes=1 << 30)
    low: list[bool] = []
    cache.on_spares_low = lambda: low.append(True)
    cache.add_spares(cache.make_spares(cache.spares_wanted()))
    assert cache.spares_wanted() == 0
    assert files(root) == []  # unnamed: nothing to see, nothing left after a crash
    ident = identity_for("b", "new", "E", 2000, PART)
    assert cache.new_small(ident) is None  # only right after a miss
    assert cache.find_small(ident) is None
    store = cache.new_small(ident)
    assert store is not None and not store.complete
    assert cache.spares_wanted() == 1
    data = os.urandom(2000)
    fetch(cache, store, data)
    cache.release(store)
    (entry,) = files(root)
    assert entry.read_bytes()[:2000] == data
    found = cache.find_small(ident)
    assert found is not None and found.complete and found.verify(0)
    cache.release(found)
    for i in range(40):
        assert cache.find_small(identity_for("b", f"n{i}", "E", 10, PART)) is None
        s = cache.new_small(identity_for("b", f"n{i}", "E", 10, PART))
        assert s is not None
        cache.release(s)
    assert low  # told to make more when half are used
    cache.close()
