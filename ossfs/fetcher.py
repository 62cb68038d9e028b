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
  next to what readers hold is not started at all;
- while the cache disk is behind (`pressure`), a mount's reads and read-ahead
  fetch into memory instead (`ossfs.cache.memory`, under its own budget); those
  parts are never recorded, and `ensure` (``materialize``) never uses them.

Rules (from trio): no ``timeout=`` parameters (callers use cancel scopes);
cancellation leaves no half-recorded part, since a part is recorded last.
Mount flights run in the mount's nursery, so a reader that gives up (an
interrupted ``read``) does not cancel a fetch other readers wait on.

Must not import: pyfuse3, httpx.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ossfs.cache.cachedir import CacheDir, is_small
from ossfs.cache.index import StoreIdentity
from ossfs.cache.memory import MemoryBudget, MemoryParts
from ossfs.cache.store import EARLY_WRITEBACK, PartStore
from ossfs.client import ObjectClient
from ossfs.crc import crc64
from ossfs.errors import IntegrityError, NoSpaceError
from ossfs.flight import SingleFlight
from ossfs.fsutil import is_disk_full

__all__ = ["Fetcher", "ByteCallback", "Budget", "Streams"]

log = logging.getLogger(__name__)

ByteCallback = Callable[[int], None]
# The most one read-ahead GET asks for (a run of consecutive parts).
MAX_RUN_BYTES = 16 << 20
# The writeback of committed parts is started this many bytes at a time.
WRITEBACK_BATCH = 16 << 20
# A reader whose part has no room yet, while the cache's evictor makes it in a worker
# thread, asks again every ROOM_POLL seconds, for ROOM_WAIT seconds at most; then the
# room is made in the event loop (an evictor stuck on a dead disk delays, never hangs).
ROOM_POLL = 0.005
ROOM_WAIT = 2.0


class Budget(Protocol):
    """The room fetches may take (the cache directory implements it)."""

    def admit(
        self, store: PartStore, part: int, nbytes: int, *, readahead: bool, wait: bool = False
    ) -> bool:
        """Reserve room for a fetch (may evict); False: read-ahead that does not fit,
        or, with *wait*, a reader's part whose room an evictor in the background is
        making (ask again a moment later).

        Raises NoSpaceError when even a reader's own part cannot be written without
        going below the free-space floor."""

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
        """End a reservation: the fetch committed the part, or stopped after *written*."""


@dataclass(slots=True)
class _Flight:
    """The fetch of one part: how far it got, and how it ended."""

    first: int
    end: int
    written: int  # object offset up to which bytes are on disk
    readahead: bool = False
    admitted: bool = False  # room was reserved in the budget (settled when it ends)
    memory: bool = False  # into memory, not the cache (room reserved in the memory budget)
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
class _Stream:
    expected: int  # object offset where the stream's next read should start
    consumed: int  # bytes the stream has read so far
    used: int  # when it last read (a counter, for least recently used)


class Streams:
    """The sequential readers of one object version, whoever they are.

    A stream is a run of reads that each start near where an earlier one
    ended: one handle's `read` calls, page faults of an mmap, several threads
    or processes each reading their own range (they share the store). A read
    continues the stream whose expected offset it is close to (a little
    before: the kernel's concurrent requests arrive out of order; or ahead: a
    short skip), else it starts a new one; the least recently used of more
    than ``max_streams`` is forgotten.

    The read-ahead window of a stream is what it has consumed, up to
    ``max_window`` bytes: nothing for a single read (a random reader, or
    ``head``, fetches only what it touches), then growing with what the reader
    actually takes rather than with the number of requests.
    """

    def __init__(
        self,
        max_window: int,
        *,
        max_streams: int = 16,
        back_slack: int = 1 << 20,
        skip: int = 1 << 20,
    ) -> None:
        self.max_window = max_window
        self.max_streams = max_streams
        self.back_slack = back_slack
        self.skip = skip
        self._streams: list[_Stream] = []
        self._clock = 0

    def observe(self, offset: int, size: int) -> int:
        """Record a read of ``[offset, offset+size)``; return the bytes to fetch after it."""
        self._clock += 1
        for st in self._streams:
            if st.expected - self.back_slack <= offset <= st.expected + self.skip:
                st.consumed += size
                st.expected = max(st.expected, offset + size)
                st.used = self._clock
                return min(self.max_window, st.consumed)
        if len(self._streams) >= self.max_streams:
            self._streams.remove(min(self._streams, key=lambda t: t.used))
        self._streams.append(_Stream(offset + size, size, self._clock))
        return 0


class Fetcher:
    """Fetch parts into part stores, once each, under one connection budget."""

    def __init__(
        self,
        client: ObjectClient,
        *,
        connections: int,
        budget: Budget | None = None,
        readahead_share: float = 0.875,
        read_ahead: int = 128 << 20,
        memory: MemoryBudget | None = None,
        pressure: Callable[[], bool] | None = None,
    ) -> None:
        """*memory* and *pressure*: a mount's readers fetch into memory under that
        budget while *pressure* says the cache disk is behind (ossfs.pressure)."""
        self.client = client
        self.connections = max(1, connections)
        self.limiter = trio.CapacityLimiter(self.connections)
        # Read-ahead flights also take this one, so guesses never hold every connection
        # (14 of 16: a reader that must wait finds one of the other two).
        self.ahead_connections = max(
            1, min(self.connections - 1, int(self.connections * readahead_share))
        )
        self.readahead_limiter = trio.CapacityLimiter(self.ahead_connections)
        self._budget = budget
        self.memory = memory
        self._pressure = pressure
        self.read_ahead_bytes = read_ahead
        self._streams: weakref.WeakKeyDictionary[PartStore, Streams] = weakref.WeakKeyDictionary()
        self._flights: dict[tuple[int, int], _Flight] = {}
        self._opening: SingleFlight[str] = SingleFlight()
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
            # None: another task was opening the store (and may have failed); look again.
            store = await self._opening.run(cache.store_key(identity), _open, cache, identity)
            if store is not None:
                return store

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
        asked = trio.current_time()
        while not store.is_present(part):
            flight = self._flights.get((id(store), part))
            if flight is not None:
                await flight.done.wait()
                self._raise_for(flight)
                continue
            flight = self._new_flight(store, part, readahead=False, wait=_may_wait(asked))
            if flight is None:
                if store.is_present(part):
                    return False
                await trio.sleep(ROOM_POLL)  # the room is being made
                continue
            await self._fly(store, part, flight, on_bytes)
            self._raise_for(flight)
            return True
        return False

    def _raise_for(self, flight: _Flight) -> None:
        if flight.error is not None and not isinstance(flight.error, trio.Cancelled):
            raise flight.error

    def _new_flight(
        self,
        store: PartStore,
        part: int,
        *,
        readahead: bool,
        refresh: bool = True,
        wait: bool = False,
        fit: bool = False,
        memory_ok: bool = False,
    ) -> _Flight | None:
        """Register a flight for a missing part, with room reserved for it.

        None when the part turned out present, or when it is read-ahead the
        budget has no room for (or, with *wait*, a part whose room is being made:
        the caller waits and asks again). *refresh* False: the caller has just
        looked at the index (one look for a whole run). *fit*: admitted only when it
        fits next to what is held, as read-ahead is (the tail of a run), but not held
        for a stream once fetched. *memory_ok*: a mount's read, which fetches into
        memory while the cache disk is behind.
        """
        if refresh:
            store.refresh()  # another process sharing the store may have fetched it
        if store.is_present(part) or (memory_ok and store.has(part)):
            return None
        first, end = store.layout.bounds(part)
        flight = _Flight(first, end, first, readahead=readahead)
        mem = store.memory if memory_ok else None
        if mem is not None and mem.take_over(part):
            # What a failed fetch into memory left is read from there: fetch it there.
            flight.memory = True
        elif memory_ok and self._into_memory(store, part) and (mem := self._memory_of(store)):
            assert self.memory is not None
            if not self.memory.reserve(store, part, must=not (readahead or fit)):
                return None
            mem.fly(part)
            flight.memory = True
        elif self._budget is not None:
            guess = readahead or fit
            try:
                if not self._budget.admit(store, part, end - first, readahead=guess, wait=wait):
                    return None
            except (NoSpaceError, OSError) as e:
                if not guess:
                    raise
                # Only a guess: no room for it (or an eviction that failed to make
                # room) is "not now", as when it does not fit: raising would strand
                # the flights its caller has made so far, never started.
                log.debug("no room for part %d of %s: %s", part, store.identity.key, e)
                return None
            flight.admitted = True
        self._flights[(id(store), part)] = flight
        return flight

    def _into_memory(self, store: PartStore, part: int) -> bool:
        """Whether a read of *part* fetches into memory now (the disk is behind)."""
        return (
            self.memory is not None
            and self._pressure is not None
            and store.layout.count > 1  # (an object of one part is one small file)
            # What a failed fetch left in the cache file for a reader is read from
            # there: the next fetch must write there too.
            and not self.memory.left_over(store, part)
            and self._pressure()
        )

    def _memory_of(self, store: PartStore) -> MemoryParts | None:
        """The store's parts in memory; None when no memory file can be made (then the
        read waits for the cache disk, as it would without the memory path)."""
        assert self.memory is not None
        try:
            return store.memory_parts(self.memory)
        except OSError as e:
            log.debug("no memory file for %s: %s", store.identity.key, e)
            return None

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

    def _land(
        self, store: PartStore, part: int, flight: _Flight, error: BaseException | None
    ) -> None:
        """End *flight* (once): unregister it, give back its room, wake its waiters."""
        if flight.done.is_set():
            return
        if self._flights.get((id(store), part)) is flight:
            del self._flights[(id(store), part)]
        if flight.memory and store.memory is not None:
            store.memory.end_flight(part)  # (kept already if it completed)
        if flight.admitted and self._budget is not None:
            committed = error is None and store.is_present(part)
            self._budget.settle(
                store,
                part,
                flight.end - flight.first,
                written=flight.written - flight.first,
                committed=committed,
                readahead=flight.readahead,
            )
        flight.finish(error)

    async def _fetch(
        self, store: PartStore, part: int, flight: _Flight, on_bytes: ByteCallback | None
    ) -> None:
        if not await self._claim(store, part):
            return  # another process fetched it meanwhile
        try:
            store.refresh()
            if not _landed(store, part, flight):
                await self._download(store, part, flight, on_bytes)
        finally:
            store.unlock_part(part)
        self.check_whole(store, store.server_crc64)

    def check_whole(self, store: PartStore, service_crc64: int | None) -> None:
        """Compare a store whose every part's CRC is known with the service's CRC-64 of
        the object, once.

        No I/O, no await: the parts' CRCs combine, and on a mismatch every part is
        dropped (`PartStore.drop_mismatched`) in the same step, so two fetches that
        complete the store together cannot both count it. IntegrityError is raised
        (counted, logged by the caller); `on_corrupt` hears of it. The store must be
        open (a fetch checks before its flight ends).
        """
        if service_crc64 is None or not store.crc_known:
            return
        store.server_crc64 = service_crc64
        actual = store.whole_crc_mismatch()
        if actual is None:
            return
        try:
            store.drop_mismatched(actual)
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

    async def _download(
        self, store: PartStore, part: int, flight: _Flight, on_bytes: ByteCallback | None
    ) -> None:
        await self._download_run(store, [(part, flight)], on_bytes)

    # ---------------------------------------------------------------- background

    def start(
        self, store: PartStore, part: int, *, readahead: bool = False, wait: bool = False
    ) -> _Flight | None:
        """Start fetching *part* for a reader in the background unless it can be read
        or is in flight (None: present, or no room: see `_new_flight`)."""
        if store.has(part):
            return None
        flight = self._flights.get((id(store), part))
        if flight is not None:
            return flight
        if self._nursery is None:
            raise RuntimeError("Fetcher.attach() was not called")
        flight = self._new_flight(store, part, readahead=readahead, wait=wait, memory_ok=True)
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
            log.debug("background fetch of part %d of %s failed: %s", part, store.identity.key, e)

    async def wait_for(self, store: PartStore, offset: int, end: int) -> None:
        """Return once object bytes ``[offset, end)`` can be read (on disk, or in
        memory while the disk is behind), fetching what is missing.

        Needs `attach`. Raises the error of a failed flight. The caller must pin
        the parts first: bytes a running flight has written are trusted only
        while that flight runs (its part is not in the index, so nothing can
        evict it); once a flight has ended, only the index counts.
        """
        for part in store.layout.parts_for(offset, end - offset):
            _, part_end = store.layout.bounds(part)
            need = min(end, part_end)
            asked = trio.current_time()
            while not store.has(part):
                flight = self.start(store, part, wait=_may_wait(asked))
                if flight is None:
                    if not store.has(part):
                        await trio.sleep(ROOM_POLL)  # the room is being made
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
            buf[at - offset : at - offset + len(data)] = data

        async with self.limiter:
            got = await self.client.get_range(
                ident.bucket, ident.key, offset, end, ident.etag, sink
            )
        self.bytes_fetched += got.nbytes
        self.uncached_bytes += got.nbytes
        return bytes(buf[: got.nbytes])

    def observe(self, store: PartStore, offset: int, size: int) -> int:
        """Record a read of *store* by any reader; return its stream's read-ahead window."""
        streams = self._streams.get(store)
        if streams is None:
            streams = self._streams[store] = Streams(self.read_ahead_bytes)
        return streams.observe(offset, size)

    def read_ahead(self, store: PartStore, offset: int, nbytes: int) -> None:
        """Fetch the missing parts over ``[offset, offset+nbytes)`` in the background,
        in order, as far as the budget admits them.

        Consecutive missing parts are fetched by one GET each run (a *run*
        flight): the cache's part size stays small, so a random reader fetches
        little, while a stream's GETs grow with its window, up to
        `MAX_RUN_BYTES`, so their number stays small.
        """
        end = store.identity.start + store.identity.length
        if nbytes <= 0 or offset >= end or self._nursery is None:
            return
        nbytes = min(nbytes, end - offset)
        # A window is cut into as many runs as read-ahead may have connections: a link
        # whose connections are each slow (a WAN, a per-connection cap) is filled.
        run_limit = max(
            store.layout.part_size, min(MAX_RUN_BYTES, nbytes // self.ahead_connections)
        )
        wanted = [
            p
            for p in store.layout.parts_for(offset, nbytes)
            if not store.has(p) and (id(store), p) not in self._flights
        ]
        if not wanted:
            return
        # Wait until a whole run is missing, unless the reader is about to need it:
        # a window that grows by one read at a time would otherwise mean one GET per part.
        frontier, _ = store.layout.bounds(wanted[0])
        if (
            len(wanted) * store.layout.part_size < run_limit
            and frontier - offset > run_limit
            and wanted[-1] != store.layout.count - 1
        ):
            return
        run: list[tuple[int, _Flight]] = []
        store.refresh()  # another process sharing the store may have fetched some
        for part in store.layout.parts_for(offset, nbytes):
            if store.has(part) or (id(store), part) in self._flights:
                self._launch_run(store, run)
                run = []
                continue
            flight = self._new_flight(store, part, readahead=True, refresh=False, memory_ok=True)
            if flight is None:
                if store.has(part):
                    continue
                break  # no room: a later read asks again
            run.append((part, flight))
            if len(run) * store.layout.part_size >= run_limit:
                self._launch_run(store, run)
                run = []
        self._launch_run(store, run)

    def _launch_run(self, store: PartStore, run: list[tuple[int, _Flight]]) -> None:
        if not run:
            return
        assert self._nursery is not None
        if len(run) == 1:
            self._nursery.start_soon(self._background, store, run[0][0], run[0][1])
        else:
            self._nursery.start_soon(self._background_run, store, list(run))

    async def _background_run(self, store: PartStore, run: list[tuple[int, _Flight]]) -> None:
        """Read-ahead of consecutive parts by one GET (`_fly_run`); failures are left
        in the flights, for the readers that wait on them."""
        try:
            await self._fly_run(store, run, None, self.readahead_limiter)
        except IntegrityError as e:
            log.error("%s", e)
        except Exception as e:
            log.debug(
                "read-ahead of parts %d-%d of %s failed: %s",
                run[0][0],
                run[-1][0],
                store.identity.key,
                e,
            )

    async def ensure_run(
        self, store: PartStore, parts: Sequence[int], *, on_bytes: ByteCallback | None = None
    ) -> None:
        """`ensure` for consecutive *parts*, by one GET when they are all missing and
        nobody fetches them (materialize: small parts need not mean many requests).

        The parts the GET did not cover (in flight in this process, fetched by
        another, no room) are then made present one by one, as `ensure` does. A part
        the GET fetched is not fetched again, even if it was evicted since (a cache
        smaller than the run).
        """
        i = 0
        while i < len(parts):
            run = self._run_from(store, parts[i:])
            if not run:  # in flight here, or no room for it yet
                await self.ensure(store, parts[i], on_bytes=on_bytes)
                i += 1
                continue
            fetched = await self._fly_run(store, run, on_bytes, None)
            for part, _flight in run:
                if part not in fetched:  # another process had it
                    await self.ensure(store, part, on_bytes=on_bytes)
            i += len(run)

    def _run_from(self, store: PartStore, parts: Sequence[int]) -> list[tuple[int, _Flight]]:
        """Flights for the leading parts of *parts* that are missing and in flight
        nowhere in this process (empty when the first is not)."""
        run: list[tuple[int, _Flight]] = []
        store.refresh()
        for part in parts:
            if store.is_present(part) or (id(store), part) in self._flights:
                break
            # The first part as a reader's; the rest only as far as the cache has room
            # beside what is in flight (a run must not overfill a small cache).
            flight = self._new_flight(store, part, readahead=False, refresh=False, fit=bool(run))
            if flight is None:
                break
            run.append((part, flight))
        return run

    async def _fly_run(
        self,
        store: PartStore,
        run: list[tuple[int, _Flight]],
        on_bytes: ByteCallback | None,
        limiter: trio.CapacityLimiter | None,
    ) -> set[int]:
        """Fetch consecutive parts with one GET; each part is committed, and its flight
        ends, as soon as its last byte is written. Every flight of *run* has ended when
        this returns (the parts it fetched) or raises (with the GET's error). A run that
        completes the store compares it with the service's CRC-64 (`check_whole`), as
        the fetch of one part does."""
        store.flight_started()
        claimed: list[tuple[int, _Flight]] = []
        error: BaseException | None = None
        try:
            gate: AbstractAsyncContextManager[object] = limiter or nullcontext()
            async with gate:
                # Only the leading parts nobody else (another process) is fetching, and
                # that are still missing: a run is one contiguous range.
                store.refresh()
                for part, flight in run:
                    if _landed(store, part, flight) or not store.try_lock_part(part):
                        break
                    claimed.append((part, flight))
                for part, flight in run[len(claimed) :]:
                    # Not ours to fetch now: its waiters look again at once rather than
                    # wait for this GET.
                    self._land(store, part, flight, None)
                if claimed:
                    await self._download_run(store, claimed, on_bytes)
            fetched = {part for part, _flight in claimed}
        except BaseException as e:
            error = e
            raise
        finally:
            for part, _flight in claimed:
                store.unlock_part(part)
            for part, flight in run:
                # Not reached (or unclaimed): waiters look at the store again, and a
                # reader that needs the part starts a flight of its own.
                self._land(store, part, flight, error)
            try:
                if error is None:
                    # While the flight still counts: the store stays open for it.
                    self.check_whole(store, store.server_crc64)
            finally:
                store.flight_ended()
        return fetched

    async def _download_run(
        self, store: PartStore, run: list[tuple[int, _Flight]], on_bytes: ByteCallback | None = None
    ) -> None:
        """GET consecutive parts (one or more) into *store*.

        Each part is committed with the CRC-64 of its bytes as they arrived, and its
        flight ends in the same step, before anything else can run: from then on the
        index speaks for the part (it may be evicted, and fetched again). Parts are
        committed as their last byte lands, except the last one, committed once the
        GET has ended and the service's CRC-64 of the object is known (a small
        object's file records whether it matched).
        """
        ident = store.identity
        index = 0
        crc = 0
        last_crc = 0
        # Committed parts whose writeback is not started yet: started a few MiB at a
        # time (one thread hop for several small parts).
        done: list[int] = []

        def sink(offset: int, data: memoryview) -> Awaitable[None] | None:
            nonlocal index, crc, last_crc, done
            received = len(data)
            while data:
                part, flight = run[index]
                take = min(len(data), flight.end - offset)
                piece = data[:take]
                if flight.memory:
                    assert store.memory is not None
                    store.memory.write(offset, piece)
                else:
                    with _disk_full_is_no_space(store):
                        store.write(offset, piece)
                crc = crc64(piece, crc)
                offset += take
                data = data[take:]
                flight.advance(offset)
                if offset == flight.end:
                    if index == len(run) - 1:
                        last_crc = crc
                    elif flight.memory:
                        self._keep(store, part, flight, crc)
                    elif self._commit(store, part, flight, crc):
                        done.append(part)
                    index += 1
                    crc = 0
            if on_bytes is not None:
                on_bytes(received)
            if len(done) * store.layout.part_size < WRITEBACK_BATCH:
                return None
            started, done = done, []
            return _writeback(store, started)

        async with self.limiter:
            got = await self.client.get_range(
                ident.bucket, ident.key, run[0][1].first, run[-1][1].end, ident.etag, sink
            )
        if got.object_crc64 is not None:
            store.server_crc64 = got.object_crc64
        self.bytes_fetched += got.nbytes
        part, flight = run[-1]
        if flight.memory:
            self._keep(store, part, flight, last_crc)
        elif self._commit(store, part, flight, last_crc):
            done.append(part)
        if done:
            await trio.to_thread.run_sync(store.start_writeback, done)

    def _commit(self, store: PartStore, part: int, flight: _Flight, crc: int) -> bool:
        """Record a part whose bytes are all written and end its flight; True when the
        part is large enough for early writeback."""
        with _disk_full_is_no_space(store):
            store.commit(part, crc)
        self.parts_fetched += 1
        self._land(store, part, flight, None)
        return flight.end - flight.first >= EARLY_WRITEBACK

    def _keep(self, store: PartStore, part: int, flight: _Flight, crc: int) -> None:
        """A part fetched into memory is complete: readers read it from there. The CRC
        of what arrived (*crc*) counts in the whole-object check."""
        assert store.memory is not None
        store.memory.keep(part)  # (counted by the memory budget, not in parts_fetched)
        store.note_served(part, crc)
        self._land(store, part, flight, None)


def _landed(store: PartStore, part: int, flight: _Flight) -> bool:
    """Whether what *flight* is for is there already: the part in memory or on disk
    for a fetch into memory, on disk for one into the cache."""
    return store.has(part) if flight.memory else store.is_present(part)


def _may_wait(asked: float) -> bool:
    """Whether a reader that first asked for room at *asked* may wait for it still."""
    return trio.current_time() - asked < ROOM_WAIT


def _writeback(store: PartStore, parts: list[int]) -> Awaitable[None] | None:
    """Start the writeback of *parts* in a worker thread (it may block when the disk is
    busy: never in the event loop); None when there is nothing to write back."""
    if not parts:
        return None
    return trio.to_thread.run_sync(store.start_writeback, parts)


@contextmanager
def _disk_full_is_no_space(store: PartStore) -> Iterator[None]:
    """ENOSPC/EDQUOT writing the cache become NoSpaceError (the mount then serves the
    read from the network); other OSErrors stay as they are."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise NoSpaceError(
            f"the cache disk is full ({os.strerror(e.errno or 0)}) writing {store.data_path}",
            path=store.data_path,
        ) from e


async def _open(cache: CacheDir, identity: StoreIdentity) -> PartStore:
    """Create (or load) a cache entry in a worker thread, then register it."""
    prepared = await trio.to_thread.run_sync(cache.prepare, identity)
    return cache.adopt(prepared)
