"""The fetcher owns concurrency: which parts are fetched, when, and how many at once.

Every byte ossfs downloads goes through a *flight*: the one fetch of one part
of one store. A mount read, a read-ahead guess, ``materialize`` and
``download`` all use them, and the fetcher guarantees:

- one GET per missing part however many tasks want it (single flight: later
  callers wait on the first one's flight, then look at the store again);
- at most ``connections`` GETs at once across everything (a trio
  `CapacityLimiter`); read-ahead may use only part of them, so a reader that
  must wait always finds a free connection soon;
- a reader waits only for the bytes it asked for, not the whole part: a flight
  publishes how far it has written, and `read` returns as soon as its range is
  on disk;
- a part is committed to the store's index only after all its bytes are
  written, with the CRC-64 computed as they arrived; the flight ends in the
  same step (nobody can see a committed part through a flight, which could
  outlive the part: a stale flight once said "written" for a part eviction
  had punched meanwhile);
- room in the cache (the `Budget`) is reserved when a flight is created, in
  the same step, and given back when it ends: read-ahead that does not fit
  next to what readers hold is not started at all.

Rules (from trio): no ``timeout=`` parameters (callers use cancel scopes);
cancellation leaves no half-recorded part, since a part is recorded last.
Mount flights run in the mount's nursery, so a reader that gives up (an
interrupted ``read``) does not cancel a fetch other readers wait on.

Must not import: pyfuse3, httpx.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio
from cachetools import TTLCache

from ossfs.cache.cachedir import CacheDir, is_small
from ossfs.cache.index import StoreIdentity
from ossfs.cache.store import EARLY_WRITEBACK, PartStore
from ossfs.client import ObjectClient
from ossfs.crc import crc64
from ossfs.errors import IntegrityError, NoSpaceError
from ossfs.fsutil import is_disk_full

__all__ = ["Fetcher", "ByteCallback", "Budget", "ReadAhead"]

log = logging.getLogger(__name__)

ByteCallback = Callable[[int], None]
# A part whose fetch failed (after the client's whole retry cycle) fails again at once
# for this many seconds: the kernel repeats a failed read (its read-ahead request, then
# the read itself), and each repeat would otherwise run the whole cycle again.
FAILURE_MEMORY = 10.0


class Budget(Protocol):
    """The room fetches may take (the cache directory implements it)."""

    def admit(self, store: PartStore, part: int, nbytes: int, *, readahead: bool) -> bool:
        """Reserve room for a fetch (may evict); False: read-ahead that does not fit.

        Raises NoSpaceError when even a reader's own part cannot be written without
        going below the free-space floor."""

    def settle(self, store: PartStore, part: int, nbytes: int, *, written: int,
               committed: bool, readahead: bool) -> None:
        """End a reservation: the fetch committed the part, or stopped after *written*."""


@dataclass(slots=True)
class _Flight:
    """The fetch of one part: how far it got, and how it ended."""

    first: int
    end: int
    written: int  # object offset up to which bytes are on disk
    readahead: bool = False
    admitted: bool = False  # room was reserved in the budget (settled when it ends)
    done: trio.Event = field(default_factory=trio.Event)
    progress: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None

    def advance(self, upto: int) -> None:
        self.written = upto
        wake, self.progress = self.progress, trio.Event()
        wake.set()

    def finish(self, error: BaseException | None) -> None:
        self.error = error
        self.done.set()
        self.progress.set()


@dataclass(slots=True)
class ReadAhead:
    """Per open file: is the reader sequential, and how far ahead to fetch.

    The window (in parts) starts at 1 and doubles with every sequential read
    up to ``max_parts``; a read elsewhere resets it. "Sequential" tolerates the
    reordering of concurrent kernel read requests: anything from a little
    before to a little after where the last read ended.
    """

    max_parts: int
    expected: int = 0
    window: int = 0

    def observe(self, offset: int, size: int, part_size: int) -> int:
        """Record a read; return how many parts after it to fetch ahead."""
        slack = max(part_size, 1 << 20)
        if self.expected - slack <= offset <= self.expected + slack:
            self.window = min(self.max_parts, max(1, self.window * 2))
        else:
            self.window = 0
        self.expected = max(self.expected, offset + size) if self.window else offset + size
        return self.window


class Fetcher:
    """Fetch parts into part stores, once each, under one connection budget."""

    def __init__(
        self,
        client: ObjectClient,
        *,
        connections: int,
        budget: Budget | None = None,
        readahead_share: float = 0.75,
    ) -> None:
        self.client = client
        self.connections = max(1, connections)
        self.limiter = trio.CapacityLimiter(self.connections)
        # Read-ahead flights also take this one, so guesses never hold every connection.
        self.readahead_limiter = trio.CapacityLimiter(
            max(1, min(self.connections - 1, int(self.connections * readahead_share))))
        self._budget = budget
        self._flights: dict[tuple[int, int], _Flight] = {}
        self._opening: dict[str, trio.Event] = {}
        self._failed: TTLCache[tuple[int, int], BaseException] = TTLCache(
            maxsize=4096, ttl=FAILURE_MEMORY, timer=trio.current_time)
        # Called with a store whose complete bytes did not match the service's CRC-64
        # (its parts are dropped by then): the mount drops the kernel's pages of it.
        self.on_corrupt: Callable[[PartStore], None] | None = None
        self.crc_mismatches = 0
        self.uncached_bytes = 0  # served from the network because the cache disk was full
        self._nursery: trio.Nursery | None = None
        self.parts_fetched = 0
        self.bytes_fetched = 0

    def attach(self, nursery: trio.Nursery) -> None:
        """Run background flights (mount reads, read-ahead) in *nursery*."""
        self._nursery = nursery

    async def open_store(self, cache: CacheDir, identity: StoreIdentity) -> PartStore:
        """`CacheDir.acquire` without blocking the event loop.

        Creating a cache entry is a handful of file-system calls; on a slow disk
        a directory walk over thousands of small objects would otherwise stall
        every reader. The work runs in a worker thread, once per store however
        many tasks ask for it at the same time.
        """
        while True:
            store = cache.reuse(identity)
            if store is not None:
                return store
            if is_small(identity):
                # One file (ossfs.cache.small): finding it costs less than a thread hop
                # (creating it does not: that goes to the thread below).
                store = cache.find_small(identity) or cache.new_small(identity)
                if store is not None:
                    return store
            key = cache.store_key(identity)
            opening = self._opening.get(key)
            if opening is None:
                break
            await opening.wait()
        done = self._opening[key] = trio.Event()
        try:
            prepared = await trio.to_thread.run_sync(cache.prepare, identity)
            return cache.adopt(prepared)
        finally:
            del self._opening[key]
            done.set()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a helper task (e.g. one that waits on a flight) in the background nursery."""
        if self._nursery is None:
            raise RuntimeError("Fetcher.attach() was not called")
        self._nursery.start_soon(fn, *args)

    # ---------------------------------------------------------------- fetch a part

    async def ensure(
        self,
        store: PartStore,
        part: int,
        *,
        on_bytes: ByteCallback | None = None,
    ) -> bool:
        """Make *part* present in *store* in this task; True when this call fetched it.

        Raises what the fetch raised (also to tasks that were waiting on the
        same part); a cancelled fetch makes a waiter try on its own.
        """
        while not store.is_present(part):
            flight = self._flights.get((id(store), part))
            if flight is not None:
                await flight.done.wait()
                self._raise_for(flight)
                continue
            flight = self._new_flight(store, part, readahead=False)
            if flight is None:
                return False
            await self._fly(store, part, flight, on_bytes)
            self._raise_for(flight)
            return True
        return False

    def _raise_for(self, flight: _Flight) -> None:
        if flight.error is not None and not isinstance(flight.error, trio.Cancelled):
            raise flight.error

    def _new_flight(self, store: PartStore, part: int, *, readahead: bool) -> _Flight | None:
        """Register a flight for a missing part, with room reserved for it.

        None when the part turned out present, or when it is read-ahead the
        budget has no room for.
        """
        # Another process sharing the store may have fetched it meanwhile.
        store.refresh()
        if store.is_present(part):
            return None
        first, end = store.layout.bounds(part)
        flight = _Flight(first, end, first, readahead=readahead)
        if self._budget is not None:
            if not self._budget.admit(store, part, end - first, readahead=readahead):
                return None
            flight.admitted = True
        self._flights[(id(store), part)] = flight
        return flight

    async def _fly(
        self,
        store: PartStore,
        part: int,
        flight: _Flight,
        on_bytes: ByteCallback | None,
    ) -> None:
        """Fetch one part; record the outcome in *flight*, and raise it."""
        store.flight_started()
        try:
            if flight.readahead:
                async with self.readahead_limiter:
                    await self._fetch(store, part, flight, on_bytes)
            else:
                await self._fetch(store, part, flight, on_bytes)
        except BaseException as e:
            self._land(store, part, flight, e)
            raise
        else:
            self._land(store, part, flight, None)
        finally:
            store.flight_ended()

    def _land(self, store: PartStore, part: int, flight: _Flight,
              error: BaseException | None) -> None:
        """End *flight* (once): unregister it, give back its room, wake its waiters."""
        if flight.done.is_set():
            return
        if self._flights.get((id(store), part)) is flight:
            del self._flights[(id(store), part)]
        if error is not None and not isinstance(error, trio.Cancelled | NoSpaceError):
            self._failed[(id(store), part)] = error
        if flight.admitted and self._budget is not None:
            committed = error is None and store.is_present(part)
            self._budget.settle(store, part, flight.end - flight.first,
                                written=flight.written - flight.first,
                                committed=committed, readahead=flight.readahead)
        flight.finish(error)

    async def _fetch(self, store: PartStore, part: int, flight: _Flight,
                     on_bytes: ByteCallback | None) -> None:
        if not await self._claim(store, part):
            return  # another process fetched it meanwhile
        try:
            store.refresh()
            if not store.is_present(part):
                await self._download(store, part, flight, on_bytes)
        finally:
            store.unlock_part(part)
        if store.complete:
            self.check_whole(store, store.server_crc64)

    def check_whole(self, store: PartStore, service_crc64: int | None) -> None:
        """Compare a complete store with the service's CRC-64 of the object, once.

        On a mismatch the parts are dropped (IntegrityError, counted, logged by
        the caller), and `on_corrupt` hears of it.
        """
        if service_crc64 is None or not store.complete:
            return
        store.server_crc64 = service_crc64
        try:
            store.check_crc()
        except IntegrityError:
            self.crc_mismatches += 1
            if self.on_corrupt is not None:
                self.on_corrupt(store)
            raise

    async def _claim(self, store: PartStore, part: int) -> bool:
        """Take the cross-process claim on *part*; False when it became present instead.

        Another process (a second mount, ``materialize``) may be fetching the
        same part of a shared cache: wait for it rather than fetch it twice.
        """
        delay = 0.01
        while not store.try_lock_part(part):
            await trio.sleep(delay)
            delay = min(delay * 2, 0.25)
            store.refresh()
            if store.is_present(part):
                return False
        return True

    async def _download(self, store: PartStore, part: int, flight: _Flight,
                        on_bytes: ByteCallback | None) -> None:
        ident = store.identity
        crc = 0

        def sink(offset: int, data: memoryview) -> None:
            nonlocal crc
            try:
                store.write(offset, data)
            except OSError as e:
                if is_disk_full(e):
                    raise _no_space(e, store) from e
                raise
            crc = crc64(data, crc)
            flight.advance(offset + len(data))
            if on_bytes is not None:
                on_bytes(len(data))

        async with self.limiter:
            got = await self.client.get_range(ident.bucket, ident.key, flight.first,
                                              flight.end, ident.etag, sink)
        if got.object_crc64 is not None:
            store.server_crc64 = got.object_crc64
        try:
            store.commit(part, crc)
        except OSError as e:
            if is_disk_full(e):
                raise _no_space(e, store) from e
            raise
        self.parts_fetched += 1
        self.bytes_fetched += got.nbytes
        # The flight ends with the commit, before anything else can run: from here
        # on the index speaks for the part (it may be evicted, and fetched again).
        self._land(store, part, flight, None)
        # Writeback may block when the disk is busy: never in the event loop. (Small
        # parts have none: no thread hop for them.)
        if flight.end - flight.first >= EARLY_WRITEBACK:
            await trio.to_thread.run_sync(store.start_writeback, part)

    # ---------------------------------------------------------------- background

    def start(self, store: PartStore, part: int, *, readahead: bool = False) -> _Flight | None:
        """Start fetching *part* in the background unless present or in flight."""
        if store.is_present(part):
            return None
        flight = self._flights.get((id(store), part))
        if flight is not None:
            return flight
        if self._nursery is None:
            raise RuntimeError("Fetcher.attach() was not called")
        failed = self._failed.get((id(store), part))
        if failed is not None:
            first, end = store.layout.bounds(part)
            flight = _Flight(first, end, first, readahead=readahead)
            flight.finish(failed)
            return flight
        flight = self._new_flight(store, part, readahead=readahead)
        if flight is None:
            return None
        self._nursery.start_soon(self._background, store, part, flight)
        return flight

    async def _background(self, store: PartStore, part: int, flight: _Flight) -> None:
        try:
            await self._fly(store, part, flight, None)
        except IntegrityError as e:
            log.error("%s", e)
        except Exception as e:
            # Recorded in the flight: the readers waiting on it raise it.
            log.debug("background fetch of part %d of %s failed: %s", part,
                      store.identity.key, e)

    async def wait_for(self, store: PartStore, offset: int, end: int) -> None:
        """Return once object bytes ``[offset, end)`` are on disk, fetching what is missing.

        Needs `attach`. Raises the error of a failed flight. The caller must pin
        the parts first: bytes a running flight has written are trusted only
        while that flight runs (its part is not in the index, so nothing can
        evict it); once a flight has ended, only the index counts.
        """
        for part in store.layout.parts_for(offset, end - offset):
            _, part_end = store.layout.bounds(part)
            need = min(end, part_end)
            while not store.is_present(part):
                flight = self.start(store, part)
                if flight is None:
                    continue  # present now (or another process has it): look again
                while flight.written < need and not flight.done.is_set():
                    await flight.progress.wait()
                if not flight.done.is_set():
                    break  # our bytes are written and the part is not recorded yet
                # Ended: committed (the loop sees it present) or failed. Only a
                # cancelled flight (nobody's fault) is started again.
                self._raise_for(flight)

    async def read_uncached(self, store: PartStore, offset: int, end: int) -> bytes:
        """Object bytes ``[offset, end)`` straight from the service, not cached (the
        cache disk is full). Still of the store's version: the GET carries If-Match."""
        ident = store.identity
        buf = bytearray(end - offset)

        def sink(at: int, data: memoryview) -> None:
            buf[at - offset:at - offset + len(data)] = data

        async with self.limiter:
            got = await self.client.get_range(ident.bucket, ident.key, offset, end,
                                              ident.etag, sink)
        self.bytes_fetched += got.nbytes
        self.uncached_bytes += got.nbytes
        return bytes(buf[:got.nbytes])

    def read_ahead(self, store: PartStore, after_part: int, window: int) -> None:
        """Fetch up to *window* missing parts after *after_part* in the background,
        in order, as far as the budget admits them."""
        last = min(store.layout.count - 1, after_part + window)
        for part in range(after_part + 1, last + 1):
            if store.is_present(part) or (id(store), part) in self._flights:
                continue
            if self.start(store, part, readahead=True) is None and not store.is_present(part):
                return  # no room: a later read asks again


def _no_space(error: OSError, store: PartStore) -> NoSpaceError:
    return NoSpaceError(f"the cache disk is full ({os.strerror(error.errno or 0)}) writing "
                        f"{store.data_path}", path=store.data_path)
