"""The cache directory: one part store per object version, under a size cap.

Layout (``docs/cache-format.md``)::

    ROOT/                     0700
      FORMAT                  "ossfs-cache 1"
      objects/ab/<sha256>/    0700, one per object version (bucket, key, ETag, size, part size)
        data                  0600, sparse: only fetched parts take space
        index                 0600, the part journal (see ossfs.cache.index)

A key never becomes a path: directories are named by a hash of the version's
identity, so no key can reach outside ROOT.

Sharing: any number of processes (a mount, ``ossfs materialize``, a second
mount) use one ROOT at once. A process holds ``flock(LOCK_SH)`` on the
``data`` file of every store it has open; eviction of another process's store
needs ``LOCK_EX`` without waiting, so a store somebody reads is never deleted
under them. Parts fetched by one process reach the others through the index.

Bounds (``docs/cache-format.md``, "Eviction"): every fetch reserves its
part's bytes with `CacheDir.admit` before anything is written, and gives the
reservation back with `CacheDir.settle` when it ends. Room is made under
``max_bytes`` and above a free-space floor by evicting least recently used
data: first whole stores nobody holds, then parts of open stores that are
*free*. A part is held, never punched, while

- a reader has it pinned (from the presence check to the end of its read),
- it is being fetched (reserved and not yet settled), or
- read-ahead fetched it and no reader has read it to its end yet (for at
  most ``HOLD_SECONDS``: a stream that stopped does not hold it forever).

Where eviction runs: `admit` removes stores itself (in the caller's thread)
unless an evictor in a worker thread is attached (`on_room_low`,
`ossfs.cache.upkeep`): then closed stores are removed ahead of need there, and
while it is behind read-ahead is refused and a reader's part may go over the
cap by a twentieth of it (or waits, with *wait*). Once no closed store is left
(`_dry`) eviction takes parts of open stores without walking the cache.

Read-ahead is admitted only when the bytes held plus its part fit in the cap,
so a guess never evicts what a reader still needs and is never thrown away
before it is read. A reader's own part is always admitted: when nothing can
go, the cache goes over the cap by at most one part per connection (logged),
so an object larger than the cap still reads correctly.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

from cachetools import LRUCache

from ossfs.cache.index import IndexCorrupt, IndexFile, PartRecord, StoreIdentity
from ossfs.cache.small import (
    SUFFIX,
    TMP_PREFIX,
    SmallStore,
    SmallTrailer,
    make_unnamed,
    read_trailer,
    remove_small,
    small_name,
)
from ossfs.cache.store import PartStore
from ossfs.errors import CheckpointError, NoSpaceError
from ossfs.fsutil import punch_hole
from ossfs.model import (
    DEFAULT_CACHE_PART_SIZE,
    WHOLE_OBJECT_MAX,
    format_size,
    store_part_size,
)

__all__ = [
    "CacheDir",
    "CachedObjectInfo",
    "identity_for",
    "object_identity",
    "earlier_identity",
    "cached_objects",
]

log = logging.getLogger(__name__)

FORMAT = "ossfs-cache 1"
# How often (seconds) the byte count is re-read from disk to include other processes.
_RESCAN_INTERVAL = 30.0
# Store directories touched at most this often (seconds) for the LRU order.
_TOUCH_INTERVAL = 60.0
# How long a part fetched ahead of a stream is kept for it without being read.
HOLD_SECONDS = 60.0
# An over-the-cap state is logged at most this often (seconds).
_OVER_LOG_INTERVAL = 30.0
# Eviction of whole stores frees up to this much more than asked (and 2% of the cap
# at most), so that a cache of many small objects is walked rarely.
_EVICT_EXTRA = 64 << 20
# An evictor in the background (`on_room_low`) keeps this much room below the cap free
# (a twentieth of the room at most: of the cap, or less when the disk is nearly full),
# so that fetches find room without evicting inline.
_AHEAD_ROOM = 256 << 20
# Closed small objects kept open (`keep_idle`) hold at most this many bytes.
_IDLE_MAX_BYTES = 64 << 20
# Unnamed files kept ready for new small objects (`CacheDir.new_small`).
SPARES = 64
# An evicted store is renamed to its name + this + the evicting process's pid, then
# deleted (`CacheDir._remove_store`).
_TRASH = ".evicted-"
# A small object's named temp file (only without O_TMPFILE) older than this is debris.
_STALE_TEMP = 3600.0


def identity_for(bucket: str, key: str, etag: str, size: int, part_size: int) -> StoreIdentity:
    """The identity of a whole-object store in the cache, of parts of *part_size*."""
    return StoreIdentity(
        bucket=bucket, key=key, etag=etag, size=size, part_size=part_size, start=0, length=size
    )


def object_identity(bucket: str, key: str, etag: str, size: int, part_size: int) -> StoreIdentity:
    """The store a mount, materialize and the sibling prefetch use for an object at
    cache part size *part_size*: one part for a small object
    (`ossfs.model.store_part_size`). They must agree, to share the cache."""
    return identity_for(bucket, key, etag, size, store_part_size(size, part_size))


def earlier_identity(identity: StoreIdentity) -> StoreIdentity | None:
    """The identity a large object had at the default part size of earlier versions
    (8 MiB), for an identity at today's default (1 MiB); else None.

    A cache filled before the default changed keeps serving: a store of the object
    found under that identity is used as it is (its parts stay 8 MiB).
    """
    if (
        identity.part_size != DEFAULT_CACHE_PART_SIZE
        or identity.start != 0
        or identity.length != identity.size
        or identity.size <= WHOLE_OBJECT_MAX
    ):
        return None
    return replace(identity, part_size=WHOLE_OBJECT_MAX)


@lru_cache(maxsize=65536)
def _store_name(identity: StoreIdentity) -> str:
    blob = json.dumps(asdict(identity), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(slots=True)
class _Open:
    """A store this process has open."""

    store: PartStore
    directory: str
    version: tuple[str, int]  # (directory, data file inode): what survives a close
    refs: int = 0
    pins: Counter[int] = field(default_factory=Counter)
    part_access: dict[int, float] = field(default_factory=dict)
    # Parts a stream will read and has not read to their end yet -> when held.
    ahead: dict[int, float] = field(default_factory=dict)
    # Parts being fetched (reserved, not settled) -> bytes reserved.
    fetching: dict[int, int] = field(default_factory=dict)
    # Parts whose fetch failed part-way while a reader held them -> bytes left in the
    # data file (counted as used): punched once the last reader lets go.
    stale: dict[int, int] = field(default_factory=dict)
    touched: float = 0.0

    def held(self, part: int, now: float) -> bool:
        """Whether eviction must leave *part* alone (see the module docstring)."""
        if self.pins.get(part) or part in self.fetching:
            return True
        since = self.ahead.get(part)
        return since is not None and now - since < HOLD_SECONDS


@dataclass(frozen=True, slots=True)
class CachedObjectInfo:
    bucket: str
    key: str
    etag: str
    size: int
    cached_bytes: int
    parts: int
    parts_present: int

    @classmethod
    def of(cls, identity: StoreIdentity, parts: dict[int, PartRecord]) -> CachedObjectInfo:
        return cls(
            identity.bucket,
            identity.key,
            identity.etag,
            identity.size,
            sum(r.length for r in parts.values()),
            identity.layout.count,
            len(parts),
        )


class CacheDir:
    """A cache root shared by processes; see the module docstring."""

    def __init__(
        self, root: str, *, max_bytes: int, min_free_fraction: float = 0.05, keep_idle: int = 0
    ) -> None:
        self.root = os.path.abspath(root)
        self.max_bytes = max_bytes
        self.min_free_fraction = min_free_fraction
        self._objects = os.path.join(self.root, "objects")
        self._open: dict[str, _Open] = {}
        self._by_store: dict[int, _Open] = {}
        # Parts checked against their CRC, by (store directory, data file inode): kept
        # when a store is closed, so reopening a file does not check its parts again.
        self._verified: LRUCache[tuple[str, int], set[int]] = LRUCache(maxsize=16384)
        # Stores whose whole-object check passed here, with their `index_mark` then: it
        # holds at the next open only if nobody changed the index since.
        self._whole_checked: LRUCache[tuple[str, int], tuple[int, ...]] = LRUCache(maxsize=16384)
        self._used = 0
        self._scanned_at = 0.0
        self._over = False
        self._full_logged = -_OVER_LOG_INTERVAL
        self._over_logged = -_OVER_LOG_INTERVAL
        self.evicted_bytes = 0
        self._shards: set[str] = set()
        # Complete small stores nobody uses, kept open (oldest first; see `release`).
        self.keep_idle = keep_idle
        self._idle: OrderedDict[str, _Open] = OrderedDict()
        self._idle_bytes = 0
        # Bytes reserved by fetches that have not settled (sum of every entry's fetching).
        self._reserved = 0
        # Open stores that may hold parts (pins, fetches, read-ahead): `held_bytes`
        # looks only at these.
        self._holding: dict[int, _Open] = {}
        # The small object `find_small` found missing last (see `prepare`).
        self._just_missed: str | None = None
        # Unnamed files made ahead for new small objects (`new_small`), and who to tell
        # when they run low.
        self._spares: list[int] = []
        self.on_spares_low: Callable[[], None] | None = None
        # Set by a mount that recounts usage in a worker thread (`measure`/`apply_scan`):
        # then nothing here walks the whole cache in the caller's thread.
        self.background_scan = False
        # Set by a mount or a materialize run that evicts closed stores in a worker
        # thread (`evict_wanted`, `evict_closed`, `account_evicted`): called when a
        # fetch is admitted with less than `_ahead_room` left below the cap. Eviction
        # in `admit` then happens only when fetches outrun it.
        self.on_room_low: Callable[[], None] | None = None
        # The last eviction pass found no closed store left (`account_evicted`), and no
        # store closed since: eviction goes straight to the parts of open stores, and
        # the cache is not walked for nothing. `_closes` counts what resets it.
        self._dry = False
        self._closes = 0
        self._prepare()

    # ---------------------------------------------------------------- set-up

    def _prepare(self) -> None:
        try:
            os.makedirs(self._objects, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)
        except OSError as e:
            raise CheckpointError(f"cannot use cache directory {self.root}: {e.strerror}") from e
        marker = os.path.join(self.root, "FORMAT")
        try:
            with open(marker) as f:
                found = f.read().strip()
        except FileNotFoundError:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.write(fd, (FORMAT + "\n").encode())
            os.close(fd)
            found = FORMAT
        if found != FORMAT:
            raise CheckpointError(
                f"{self.root} holds a cache of another format ({found!r}); "
                "use another --cache-dir or delete it"
            )
        # No walk of the cache here: with 100k small objects that takes a while. The
        # first `admit` counts (or a mount's background scan, see `background_scan`).
        self._scanned_at = -_RESCAN_INTERVAL

    def _dir_for(self, identity: StoreIdentity) -> str:
        """Where the store of *identity* lives: a file for a small object (one part at
        most, see `ossfs.cache.small`), a directory otherwise."""
        name = small_name(identity) if is_small(identity) else _store_name(identity)
        return os.path.join(self._objects, name[:2], name)

    def _shard(self, path: str) -> None:
        shard = os.path.dirname(path)
        if shard not in self._shards:
            os.makedirs(shard, mode=0o700, exist_ok=True)
            self._shards.add(shard)

    # ---------------------------------------------------------------- stores

    def acquire(self, identity: StoreIdentity) -> PartStore:
        """Open the store for *identity* (shared in this process; counted)."""
        return self.reuse(identity) or self.adopt(self.prepare(identity))

    def reuse(self, identity: StoreIdentity) -> PartStore | None:
        """The store for *identity* if this process has it open (counted), else None.
        (It may be the store of `earlier_identity`.)"""
        entry = self._reuse_entry(identity)
        if entry is None:
            return None
        if entry.refs <= 0:
            self._idle.pop(entry.directory, None)
            self._idle_bytes -= entry.store.identity.size
        entry.refs += 1
        self._touch(entry)
        return entry.store

    def _reuse_entry(self, identity: StoreIdentity) -> _Open | None:
        """This process's open store for *identity*, or for its `earlier_identity`."""
        entry = self._open.get(self._dir_for(identity))
        if entry is None:
            earlier = earlier_identity(identity)
            entry = None if earlier is None else self._open.get(self._dir_for(earlier))
        return entry

    def find_small(self, identity: StoreIdentity) -> PartStore | None:
        """The store of a small object that is cached (counted), without creating one:
        cheap enough for the caller's thread. None when it is not cached."""
        store = self.reuse(identity)
        if store is not None:
            return store
        path = self._dir_for(identity)
        found = SmallStore.find(identity, path, on_discard=lambda d: log.warning("cache: %s", d))
        if found is None:
            self._just_missed = path  # `prepare` right after need not look again
            return None
        return self.adopt(found)

    def new_small(self, identity: StoreIdentity) -> PartStore | None:
        """A new store for a small object `find_small` just found missing, made from a
        spare unnamed file (no file-system call); None when there is no spare (then
        `prepare` makes one, best in a worker thread)."""
        path = self._dir_for(identity)
        if not self._spares or self._just_missed != path:
            return None
        spare = self._spares.pop()
        if len(self._spares) <= SPARES // 2 and self.on_spares_low is not None:
            self.on_spares_low()
        try:
            self._shard(path)
            store = SmallStore.open_small(identity, path, looked=True, spare=spare)
        except BaseException:
            os.close(spare)
            raise
        return self.adopt(store)

    def spares_wanted(self) -> int:
        return max(0, SPARES - len(self._spares))

    def make_spares(self, count: int) -> list[int]:
        """Unnamed files for `new_small` (blocking: a new inode each; a worker thread
        calls it, `add_spares` takes the result)."""
        return make_unnamed(self._objects, count)

    def add_spares(self, fds: list[int]) -> None:
        self._spares.extend(fds)

    def _on_disk(self, identity: StoreIdentity) -> StoreIdentity:
        """*identity*, or its `earlier_identity` when only that one has a store on disk
        (blocking: up to two stats)."""
        earlier = earlier_identity(identity)
        if earlier is None or os.path.isdir(self._dir_for(identity)):
            return identity
        return earlier if os.path.isdir(self._dir_for(earlier)) else identity

    def prepare(self, identity: StoreIdentity) -> PartStore:
        """Open or create a store on disk and lock it for sharing.

        Only file-system work, touching nothing shared in this object, so it may
        run in a worker thread (creating thousands of small entries is slow on
        some disks). `adopt` then makes the store this process's own.

        A store of `earlier_identity` is opened instead of a new one, when there is
        one and none of *identity*.
        """
        wanted = identity
        identity = self._on_disk(identity)
        directory = self._dir_for(identity)
        if is_small(identity):
            self._shard(directory)
            looked = self._just_missed == directory
            return SmallStore.open_small(
                identity, directory, looked=looked, on_discard=lambda d: log.warning("cache: %s", d)
            )
        for _ in range(5):
            if identity is not wanted and not os.path.isdir(directory):
                # The earlier store was evicted meanwhile: never make one of that size.
                identity, directory = wanted, self._dir_for(wanted)
            _make_store_dir(directory)
            data = os.path.join(directory, "data")
            try:
                store = PartStore.open(
                    identity,
                    data,
                    os.path.join(directory, "index"),
                    shared=True,
                    on_discard=lambda d: log.warning("cache: %s", d),
                )
            except FileNotFoundError:
                continue  # another process evicted the directory just now: try again
            fcntl.flock(store.fileno(), fcntl.LOCK_SH)
            # Between open and lock another process may have evicted the store.
            try:
                same = os.stat(data).st_ino == os.fstat(store.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return store
            store.close()
        raise CheckpointError(f"cannot open cache store {directory}")

    def adopt(self, store: PartStore) -> PartStore:
        """Take a prepared store into this process's table (counted).

        If the same store was opened meanwhile, the prepared one is closed and
        the open one is returned.
        """
        directory = _entry_path(store)
        entry = self._open.get(directory)
        if entry is not None:
            store.close()
        else:
            st = os.fstat(store.fileno())
            key = (directory, st.st_ino)
            verified = self._verified.get(key)
            if verified is None:
                verified = self._verified[key] = set()
            verified.intersection_update(store.parts)  # dropped since: check again
            store.verified = verified
            mark = self._whole_checked.get(key)
            store.crc_checked = (store.crc_checked or mark == store.index_mark()) and store.complete
            entry = self._open[directory] = _Open(store, directory, key)
            if isinstance(store, SmallStore):
                # Its LRU time is the file's own mtime: no utime if it is recent.
                entry.touched = st.st_mtime
            self._by_store[id(store)] = entry
        entry.refs += 1
        self._touch(entry)
        return entry.store

    def store_key(self, identity: StoreIdentity) -> str:
        """A name that is the same for every open of one store (for single flight)."""
        return self._dir_for(identity)

    def release(self, store: PartStore) -> None:
        entry = self._by_store.get(id(store))
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs > 0:
            return
        size = store.identity.size
        if (
            isinstance(store, SmallStore)
            and store.complete
            and self.keep_idle > 0
            and size <= _IDLE_MAX_BYTES // 16
        ):
            # Kept open for a while: opening it again is then a dictionary lookup (a
            # tree of small files is opened again and again by grep, make, git).
            self._idle[entry.directory] = entry
            self._idle_bytes += size
            while self._idle and (
                len(self._idle) > self.keep_idle or self._idle_bytes > _IDLE_MAX_BYTES
            ):
                _, oldest = self._idle.popitem(last=False)
                self._idle_bytes -= oldest.store.identity.size
                self._close_entry(oldest)
            return
        self._close_entry(entry)

    def _close_entry(self, entry: _Open) -> None:
        store = entry.store
        self._store_closed()
        del self._open[entry.directory]
        del self._by_store[id(store)]
        self._holding.pop(id(entry), None)
        self._reserved -= sum(entry.fetching.values())  # fetches still running: forgotten
        try:
            store.compact()
        except OSError as e:
            # Only a tidy-up: the journal stays valid uncompacted (a full disk).
            log.warning("cache: cannot compact %s: %s", store.index_path, e.strerror)
        finally:
            # After the compaction, which may bring in other processes' records (and
            # so undo a check). Not a check of parts served from memory.
            if store.crc_checked and store.complete:
                self._whole_checked[entry.version] = store.index_mark()
            else:
                self._whole_checked.pop(entry.version, None)
            if store.flights:
                store.on_deferred_close = self._closed_late
            store.close()

    def close(self) -> None:
        for entry in list(self._open.values()):
            entry.store.close()
        self._open.clear()
        self._by_store.clear()
        self._idle.clear()
        self._idle_bytes = 0
        self._holding.clear()
        self._reserved = 0
        for fd in self._spares:
            os.close(fd)
        self._spares.clear()

    def pin(self, store: PartStore, parts: range | list[int]) -> None:
        """Keep *parts* of *store* from being evicted until `unpin`."""
        entry = self._by_store[id(store)]
        now = time.monotonic()
        self._holding[id(entry)] = entry
        for p in parts:
            entry.pins[p] += 1
            entry.part_access[p] = now

    def is_pinned(self, store: PartStore, part: int) -> bool:
        """Whether a reader (or a stream's position) holds *part* of *store*."""
        entry = self._by_store.get(id(store))
        return entry is not None and entry.pins.get(part, 0) > 0

    def left_over(self, store: PartStore, part: int) -> bool:
        """Whether a reader holds what a failed fetch left of *part* in the data file."""
        entry = self._by_store.get(id(store))
        return entry is not None and part in entry.stale

    def unpin(self, store: PartStore, parts: range | list[int], *, trim: bool = True) -> None:
        """Let go of *parts*; with *trim*, evict at once if the cache is over its cap."""
        entry = self._by_store.get(id(store))
        if entry is None:
            return
        for p in parts:
            entry.pins[p] -= 1
            if entry.pins[p] <= 0:
                del entry.pins[p]
                if p in entry.stale and p not in entry.fetching:
                    self._punch_stale(entry, p)
        if trim:
            self._trim()

    def _punch_stale(self, entry: _Open, part: int) -> None:
        """Punch out what a failed fetch left of *part* once nobody reads it."""
        written = entry.stale.pop(part)
        self._used -= written
        store = entry.store
        if store.fileno() < 0:
            return
        store.refresh()
        # Another process (a materialize, a second mount) may be writing the part, or
        # have recorded it: then the bytes are its own.
        if store.is_present(part) or not store.try_lock_part(part):
            return
        try:
            self._punch_failed(store, part, written)
        finally:
            store.unlock_part(part)

    def _punch_failed(self, store: PartStore, part: int, nbytes: int) -> None:
        """Punch out the first *nbytes* of *part* a failed fetch wrote (no longer
        counted as used; still counted if the file system cannot punch)."""
        first, _ = store.layout.bounds(part)
        try:
            punch_hole(store.fileno(), first - store.identity.start, nbytes)
        except OSError as e:
            log.debug("cache: cannot punch a failed fetch's bytes: %s", e)
            self._used += nbytes

    def _closed_late(self) -> None:
        """A store whose close waited for its fetches has closed: it may be evicted now
        (an evictor that found it still locked is told there is a store again)."""
        self._store_closed()
        self._trim()

    def _store_closed(self) -> None:
        """There may be a closed store to evict again (closed here, or counted)."""
        self._closes += 1
        self._dry = False

    def _trim(self) -> None:
        """Back under the cap as soon as what held the cache over it lets go: going over
        is for the parts readers and fetches hold, never a state that stays."""
        if self._used <= self.max_bytes:
            return
        room = self._room(*self._disk())
        over = self._used - room
        if 0 < over <= _ahead_room(room) and self._wake_evictor():
            return  # within the slack: the evictor in the background catches up
        if over > 0:
            self._used -= self._evict(over)
        self._note_over(room)

    def _wake_evictor(self) -> bool:
        """Tell the evictor in the background to make room; False when there is none,
        or it has no closed store left to remove (`_dry`)."""
        if self.on_room_low is None or self._dry:
            return False
        self.on_room_low()
        return True

    @contextmanager
    def pinned(
        self, store: PartStore, parts: range | list[int], *, trim: bool = True
    ) -> Iterator[None]:
        """Keep *parts* of *store* from being evicted while a reader uses them."""
        self.pin(store, parts)
        try:
            yield
        finally:
            self.unpin(store, parts, trim=trim)

    def _touch(self, entry: _Open) -> None:
        now = time.time()
        if now - entry.touched > _TOUCH_INTERVAL:
            entry.touched = now
            with suppress(OSError):
                os.utime(entry.directory)

    def note_access(
        self, store: PartStore, parts: range | list[int], read_to: int | None = None
    ) -> list[int]:
        """Record a read of *parts*; a part read up to its end (*read_to*, an object
        offset) is no longer held for the stream that fetched it ahead. Returns those
        parts: a stream has read them through."""
        entry = self._by_store.get(id(store))
        if entry is None:
            return []
        now = time.monotonic()
        through = []
        for p in parts:
            entry.part_access[p] = now
            if (
                entry.ahead
                and read_to is not None
                and p in entry.ahead
                and read_to >= store.layout.bounds(p)[1]
            ):
                del entry.ahead[p]
                through.append(p)
        self._touch(entry)
        return through

    # ---------------------------------------------------------------- accounting

    def _walk(self) -> Iterator[tuple[str, os.stat_result]]:
        """(store path, stat of its data) for every store on disk: a store directory and
        its data file, or a small object's file."""
        return _walk(self.root)

    def measure(self) -> int:
        """The bytes the cache holds on disk, all processes (a walk of the whole cache;
        touches nothing in this object, so it may run in a worker thread)."""
        return sum(st.st_blocks * 512 for _, st in _walk(self.root))

    def apply_scan(self, on_disk: int) -> int:
        """Take a `measure` result as the bytes in use (plus running fetches)."""
        self._used = on_disk + self._reserved
        self._scanned_at = time.monotonic()
        self._store_closed()  # another process's, perhaps
        if self.on_room_low is not None and self.evict_wanted() > 0:
            self._wake_evictor()  # another process filled it, or this one started full
        return self._used

    def rescan(self) -> int:
        """Recount the bytes the cache holds on disk (all processes).

        Bytes reserved by fetches still running are counted as used whether or
        not they have reached the disk yet.
        """
        return self.apply_scan(self.measure())

    @property
    def used_bytes(self) -> int:
        return self._used

    def _disk(self) -> tuple[int, int]:
        """(free bytes, the free-space floor) of the cache's file system: one statvfs."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, int(st.f_blocks * st.f_frsize * self.min_free_fraction)

    def _room(self, free: int, floor: int) -> int:
        """How many bytes the cache may hold: the cap, lowered so that the free-space
        floor is kept. Reservations (`_reserved`) are counted in `_used` but mostly not
        on disk yet: every reservation counts whole, which errs on the side of evicting
        a little early."""
        return min(self.max_bytes, self._used - self._reserved + max(0, free - floor))

    def held_bytes(self) -> int:
        """Bytes eviction may not touch now: pinned, being fetched, held for streams."""
        now = time.monotonic()
        total = 0
        for key, entry in list(self._holding.items()):
            if (
                not (entry.pins or entry.fetching or entry.ahead)
                or self._by_store.get(id(entry.store)) is not entry
            ):
                del self._holding[key]  # holds nothing (any more): not looked at again
                continue
            layout = entry.store.layout
            if layout.count == 1:
                # A small object (the common case by far): held or not, no sets.
                if (
                    entry.pins
                    or entry.fetching
                    or any(now - t < HOLD_SECONDS for t in entry.ahead.values())
                ):
                    total += layout.length
                else:
                    del self._holding[key]
                continue
            if entry.ahead:
                expired = [p for p, t in entry.ahead.items() if now - t >= HOLD_SECONDS]
                for p in expired:
                    del entry.ahead[p]  # the stream did not come: no longer held
            parts = entry.pins.keys() | entry.fetching.keys() | entry.ahead.keys()
            if not parts:
                del self._holding[key]  # only expired read-ahead holds
                continue
            # Every part is whole but the last (this runs for every fetch admitted).
            last = layout.count - 1
            total += len(parts) * layout.part_size - (
                layout.part_size - layout.part_length(last) if last in parts else 0
            )
        return total

    def admit(
        self, store: PartStore, part: int, nbytes: int, *, readahead: bool, wait: bool = False
    ) -> bool:
        """Reserve room for a fetch of *part*; False (nothing reserved) when it is
        read-ahead that does not fit next to what is held, or, with *wait*, when the
        evictor in the background is to make the room (the caller asks again).

        Blocking file-system work (eviction). Every True must be followed by
        one `settle` for the same part.
        """
        entry = self._by_store.get(id(store))
        if not self.background_scan and time.monotonic() - self._scanned_at > _RESCAN_INTERVAL:
            self.rescan()
        free, floor = self._disk()
        room = self._room(free, floor)
        if readahead and self.held_bytes() + nbytes > room:
            return False
        need = self._used + nbytes - room
        # The evictor is woken with half of its room left, and evicts down to a whole
        # `_ahead_room` below the cap: one pass per half.
        behind = need > -_ahead_room(room) // 2 and self._wake_evictor()
        if need > 0:
            # With the evictor behind (and closed stores left for it): a guess waits for
            # it; a reader's part may take the cap's slack meanwhile (as long as the
            # disk has room), and beyond it waits too, when the caller can.
            slack = need <= _ahead_room(room) and free - self._reserved - nbytes >= floor
            if behind and readahead:
                return False
            if behind and slack:
                room += need  # not worth a warning
            elif behind and wait:
                return False
            else:
                self._used -= self._evict(need)
                free, floor = self._disk()  # what eviction freed
        # Free bytes once this and every running fetch have landed.
        if free - self._reserved - nbytes < floor:
            # The cap may be exceeded for a reader, the free-space floor never: the
            # reader is served from the network instead (NoSpaceError).
            self._note_full()
            raise NoSpaceError(
                f"the cache disk {self.root} is full (keeping {format_size(floor)} free)",
                path=self.root,
            )
        if entry is not None:
            entry.fetching[part] = nbytes
            self._reserved += nbytes
            self._holding[id(entry)] = entry
        self._used += nbytes
        self._note_over(room)
        return True

    def _note_full(self) -> None:
        now = time.monotonic()
        if now - self._full_logged >= _OVER_LOG_INTERVAL:
            self._full_logged = now
            log.warning(
                "cache %s: the disk is full and nothing more can be evicted; "
                "reads are served from the network without caching",
                self.root,
            )

    def settle(
        self,
        store: PartStore,
        part: int,
        nbytes: int,
        *,
        written: int,
        committed: bool,
        readahead: bool,
    ) -> None:
        """End the reservation `admit` made for *part*.

        *written* is how many of its bytes reached the data file. A fetch that
        failed part-way has its bytes punched out again unless a reader holds
        the part (it may be reading what arrived); a committed read-ahead part
        is held for its stream.
        """
        entry = self._by_store.get(id(store))
        left_before = 0
        if entry is not None:
            self._reserved -= entry.fetching.pop(part, 0)
            # An earlier failed fetch's leftovers: written over by this one when it
            # commits (counted in what it reserved), punched with its own otherwise.
            left_before = entry.stale.pop(part, 0)
            self._used -= left_before
            if committed:
                now = time.monotonic()
                entry.part_access.setdefault(part, now)
                if readahead:
                    entry.ahead.setdefault(part, now)
        if committed:
            if isinstance(store, SmallStore):
                # Its file holds a trailer too, and takes whole blocks: count what it takes.
                with suppress(OSError):
                    self._used += os.fstat(store.fileno()).st_blocks * 512 - nbytes
            return
        self._used -= nbytes
        if not written and left_before and entry is not None:
            # This fetch wrote nothing, so it may never have held the part's claim: the
            # earlier leftovers go the guarded way (another process may have the part).
            self._used += left_before
            entry.stale[part] = left_before
            if not entry.pins.get(part):
                self._punch_stale(entry, part)
            return
        left = max(written, left_before)
        if left and (entry is None or not entry.pins.get(part)) and store.fileno() >= 0:
            self._punch_failed(store, part, left)
        elif left:
            self._used += left
            if entry is not None:
                entry.stale[part] = left  # punched when the reader lets go (`unpin`)

    def _note_over(self, room: int) -> None:
        """Log going over the limit (at most every `_OVER_LOG_INTERVAL`) and coming back."""
        over = self._used - room
        now = time.monotonic()
        if over > 0 and now - self._over_logged >= _OVER_LOG_INTERVAL:
            self._over_logged = now
            self._over = True
            log.warning(
                "cache %s: %s over its limit of %s: everything else is held by "
                "readers or fetches in progress; it shrinks back as they end",
                self.root,
                format_size(over),
                format_size(room),
            )
        elif over <= 0 and self._over:
            self._over = False
            log.info("cache %s: back within its limit", self.root)

    # ---------------------------------------------------------------- eviction

    def evict_wanted(self) -> int:
        """How many bytes a background evictor should free now: what the cache holds
        above its room (`_room`) less `_ahead_room` of it (one statvfs)."""
        room = self._room(*self._disk())
        return max(0, self._used - (room - _ahead_room(room)))

    def evict_closed(self, want: int, open_here: frozenset[str]) -> int:
        """Remove whole stores no process holds, least recently used first, until
        *want* bytes are freed; the bytes freed.

        Touches nothing in this object (it may run in a worker thread while the event
        loop opens stores): *open_here* is a snapshot of the stores open here, and a
        store opened since is safe all the same, because removal needs the store's
        lock exclusively (the same rule that keeps another process's stores). Give
        the result to `account_evicted`.
        """
        freed = 0
        candidates = sorted(
            (st.st_mtime, path) for path, st in self._walk() if path not in open_here
        )
        for _mtime, path in candidates:
            if freed >= want:
                break
            freed += self._remove_store(path)
        return freed

    def open_directories(self) -> frozenset[str]:
        """The stores open here (for `evict_closed`, which must leave them)."""
        return frozenset(self._open)

    def eviction_pass(self) -> int:
        """A token for a pass of `evict_closed` about to start (give it back to
        `account_evicted`)."""
        return self._closes

    def account_evicted(self, freed: int, wanted: int, token: int) -> None:
        """Count bytes `evict_closed` freed in a worker thread. Less than *wanted*, and
        no store closed since the pass began (*token*): no closed store is left, and
        until one is, eviction takes parts of open stores without walking the cache."""
        self._used -= freed
        self.evicted_bytes += freed
        if freed < wanted and token == self._closes:
            self._dry = True
            # What readers took over the cap, waiting for this pass, comes from the
            # open stores' parts now: nothing else would bring the cache back under
            # its cap at rest.
            self._trim()

    def _evict(self, need: int) -> int:
        # 1. Whole stores no process holds, least recently used first. A little more
        # than needed goes, so that a cache of many small objects is not walked for
        # every object that arrives.
        want = need + min(self.max_bytes // 50, _EVICT_EXTRA)
        freed = 0
        if not self._dry:
            freed = self.evict_closed(want, self.open_directories())
            self.evicted_bytes += freed
            if freed >= need:
                return freed
            self._dry = self.on_room_low is not None  # (only an evictor is told again)
        # 2. Parts of stores open here that nothing holds, least recently used first.
        now = time.monotonic()
        parts: list[tuple[float, _Open, int]] = []
        for entry in self._open.values():
            for p in entry.store.parts:
                if not entry.held(p, now):
                    parts.append((entry.part_access.get(p, 0.0), entry, p))
        parts.sort(key=lambda t: t[0])
        by_entry: dict[int, list[int]] = {}
        for _t, entry, p in parts:
            if freed >= need:
                break
            by_entry.setdefault(id(entry), []).append(p)
            freed += entry.store.layout.part_length(p)
        for entry in list(self._open.values()):
            chosen = by_entry.get(id(entry))
            if chosen and not self._evict_parts(entry, chosen):
                freed -= sum(entry.store.layout.part_length(p) for p in chosen)
        return max(freed, 0)

    def _remove_store(self, directory: str) -> int:
        """Remove a store no process holds; the bytes it took (0: not removed).

        The size is taken under the exclusive lock, when nobody can write to it any
        more: a walk's earlier stat may be short of what a late fetch added.
        """
        if directory.endswith(SUFFIX):
            freed = remove_small(directory)
            if freed:
                log.debug("cache: evicted %s", directory)
            return freed
        data = os.path.join(directory, "data")
        try:
            fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return 0  # gone meanwhile, or not a store of ours
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0  # another process reads it (or no lock here: left alone)
            size = os.fstat(fd).st_blocks * 512
            # Rename first so a process opening the store now starts a fresh one.
            trash = f"{directory}{_TRASH}{os.getpid()}"
            try:
                os.rename(directory, trash)
            except OSError:
                return 0
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        log.debug("cache: evicted %s", directory)
        return size

    def _evict_parts(self, entry: _Open, parts: list[int]) -> bool:
        fd = entry.store.fileno()
        if isinstance(entry.store, SmallStore):
            return self._evict_small(entry)
        # One process at a time tries to upgrade (`PartStore.try_lock_upgrade`): one that
        # finds another trying has the store shared, so it is not its alone.
        if not entry.store.try_lock_upgrade():
            return False
        try:
            try:
                # Upgrade our shared lock: it works only if no other process has the store.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # A failed conversion has already dropped the shared lock (flock(2)
                # converts by unlocking first): take it back, or another process could
                # evict the store while this one reads it.
                fcntl.flock(fd, fcntl.LOCK_SH)
                return False
            try:
                entry.store.drop(parts)  # the record goes first: then the bytes
                for p in parts:
                    first, end = entry.store.layout.bounds(p)
                    try:
                        punch_hole(fd, first, end - first)
                    except OSError as e:
                        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                            log.warning(
                                "cache: the file system cannot punch holes; parts stay "
                                "allocated until the object is evicted"
                            )
                            return True
                        raise
                self.evicted_bytes += sum(entry.store.layout.part_length(p) for p in parts)
            finally:
                fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            entry.store.unlock_upgrade()
        return True

    def _evict_small(self, entry: _Open) -> bool:
        store = entry.store
        fd = store.fileno()
        assert isinstance(store, SmallStore)
        if store.published:
            try:
                # Our shared lock upgraded: works only if no other process has it open.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fcntl.flock(fd, fcntl.LOCK_SH)  # a failed conversion dropped it
                return False
        size = store.layout.part_length(0)
        store.drop([0])  # unlinks the file; this process's descriptor stays readable
        self.evicted_bytes += size
        return True

    # ---------------------------------------------------------------- reporting

    def info_for(self, identity: StoreIdentity) -> CachedObjectInfo | None:
        """How much of one object version the cache holds (None: nothing). The store
        this process reads (`reuse`) if it has one open, else the one on disk."""
        opened = self._reuse_entry(identity)
        if opened is not None:
            opened.store.refresh()
            return CachedObjectInfo.of(opened.store.identity, opened.store.parts)
        identity = self._on_disk(identity)
        directory = self._dir_for(identity)
        if directory.endswith(SUFFIX):
            found = _small_info(directory)
            return found if found is not None and found.etag == identity.etag else None
        else:
            try:
                index = IndexFile.load(os.path.join(directory, "index"))
            except IndexCorrupt:
                return None
            if index is None:
                return None
            parts = index.state.parts
            index.close()
        return CachedObjectInfo.of(identity, parts)

    def objects(self) -> Iterator[CachedObjectInfo]:
        """Every object version the cache holds something of."""
        return cached_objects(self.root)


def _ahead_room(room: int) -> int:
    """The room below *room* a background evictor keeps free."""
    return min(room // 20, _AHEAD_ROOM)


def _store_dirs(root: str) -> Iterator[str]:
    """Every store (``objects/ab/<hash>`` directory or ``<hash>.o`` small-object file)
    under a cache root. Named temp files of small objects are skipped, and removed when
    a crash left them (older than `_STALE_TEMP` seconds)."""
    try:
        shards = os.scandir(os.path.join(root, "objects"))
    except FileNotFoundError:
        return
    with shards:
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            try:
                stores = os.scandir(shard.path)
            except FileNotFoundError:
                continue  # emptied and removed by another process meanwhile
            with stores:
                for store in stores:
                    if store.name.startswith(TMP_PREFIX):
                        _remove_stale_temp(store.path)
                        continue
                    if _TRASH in store.name:
                        # An evicted store being deleted (by this or another process):
                        # counted as freed by whoever renamed it, so never again.
                        _remove_orphaned_trash(store.path)
                        continue
                    try:
                        ours = (
                            store.is_file(follow_symlinks=False)
                            if store.name.endswith(SUFFIX)
                            else store.is_dir(follow_symlinks=False)
                        )
                    except OSError:
                        ours = False
                    if ours:  # (anything else is somebody else's: left alone)
                        yield store.path


def _remove_orphaned_trash(path: str) -> None:
    """Delete an evicted store whose deleting process died before it was done."""
    pid = path.rpartition(_TRASH)[2]
    if not pid.isdigit():
        return
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass  # alive (another user's): its deleter is at work


def _remove_stale_temp(path: str) -> None:
    with suppress(OSError):
        if time.time() - os.stat(path).st_mtime > _STALE_TEMP:
            os.unlink(path)


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    for path in _store_dirs(root):
        try:
            st = os.stat(path if path.endswith(SUFFIX) else os.path.join(path, "data"))
        except OSError:
            continue  # (gone meanwhile, or not a store of ours)
        yield path, st


def _small_info(path: str) -> CachedObjectInfo | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        trailer = read_trailer(fd, os.fstat(fd).st_size)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not isinstance(trailer, SmallTrailer):
        return None
    return CachedObjectInfo(
        trailer.bucket,
        trailer.key,
        trailer.etag,
        trailer.size,
        trailer.size,
        1 if trailer.size else 0,
        1 if trailer.size else 0,
    )


def cached_objects(root: str) -> Iterator[CachedObjectInfo]:
    """Every object version a cache root holds something of (read-only; any process)."""
    for directory in _store_dirs(root):
        if directory.endswith(SUFFIX):
            found = _small_info(directory)
            if found is not None:
                yield found
            continue
        try:
            index = IndexFile.load(os.path.join(directory, "index"))
        except (IndexCorrupt, OSError):
            continue
        if index is None:
            continue
        info = CachedObjectInfo.of(index.state.identity, index.state.parts)
        index.close()
        yield info


def _make_store_dir(directory: str) -> None:
    """Create ``objects/ab/<hash>`` with one mkdir in the common case (shard exists)."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(directory, mode=0o700, exist_ok=True)


def is_small(identity: StoreIdentity) -> bool:
    """Whether the cache keeps *identity* as one file (`ossfs.cache.small`)."""
    return (
        identity.start == 0
        and identity.length == identity.size
        and identity.size <= identity.part_size
    )


def _entry_path(store: PartStore) -> str:
    """The name of a store's place in the cache: its file or its directory."""
    return store.data_path if isinstance(store, SmallStore) else os.path.dirname(store.data_path)


def st_dir_mtime(directory: str) -> float:
    try:
        return os.stat(directory).st_mtime
    except FileNotFoundError:
        return 0.0
