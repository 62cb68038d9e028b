"""Reads of open files: what a FUSE ``read`` does between the kernel and the cache.

`Reader` is one per mount; `Reader.open` makes an `OpenFile` per open file.
`OpenFile.read(offset, size)` returns the object's bytes for that range:

- **fast path**: every part is in the store and checked against its CRC, and
  the bytes are in the page cache: they are copied into the one shared reply
  buffer without yielding to another task, so nothing can evict them between
  the check and the copy. A part another process (or an earlier run) cached
  and whose bytes are all in the page cache is checked here too, in the same
  step; a read within that one part is answered from the bytes the check read;
- **slow path**: the parts are pinned (docs/cache-format.md, "Eviction"), the
  fetcher makes them present (a reader waits only for its own bytes), a part
  another process cached is checked once (one check however many readers),
  then the bytes are read from the page cache, or from disk in a worker
  thread;
- a full cache disk: the bytes come from the network, not cached;
- a cache disk that is behind: the fetcher fetches into memory
  (`ossfs.cache.memory`); a part whose every byte was read there is released
  at once unless another read holds it;
- a part whose fetch failed for this open file fails again at once for
  `FAILURE_MEMORY` seconds (the kernel repeats a failed read; a new open tries
  again);
- read-ahead: every read is shown to the fetcher's stream detector, and a
  sequential stream's part is pinned until the stream moves on.

Errors are raised as they are (OssfsError, OSError); the FUSE layer maps them.

Must not import: pyfuse3, httpx.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from cachetools import LRUCache

from ossfs.cache.cachedir import CacheDir
from ossfs.cache.store import PartStore
from ossfs.crc import crc64
from ossfs.errors import NoSpaceError, OssfsError
from ossfs.fetcher import Fetcher
from ossfs.flight import SingleFlight

__all__ = ["Reader", "OpenFile", "FAILURE_MEMORY", "MAX_READ"]

log = logging.getLogger(__name__)

# The largest read the kernel sends: 1 MiB (256 pages, with the mount's read-ahead
# raised to match). A bigger request falls back to a buffer of its own.
MAX_READ = 1 << 20
# The cache file's pages of parts a stream has read through are dropped this many
# bytes at a time.
DROP_BATCH = 8 << 20
# A read that needs a part whose fetch failed for the same open file less than this many
# seconds ago fails at once: the kernel repeats a failed read (its read-ahead request,
# then the read itself), and each repeat would otherwise run a whole retry cycle again.
# A new open tries again at once.
FAILURE_MEMORY = 10.0


class Reader:
    """What the open files of one mount share: the fetcher, the cache, the reply buffer,
    the single flight of part checks, and counters."""

    def __init__(self, fetcher: Fetcher, cache: CacheDir) -> None:
        self.fetcher = fetcher
        self.cache = cache
        # Every read answer is built here. pyfuse3 copies it into the reply as soon as
        # `read` returns, before any other task runs, so one buffer serves all reads
        # and no read allocates (fresh buffers cost a mapping and page faults).
        self._reply = memoryview(bytearray(MAX_READ))
        self._verifying: SingleFlight[tuple[int, int]] = SingleFlight()
        # Parts read through whose pages are not dropped yet, by store (`read_through`);
        # a store that closed with some pending is forgotten, its pages left to the kernel.
        self._to_drop: LRUCache[int, tuple[PartStore, list[int]]] = LRUCache(maxsize=256)
        # preadv(RWF_NOWAIT) tells page-cache hits from disk reads; off if unsupported.
        self._nowait = True
        self.verifications = 0  # cached parts checked against their CRC
        # Bytes of reads whose part was in the cache when the read came / was not (it
        # was fetched, or a fetch in flight was waited for). The kernel's page cache
        # answers re-reads before they reach us: those are in neither.
        self.hit_bytes = 0
        self.miss_bytes = 0

    def open(self, store: PartStore, url: str) -> OpenFile:
        return OpenFile(self, store, url)

    def count_hits(self, store: PartStore, parts: range, off: int, end: int) -> None:
        """Count the bytes ``[off, end)`` as cache hits or misses, by part."""
        for p in parts:
            first, last = store.layout.bounds(p)
            n = min(last, end) - max(first, off)
            if store.is_present(p):
                self.hit_bytes += n
            else:
                self.miss_bytes += n

    # ---------------------------------------------------------------- answers

    def cached_answer(self, store: PartStore, off: int, end: int) -> memoryview | None:
        """The bytes from the page cache, in the shared reply buffer; None if a disk read
        would be needed (that one must not stall every other request)."""
        size = end - off
        if size > len(self._reply):
            return None
        view = self._reply[:size]
        if self._nowait:
            n = self._from_page_cache(store, off, view)
            if n is not None:
                return view[:n] if n == size else None
        n = store.read_into(off, view)  # (this file system cannot say: read inline)
        return view[:n]

    def _from_page_cache(self, store: PartStore, off: int, view: memoryview) -> int | None:
        """Read into *view* what the page cache holds of it, without waiting for the
        disk: the bytes read (0: none), or None when this file system cannot say
        (`_nowait` is then off for good)."""
        try:
            return store.read_into(off, view, nowait=True)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False
            return None

    def read_through(self, store: PartStore, parts: list[int], end: int) -> None:
        """A stream has read *parts* (fetched ahead for it) through: the kernel may drop
        the cache file's pages of them, in a worker thread (`PartStore.drop_pages`).

        Measured on a cold 4 GiB `cat` from nginx: 5.2 s with this, 16.1-16.7 s without
        (alternating runs): the page cache held the object twice (the cache file's and
        the mount's pages), and a read that large ran at a fraction of its speed."""
        # Given DROP_BATCH bytes at a time (one thread hop for several small parts),
        # and when a read reaches the object's end (*end*: where this read ended).
        at_end = end >= store.identity.size
        if not parts and not at_end:
            return  # (most reads: nothing looked up)
        pending = self._to_drop.get(id(store))
        if pending is None or pending[0] is not store:
            if not parts:
                return
            pending = self._to_drop[id(store)] = (store, [])
        pending[1].extend(parts)  # (never empty once made)
        if len(pending[1]) * store.layout.part_size < DROP_BATCH and not at_end:
            return
        del self._to_drop[id(store)]
        store.flight_started()  # the store stays open until the advice is given
        try:
            self.fetcher.spawn(self._drop_pages, store, pending[1])
        except RuntimeError:  # no background nursery (not a mount): only advice
            store.flight_ended()

    async def _drop_pages(self, store: PartStore, parts: list[int]) -> None:
        try:
            await trio.to_thread.run_sync(store.drop_pages, parts)
        finally:
            store.flight_ended()

    async def disk_answer(self, store: PartStore, off: int, end: int) -> memoryview:
        """Read from disk in a worker thread, into a buffer of its own."""
        buf = memoryview(bytearray(end - off))
        n = await trio.to_thread.run_sync(store.read_into, off, buf)
        return buf[:n]

    def checked_answer(
        self, store: PartStore, parts: range, off: int, end: int
    ) -> memoryview | None:
        """`cached_answer`, after checking against their CRC the parts not checked yet
        (cached by an earlier run or another process), from the page cache and without
        yielding. None when one of them cannot be (not recorded, not all in the page
        cache, larger than the reply buffer) or does not match: `verify` then checks
        it in a worker thread, and drops a bad part.

        A read within one part just checked is answered from the bytes the check
        read. A remount of a cache the kernel still holds, measured on 1 GiB (1 MiB
        parts, alternating runs): 0.81-0.86 s with each part checked in a worker
        thread before it was read; 0.60-0.81 s checked here but read again for the
        answer; 0.53-0.55 s answered from the check's bytes (0.65-0.75 s with no
        check at all, reading once).
        """
        checked = None
        for p in parts:
            if p not in store.verified:
                if not self._check(store, p):
                    return None
                checked = p
        if checked is not None and len(parts) == 1:
            first = store.layout.bounds(checked)[0]
            return self._reply[off - first : end - first]
        return self.cached_answer(store, off, end)

    def _check(self, store: PartStore, part: int) -> bool:
        """Check *part* from the page cache, reading it into the reply buffer. Not
        when a worker thread is checking it already (the read waits for that check),
        or when it is also held in memory (the slow path keeps that account)."""
        record = store.parts.get(part)
        if (
            not self._nowait
            or record is None
            or record.length > len(self._reply)
            or self._verifying.running((id(store), part))
            or (store.memory is not None and store.memory.holds(part))
        ):
            return False
        view = self._reply[: record.length]
        n = self._from_page_cache(store, store.layout.bounds(part)[0], view)
        if n != record.length or crc64(view) != record.crc64:
            return False
        store.verified.add(part)
        self.verifications += 1
        return True

    async def verify(self, store: PartStore, part: int, url: str) -> None:
        """Check a part another process (or an earlier run) cached before serving it.

        Once per part: concurrent readers of one part wait for the same check.
        """
        key = (id(store), part)
        # None: another task was checking the part. A check that ended leaves the part
        # verified or dropped; one that was cancelled leaves it to this task.
        while store.is_present(part) and part not in store.verified:
            if await self._verifying.run(key, self._verify, store, part, url) is not None:
                return

    async def _verify(self, store: PartStore, part: int, url: str) -> bool:
        self.verifications += 1
        ok = await trio.to_thread.run_sync(store.verify, part)
        if not ok:
            log.warning("%s: cached part %d failed its CRC check; fetching it again", url, part)
            store.drop([part])
        return ok


@dataclass(slots=True, eq=False)
class OpenFile:
    """The reads of one open file of one object version (see the module docstring)."""

    reader: Reader
    store: PartStore
    url: str
    # The part a sequential reader is in, pinned until it moves on or closes: read-ahead
    # for the stream must not evict the part the stream has not finished.
    position: int | None = None
    # Parts whose fetch failed for this open file: part -> (trio time, error).
    failed: dict[int, tuple[float, OssfsError]] = field(default_factory=dict)

    async def read(self, off: int, size: int) -> bytes | memoryview:
        """Object bytes ``[off, off+size)`` (fewer at the end of the object).

        A memoryview into the shared reply buffer is valid until the next await.
        """
        store = self.store
        total = store.identity.size
        if off >= total or size <= 0:
            return b""
        end = min(off + size, total)
        parts = store.layout.parts_for(off, end - off)
        fetcher, cache, reader = self.reader.fetcher, self.reader.cache, self.reader
        reader.count_hits(store, parts, off, end)
        window = fetcher.observe(store, off, end - off)
        self._move_position(parts[-1] if window else None, reading=parts)
        if window:
            # Flights start running only at this task's next await, after the pin below.
            # The room read-ahead makes (eviction, in the cache or in memory) must not
            # come from the parts this read is about to use: pinned meanwhile (and no
            # trim on letting go: the read itself does that, if it has to wait).
            with cache.pinned(store, parts, trim=False):
                fetcher.read_ahead(store, end, window)
        # Everything on disk and checked (here, first, for parts an earlier run cached),
        # and in the page cache: answered without yielding to other tasks, so nothing
        # can evict the parts between the check and the read.
        answer = reader.checked_answer(store, parts, off, end)
        if answer is not None:
            reader.read_through(store, cache.note_access(store, parts, read_to=end), end)
            return answer
        async with self._remember_failure(parts):
            # Pinned from before the first presence check to the end of the read:
            # no eviction can punch these parts in between.
            read = False
            try:
                with cache.pinned(store, parts):
                    try:
                        await fetcher.wait_for(store, off, end)
                        for p in parts:
                            if store.is_present(p) and p not in store.verified:
                                await reader.verify(store, p, self.url)
                        await fetcher.wait_for(store, off, end)
                    except NoSpaceError:
                        # The cache disk is full and nothing can be evicted: the bytes
                        # come from the network (same version: If-Match), not cached.
                        return await fetcher.read_uncached(store, off, end)
                    # The shared reply buffer is returned with no await after it is filled.
                    answer = reader.cached_answer(store, off, end)
                    if answer is None:
                        answer = await reader.disk_answer(store, off, end)
                    read = True
            finally:
                if store.memory is not None and store.memory.state:
                    self._done_with_memory(parts, off, end, read=read)
            reader.read_through(store, cache.note_access(store, parts, read_to=end), end)
        return answer

    def _done_with_memory(self, parts: range, off: int, end: int, *, read: bool) -> None:
        """A read of ``[off, end)`` ended (*read*: with the bytes): parts held in memory
        whose every byte has been read, or that a failed fetch left for it, are
        released unless another read holds them."""
        store = self.store
        memory = store.memory
        assert memory is not None
        for p in parts:
            if read:
                first, last = store.layout.bounds(p)
                memory.note_read(p, min(last, end) - max(first, off))
            memory.let_go(p)

    def close(self) -> None:
        self._move_position(None)

    @asynccontextmanager
    async def _remember_failure(self, parts: Sequence[int]) -> AsyncIterator[None]:
        now = trio.current_time()
        for p in parts:
            failed = self.failed.get(p)
            if failed is not None and now - failed[0] < FAILURE_MEMORY:
                raise failed[1]
        try:
            yield
        except NoSpaceError:
            raise
        except OssfsError as e:
            failed_at = trio.current_time()  # not `now`: the fetch may have taken a minute
            for p in parts:
                self.failed[p] = (failed_at, e)
            raise

    def _move_position(self, part: int | None, reading: range = range(0)) -> None:
        if part == self.position:
            return
        cache = self.reader.cache
        if part is not None:
            cache.pin(self.store, [part])
        if self.position is not None:
            old = self.position
            cache.unpin(self.store, [old])
            memory = self.store.memory
            if memory is not None and old not in reading:
                memory.let_go(old)  # the stream has moved past it
        self.position = part
