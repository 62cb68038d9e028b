"""The fetcher against the OSS test server: single flight, the connection cap,
readers that need only their bytes, and a store released while a fetch still writes."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ossfs.cache.cachedir import CacheDir, identity_for, object_identity
from ossfs.cache.index import IndexFile, StoreIdentity
from ossfs.cache.memory import KEPT, PARTIAL, MemoryBudget
from ossfs.cache.store import PartStore, _ofd_lock
from ossfs.client import ClientConfig, HttpObjectClient
from ossfs.crc import crc64
from ossfs.errors import IntegrityError, NoSpaceError
from ossfs.fetcher import Fetcher
from ossfs.model import DEFAULT_CACHE_PART_SIZE, WHOLE_OBJECT_MAX, MiB
from ossfs.testing import OssTestServer
from ossfs.testing.memory import MemoryClient
from tests.integration.conftest import settled_stats

BUCKET = "fetch"
PART = 256 * 1024


@pytest.fixture
def server() -> Iterator[OssTestServer]:
    with OssTestServer(credentials={"ak": "sk"}) as srv:
        srv.put(BUCKET, "obj", os.urandom(8 * PART + 17))
        yield srv


def _ident(server: OssTestServer) -> object:
    meta = server.head(BUCKET, "obj")
    assert meta is not None
    return identity_for(BUCKET, "obj", meta.etag, meta.size, PART)


class _CountingClient:
    """Passes everything to the real client and counts the GETs under way at once."""

    def __init__(self, inner: HttpObjectClient) -> None:
        self.inner = inner
        self.in_flight = 0
        self.max_in_flight = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def get_range(self, *args: object, **kwargs: object) -> object:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.inner.get_range(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            self.in_flight -= 1


async def test_single_flight_and_connection_cap(server: OssTestServer, tmp_path: Path) -> None:
    server.faults.latency = 0.05
    cache = CacheDir(str(tmp_path / "c"), max_bytes=1 << 30)
    # The HTTP client may open more connections than the fetcher's cap: the cap is
    # the fetcher's, not the connection pool's.
    async with HttpObjectClient(server.endpoint(), ClientConfig(connections=8)) as http:
        client = _CountingClient(http)
        fetcher = Fetcher(client, connections=3)  # type: ignore[arg-type]
        store = cache.acquire(_ident(server))  # type: ignore[arg-type]
        fetched: list[bool] = []

        async def want(part: int) -> None:
            fetched.append(await fetcher.ensure(store, part))

        async with trio.open_nursery() as nursery:
            for part in range(store.layout.count):
                for _ in range(4):  # four tasks want every part
                    nursery.start_soon(want, part)
        assert fetched.count(True) == store.layout.count  # one fetch per part
        # The server records a GET when its answer has ended: wait for the last one.
        records = settled_stats(server).gets
        assert len(records) == store.layout.count
        # Nine parts wanted at once, three GETs at a time: the cap is reached, never passed.
        assert client.max_in_flight == 3
        assert store.read(0, store.identity.size) == server.get(BUCKET, "obj")
        cache.release(store)


async def test_reader_gets_its_bytes_before_the_part_is_done(
    server: OssTestServer, tmp_path: Path
) -> None:
    server.faults.bandwidth = 256 * 1024  # one part takes about a second
    cache = CacheDir(str(tmp_path / "c"), max_bytes=1 << 30)
    async with HttpObjectClient(server.endpoint()) as client:
        fetcher = Fetcher(client, connections=2)
        store = cache.acquire(_ident(server))  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            with trio.fail_after(10):
                await fetcher.wait_for(store, 0, 4096)
            assert not store.is_present(0)  # served while the part is still arriving
            assert store.read(0, 4096) == server.get(BUCKET, "obj")[:4096]
            nursery.cancel_scope.cancel()
        cache.release(store)


async def test_store_released_mid_flight_stays_open_until_the_fetch_ends(
    server: OssTestServer, tmp_path: Path
) -> None:
    server.faults.bandwidth = 512 * 1024
    cache = CacheDir(str(tmp_path / "c"), max_bytes=1 << 30)
    async with HttpObjectClient(server.endpoint()) as client:
        fetcher = Fetcher(client, connections=2)
        store = cache.acquire(_ident(server))  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            flight = fetcher.start(store, 1, readahead=True)
            assert flight is not None
            await trio.sleep(0.05)
            fd = store.fileno()
            cache.release(store)  # the reader went away; the read-ahead goes on
            assert store.fileno() == fd  # not closed under the fetch
            # A file opened now must not get the store's descriptor number.
            other = os.open(os.devnull, os.O_RDONLY)
            assert other != fd
            os.close(other)
            with trio.fail_after(20):
                await flight.done.wait()
            assert flight.error is None
        assert store.fileno() == -1  # closed once the fetch ended
        again = cache.acquire(_ident(server))  # type: ignore[arg-type]
        assert again.is_present(1)
        first, end = again.layout.bounds(1)
        assert again.read(first, end - first) == server.get(BUCKET, "obj")[first:end]
        cache.release(again)


# ------------------------------------------------------------ runs (materialize)


def _store_of(
    client: MemoryClient, tmp_path: Path, size: int, cap: int = 1 << 30
) -> tuple[CacheDir, PartStore, bytes]:
    """A random object of *size* bytes put into *client*, and its store in a new cache."""
    data = os.urandom(size)
    meta = client.put(BUCKET, "obj", data)
    cache = CacheDir(str(tmp_path / "c"), max_bytes=cap, min_free_fraction=0.0)
    store = cache.acquire(identity_for(BUCKET, "obj", meta.etag, size, PART))
    return cache, store, data


def _memory_store(
    tmp_path: Path, size: int, cap: int = 1 << 30
) -> tuple[MemoryClient, CacheDir, PartStore, bytes]:
    client = MemoryClient()
    return (client, *_store_of(client, tmp_path, size, cap))


def test_a_run_of_missing_parts_is_one_get(tmp_path: Path) -> None:
    client, cache, store, data = _memory_store(tmp_path, 10 * PART + 5)
    fetcher = Fetcher(client, connections=2, budget=cache)
    got: list[int] = []

    async def main() -> None:
        await fetcher.ensure(store, 3)  # one part in the middle is cached already
        await fetcher.ensure_run(store, list(range(8)), on_bytes=got.append)

    trio.run(main)
    assert client.gets == 3  # part 3, then parts 0-2 in one GET, then parts 4-7 in one
    assert sum(got) == 7 * PART
    assert [p for p in range(store.layout.count) if store.is_present(p)] == list(range(8))
    assert store.read(0, 8 * PART) == data[: 8 * PART]
    cache.release(store)


def test_a_run_is_cut_to_the_room_of_a_small_cache(tmp_path: Path) -> None:
    """A cache smaller than the parts asked for: a run takes only what fits beside
    the parts in flight, and every byte is fetched once."""
    client, cache, store, data = _memory_store(tmp_path, 20 * PART, cap=4 * PART)
    fetcher = Fetcher(client, connections=2, budget=cache)

    async def main() -> None:
        await fetcher.ensure_run(store, list(range(20)))

    trio.run(main)
    assert sum(client.bytes_sent.values()) == len(data)  # every byte once
    assert 1 < client.gets < 20  # runs, cut to what fits beside the parts in flight
    assert store.present_bytes <= 4 * PART + PART
    cache.release(store)


def test_parts_a_run_fetched_are_not_fetched_again_once_evicted(tmp_path: Path) -> None:
    """Two runs at once through a small cache: each evicts what the other committed
    before its GET ended; neither fetches those parts again."""
    client = MemoryClient(latency=0.01, bandwidth=4 * PART)
    objects = {k: os.urandom(12 * PART) for k in ("a", "b")}
    cache = CacheDir(str(tmp_path / "c"), max_bytes=6 * PART, min_free_fraction=0.0)
    stores = {}
    for key, body in objects.items():
        meta = client.put(BUCKET, key, body)
        stores[key] = cache.acquire(identity_for(BUCKET, key, meta.etag, len(body), PART))
    fetcher = Fetcher(client, connections=4, budget=cache)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for store in stores.values():
                nursery.start_soon(partial(fetcher.ensure_run, store, list(range(12))))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert sum(client.bytes_sent.values()) == sum(len(b) for b in objects.values())
    for store in stores.values():
        cache.release(store)


@pytest.mark.parametrize("failure", ["full", "eio"])
def test_no_room_for_read_ahead_is_not_an_error(tmp_path: Path, failure: str) -> None:
    """A budget that raises for a guess: NoSpaceError (the disk at its floor), or an
    OSError of the eviction that was to make room (an index append or a punch that
    failed). The read-ahead made so far still runs, and a reader waiting for it is
    served (with the OSError, the flights made before it were never started, and
    the reader waited for ever)."""
    client, cache, store, data = _memory_store(tmp_path, 8 * PART)

    class FullForGuesses:
        """Room for a reader's parts, and for two guesses."""

        guesses = 2

        def admit(self, *args: object, readahead: bool, wait: bool = False) -> bool:
            if readahead:
                if self.guesses <= 0:
                    if failure == "eio":
                        raise OSError(errno.EIO, "Input/output error")
                    raise NoSpaceError("the cache disk is full", path=str(tmp_path))
                self.guesses -= 1
            return True

        def settle(self, *args: object, **kwargs: object) -> None:
            pass

    fetcher = Fetcher(client, connections=4, budget=FullForGuesses())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            fetcher.read_ahead(store, 0, len(data))
            with trio.fail_after(30):
                await fetcher.wait_for(store, 0, len(data))
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert store.read(0, len(data)) == data
    cache.release(store)


def test_a_cache_made_at_the_earlier_default_part_size_keeps_serving(tmp_path: Path) -> None:
    """A large object cached with 8 MiB parts (the default before it became 1 MiB) is
    read from that store at today's default: nothing is fetched again."""
    client = MemoryClient()
    data = os.urandom(WHOLE_OBJECT_MAX + 3 * MiB)
    meta = client.put(BUCKET, "big", data)
    root = str(tmp_path / "c")

    async def fill(part_size: int) -> None:
        cache = CacheDir(root, max_bytes=1 << 30, min_free_fraction=0.0)
        fetcher = Fetcher(client, connections=2, budget=cache)
        ident = object_identity(BUCKET, "big", meta.etag, len(data), part_size)
        store = await fetcher.open_store(cache, ident)
        await fetcher.ensure_run(store, list(range(store.layout.count)))
        cache.release(store)
        cache.close()

    trio.run(fill, 8 * MiB)
    assert client.gets == 1

    async def read_at_default() -> None:
        cache = CacheDir(root, max_bytes=1 << 30, min_free_fraction=0.0)
        fetcher = Fetcher(client, connections=2, budget=cache)
        ident = object_identity(BUCKET, "big", meta.etag, len(data), DEFAULT_CACHE_PART_SIZE)
        info = cache.info_for(ident)
        assert info is not None and info.cached_bytes == len(data)
        store = await fetcher.open_store(cache, ident)
        assert store.identity.part_size == 8 * MiB and store.complete
        assert cache.reuse(ident) is store  # (a second open finds it too)
        cache.release(store)
        assert store.read(0, len(data)) == data
        cache.release(store)
        cache.close()

    trio.run(read_at_default)
    assert client.gets == 1

    # A new version of the object gets a store of today's part size.
    meta = client.put(BUCKET, "big", data[::-1])
    trio.run(fill, DEFAULT_CACHE_PART_SIZE)
    assert client.gets == 2
    cache = CacheDir(root, max_bytes=1 << 30, min_free_fraction=0.0)
    ident = object_identity(BUCKET, "big", meta.etag, len(data), DEFAULT_CACHE_PART_SIZE)
    store = cache.acquire(ident)
    assert store.identity.part_size == DEFAULT_CACHE_PART_SIZE and store.complete
    cache.release(store)
    cache.close()


class _DamagingClient(MemoryClient):
    """Flips one byte, at object offset *at*, in the first answer that carries it
    after *intact* answers that carry it went through unharmed."""

    at = 0
    intact = 0
    damaged = False

    async def get_range(
        self, bucket: str, key: str, start: int, end: int, etag: str | None, sink: Any
    ) -> Any:
        def flip(pos: int, chunk: memoryview) -> Any:
            if not self.damaged and pos <= self.at < pos + len(chunk):
                if self.intact:
                    self.intact -= 1
                    return sink(pos, chunk)
                self.damaged = True
                bad = bytearray(chunk)
                bad[self.at - pos] ^= 0xFF
                return sink(pos, memoryview(bad))
            return sink(pos, chunk)

        return await super().get_range(bucket, key, start, end, etag, flip)


def _damaging_store(
    tmp_path: Path, size: int, at: int, *, intact: int = 0, damaged: bool = False
) -> tuple[_DamagingClient, CacheDir, PartStore, bytes]:
    """`_memory_store` with a client that flips the byte at *at* (see `_DamagingClient`;
    *damaged*: it already has, so it never does)."""
    client = _DamagingClient()
    client.at, client.intact, client.damaged = at, intact, damaged
    return (client, *_store_of(client, tmp_path, size))


def test_a_run_that_completes_a_store_checks_it_against_the_service(tmp_path: Path) -> None:
    """A byte damaged on the way (each part's CRC is of what arrived, so it agrees):
    the run that completes the store compares the whole with the service's CRC-64,
    drops every part (on disk they all match their records: the damage came over the
    wire) and fails; fetched again, the bytes are the object's."""
    client, cache, store, data = _damaging_store(tmp_path, 6 * PART + 5, at=3 * PART + 7)
    fetcher = Fetcher(client, connections=2, budget=cache)
    parts = list(range(store.layout.count))

    async def main() -> None:
        with pytest.raises(IntegrityError):
            await fetcher.ensure_run(store, parts)
        assert not store.parts
        await fetcher.ensure_run(store, parts)

    trio.run(main)
    assert client.damaged and store.complete
    assert store.read(0, len(data)) == data
    cache.release(store)


def test_a_run_that_completes_a_store_released_meanwhile_still_checks_it(
    tmp_path: Path,
) -> None:
    """The last reader lets go of the store while read-ahead completes it: the store
    closes once that fetch ends. The check of the whole must run before, on the open
    store (after, its files were closed: the check failed on them, unseen, and the
    damaged parts stayed recorded)."""
    client, cache, store, data = _damaging_store(tmp_path, 6 * PART + 5, at=3 * PART + 7)
    fetcher = Fetcher(client, connections=2, budget=cache)
    index_path = store.index_path
    assert index_path is not None
    raised: list[BaseException] = []

    async def run() -> None:
        try:
            await fetcher.ensure_run(store, list(range(store.layout.count)))
        except IntegrityError as e:
            raised.append(e)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()  # the GET waits (latency)
            assert store.flights == 1
            cache.release(store)  # closes once the fetch ends

    client.latency = 1.0
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(raised) == 1 and fetcher.crc_mismatches == 1
    assert store.fileno() == -1  # closed
    left = IndexFile.load(index_path)
    assert left is not None and left.state.parts == {}
    left.close()


def test_two_checks_of_the_same_parts_count_and_drop_once(tmp_path: Path) -> None:
    """Fetches that complete a store together each start a check of the whole: the
    second must not count the mismatch again, nor drop parts fetched after the first."""
    client, cache, store, data = _memory_store(tmp_path, 4 * PART + 1)
    bad = bytearray(data)
    bad[PART + 3] ^= 1  # damaged on the way: each part's record agrees with its bytes
    for part in range(store.layout.count):
        first, end = store.layout.bounds(part)
        store.write(first, bytes(bad[first:end]))
        store.commit(part, crc64(bytes(bad[first:end])))
    fetcher = Fetcher(client, connections=2, budget=cache)
    raised: list[BaseException] = []

    async def check() -> None:
        try:
            fetcher.check_whole(store, crc64(data))
        except IntegrityError as e:
            raised.append(e)
        await trio.sleep(0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(check)
            nursery.start_soon(check)

    trio.run(main)
    assert fetcher.crc_mismatches == 1 and len(raised) == 1
    assert not store.parts
    cache.release(store)


def _two_processes(
    tmp_path: Path,
) -> tuple[bytes, list[int], StoreIdentity, CacheDir, CacheDir]:
    """A random 4-part object (its bytes, its parts' CRCs, its identity) and two caches
    of one directory, whose locks and views of the index are as two processes' are."""
    data = os.urandom(4 * PART)
    crcs = [crc64(data[p * PART : (p + 1) * PART]) for p in range(4)]
    ident = identity_for(BUCKET, "obj", '"e"', len(data), PART)
    here = CacheDir(str(tmp_path / "c"), max_bytes=1 << 30, min_free_fraction=0.0)
    there = CacheDir(str(tmp_path / "c"), max_bytes=1 << 30, min_free_fraction=0.0)
    return data, crcs, ident, here, there


def _record_part_1_damaged(store: PartStore, data: bytes) -> None:
    """Record part 1 of *data* in *store* with one byte flipped (as it arrived)."""
    bad = bytearray(data[PART : 2 * PART])
    bad[5] ^= 1
    store.write(PART, bytes(bad))
    store.commit(1, crc64(bytes(bad)))


@pytest.mark.parametrize("seen_by", ["refresh", "commit"])
def test_a_record_another_process_makes_of_a_part_served_from_memory_is_checked(
    tmp_path: Path, seen_by: str
) -> None:
    """The whole matched with parts 1 and 3 from memory. Another process (a second
    cache of the same directory) then records part 1 with other, damaged bytes. Once
    this process sees that record (a look at the index, or its own commit of part 3
    with the bytes it served), the pass no longer holds: the whole does not match."""
    data, crcs, ident, here, there = _two_processes(tmp_path)
    store = here.acquire(ident)
    for p in (0, 2):
        store.write(p * PART, data[p * PART : (p + 1) * PART])
        store.commit(p, crcs[p])
    store.note_served(1, crcs[1])
    store.note_served(3, crcs[3])
    store.server_crc64 = crc64(data)
    assert store.crc_known and store.whole_crc_mismatch() is None and store.crc_checked
    other = there.acquire(ident)
    _record_part_1_damaged(other, data)
    if seen_by == "refresh":
        store.refresh()
    else:
        store.write(3 * PART, data[3 * PART :])
        store.commit(3, crcs[3])
    assert not store.crc_checked
    assert store.whole_crc_mismatch() is not None
    there.release(other)
    here.release(store)


def test_a_part_another_process_drops_and_records_anew_is_checked_again_here(
    tmp_path: Path,
) -> None:
    """The whole matched here, every part from this process's cache. Another process
    drops part 1 and records it anew with damaged bytes (and dies before checking
    them). Once this process sees that record, neither its pass nor its check of
    part 1 holds: the part is checked on its next read here, and the whole again."""
    data, crcs, ident, here, there = _two_processes(tmp_path)
    store = here.acquire(ident)
    for p in range(4):
        store.write(p * PART, data[p * PART : (p + 1) * PART])
        store.commit(p, crcs[p])
        store.verified.add(p)  # (as after this process's own fetch)
    store.server_crc64 = crc64(data)
    assert store.whole_crc_mismatch() is None and store.crc_checked
    other = there.acquire(ident)
    other.drop([1])
    _record_part_1_damaged(other, data)
    store.refresh()
    assert 1 not in store.verified and {0, 2, 3} <= store.verified
    assert not store.crc_checked
    assert store.whole_crc_mismatch() is not None
    there.release(other)
    here.release(store)


def test_a_part_another_process_records_anew_while_the_store_is_closed_here(
    tmp_path: Path,
) -> None:
    """As above, with the store closed here meanwhile: the whole-object check this
    process remembers for the store no longer holds when it opens it again."""
    data, crcs, ident, here, there = _two_processes(tmp_path)
    store = here.acquire(ident)
    for p in range(4):
        store.write(p * PART, data[p * PART : (p + 1) * PART])
        store.commit(p, crcs[p])
    store.server_crc64 = crc64(data)
    assert store.whole_crc_mismatch() is None and store.crc_checked
    here.release(store)
    again = here.acquire(ident)
    assert again.crc_checked  # remembered: nothing changed
    here.release(again)
    other = there.acquire(ident)
    other.drop([1])
    _record_part_1_damaged(other, data)
    there.release(other)
    again = here.acquire(ident)
    assert not again.crc_checked
    again.server_crc64 = crc64(data)
    assert again.whole_crc_mismatch() is not None
    here.release(again)


def _behind(
    client: MemoryClient, cache: CacheDir, budget: int, pressure: list[bool]
) -> tuple[Fetcher, MemoryBudget]:
    """A fetcher whose cache disk is behind while ``pressure[0]``."""
    memory = MemoryBudget(budget, pinned=cache.is_pinned, left_over=cache.left_over)
    fetcher = Fetcher(
        client, connections=4, budget=cache, memory=memory, pressure=lambda: pressure[0]
    )
    return fetcher, memory


def test_reads_while_the_disk_is_behind_come_from_memory_and_are_not_recorded(
    tmp_path: Path,
) -> None:
    client, cache, store, data = _memory_store(tmp_path, 6 * PART + 7)
    fetcher, memory = _behind(client, cache, 3 * PART, [True])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            with cache.pinned(store, [1]):
                await fetcher.wait_for(store, PART + 5, 2 * PART)
                view = memoryview(bytearray(PART - 5))
                assert store.read_into(PART + 5, view) == PART - 5
                assert bytes(view) == data[PART + 5 : 2 * PART]
            # Part 1 is still held (nobody read it); parts 2 and 3 fit beside it, 4 not.
            fetcher.read_ahead(store, 2 * PART, 3 * PART)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert store.parts == {}  # nothing recorded: the checkpoint holds parts on disk only
    assert memory.held <= 3 * PART
    assert store.memory is not None and store.memory.parts_in(KEPT) == {1, 2, 3}
    assert memory.fetched_bytes == 3 * PART
    assert client.bytes_sent["obj"] == 3 * PART
    got = memoryview(bytearray(3 * PART))
    assert store.read_into(PART, got) == 3 * PART and bytes(got) == data[PART : 4 * PART]
    cache.close()
    assert memory.held == 0


async def _until(done: Callable[[], bool]) -> None:
    """Wait for *done* (the whole-object check looks for damaged parts in a worker
    thread, which the mock clock does not wait for), at most 30 real seconds (a
    count of mock-clock sleeps ran out on a loaded machine)."""
    deadline = time.monotonic() + 30
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("not done")
        await trio.sleep(0.001)


async def _read_each_part(
    fetcher: Fetcher,
    cache: CacheDir,
    store: PartStore,
    data: bytes,
    pressure: list[bool],
    behind: Iterable[int] | None = None,
) -> None:
    """Read the store part by part as a mount's reader does (pinned, waiting for the
    bytes), checking each; the cache disk is behind (``pressure[0]``) while the parts
    *behind* are fetched, or all along when it is None."""
    for part in range(store.layout.count):
        pressure[0] = behind is None or part in behind
        first, end = store.layout.bounds(part)
        with cache.pinned(store, [part]):
            await fetcher.wait_for(store, first, end)
            view = memoryview(bytearray(end - first))
            assert store.read_into(first, view) == end - first
            assert bytes(view) == data[first:end], part


def test_a_memory_copy_a_record_took_over_is_not_read_once_that_record_is_dropped(
    tmp_path: Path,
) -> None:
    """Part 1 was read from memory (kept, its CRC counted as served). Another process
    then caches part 1: its record speaks for the part, and the served CRC no longer
    counts. When that record is dropped again (evicted there), the copy in memory must
    not come back into use: no CRC would cover it, and the whole-object check could
    not run until it was let go. The part is fetched again instead."""
    client, cache, store, data = _damaging_store(tmp_path, 3 * PART + 5, at=0, damaged=True)
    pressure = [False]
    fetcher, _memory = _behind(client, cache, 8 * PART, pressure)
    there = CacheDir(str(tmp_path / "c"), max_bytes=1 << 30, min_free_fraction=0.0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            await _read_each_part(fetcher, cache, store, data, pressure, behind={1})
            await trio.testing.wait_all_tasks_blocked()
            assert store.memory is not None and store.memory.is_kept(1)
            other = there.acquire(store.identity)
            first, end = store.layout.bounds(1)
            other.write(first, data[first:end])
            other.commit(1, crc64(data[first:end]))
            store.refresh()
            assert store.crc_known and 1 in store.parts
            other.drop([1])
            store.refresh()
            assert not store.has(1) and not store.crc_known
            there.release(other)
            sent = client.bytes_sent["obj"]
            with cache.pinned(store, [1]):
                await fetcher.wait_for(store, first, end)
            await trio.testing.wait_all_tasks_blocked()  # (recorded once the GET ends)
            assert client.bytes_sent["obj"] == sent + (end - first)
            assert store.crc_known
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    cache.close()


def _kept_parts_are_intact(store: PartStore, data: bytes) -> None:
    """Every part kept in memory holds the object's bytes. After a failed whole-object
    check no part kept then is; one kept now was fetched after it (the reads and
    their read-ahead go on), and the damage in these tests happens once."""
    assert store.memory is not None
    for p in store.memory.parts_in(KEPT):
        first, end = store.layout.bounds(p)
        got = memoryview(bytearray(end - first))
        assert store.read_into(first, got) == end - first
        assert bytes(got) == data[first:end], p


def test_parts_served_from_memory_count_in_the_whole_object_check(tmp_path: Path) -> None:
    """Parts fetched into memory while the disk is behind are never cached, but the
    CRC-64 of what arrived is kept: once every part's is known (from the index or from
    memory) the whole is compared with the service's. A byte damaged on the way in a
    part served from memory is found (every kept part let go, and no CRC of that read
    trusted again); read again, the object checks."""
    client, cache, store, data = _damaging_store(tmp_path, 5 * PART + 3, at=2 * PART + 9)
    fetcher, memory = _behind(client, cache, 8 * PART, [True])
    damaged_read: list[bytes] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            # The damaged byte reaches the reader (a ranged GET cannot be checked on
            # its own); the check of the whole, once part 5 is in, finds it.
            part = 2
            with cache.pinned(store, [part]):
                first, end = store.layout.bounds(part)
                await fetcher.wait_for(store, first, end)
                view = memoryview(bytearray(end - first))
                store.read_into(first, view)
                damaged_read.append(bytes(view))
            for p in (0, 1, 3, 4, 5):
                with cache.pinned(store, [p]):
                    await fetcher.wait_for(store, *store.layout.bounds(p))
            await _until(lambda: fetcher.crc_mismatches > 0)
            assert fetcher.crc_mismatches == 1
            assert not store.crc_checked
            _kept_parts_are_intact(store, data)
            # Read again (the disk still behind): every part from memory once more.
            await _read_each_part(fetcher, cache, store, data, [True])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert damaged_read[0] != data[2 * PART : 3 * PART]
    assert store.parts == {}  # nothing was cached
    assert fetcher.crc_mismatches == 1
    assert store.crc_checked
    assert client.bytes_sent["obj"] == 2 * len(data)
    cache.close()
    assert memory.held == 0


def test_a_check_passed_with_a_part_from_memory_holds_only_for_those_bytes(
    tmp_path: Path,
) -> None:
    """The whole matched with part 1's CRC taken from memory. Part 1 is released, then
    read again once the disk has caught up: fetched into the cache, damaged on the way
    this time. That record is not what was checked: the check must run again, and
    find it, not take the object for checked."""
    # The first fetch of part 1 (into memory) is whole.
    client, cache, store, data = _damaging_store(tmp_path, 3 * PART + 5, at=PART + 77, intact=1)
    pressure = [False]
    fetcher, _memory = _behind(client, cache, 8 * PART, pressure)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            await _read_each_part(fetcher, cache, store, data, pressure, behind={1})
            await trio.testing.wait_all_tasks_blocked()
            assert store.crc_checked and set(store.parts) == {0, 2, 3}
            assert store.memory is not None
            store.memory.release(1)
            pressure[0] = False
            with cache.pinned(store, [1]):
                await fetcher.wait_for(store, *store.layout.bounds(1))
            await _until(lambda: fetcher.crc_mismatches > 0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert client.damaged
    assert not store.crc_checked and fetcher.crc_mismatches == 1
    # All were dropped; the reader of part 1 may have fetched it again at once (the
    # check runs as the damaged fetch ends, before its reader looks): intact then.
    assert set(store.parts) <= {1}
    if store.parts:
        first, end = store.layout.bounds(1)
        assert store.read(first, end - first) == data[first:end]
    cache.close()


def test_a_part_a_reader_holds_when_the_check_fails_stays_readable_for_it_only(
    tmp_path: Path,
) -> None:
    """Every part from memory, one byte damaged on the way; part 4 completes the object
    while a reader holds part 3, which it has read. The check fails: part 3 stays
    readable for that reader (PARTIAL), the other kept parts are released, and
    read-ahead over part 3 fetches it again, whole, and keeps it for its next reader
    (what the first reader read was of the old bytes)."""
    client, cache, store, data = _damaging_store(tmp_path, 4 * PART + 9, at=PART + 1)
    fetcher, _memory = _behind(client, cache, 8 * PART, [True])
    first, end = store.layout.bounds(3)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            for p in (0, 1, 2):
                with cache.pinned(store, [p]):
                    await fetcher.wait_for(store, *store.layout.bounds(p))
            with cache.pinned(store, [3]):
                await fetcher.wait_for(store, first, end)
                assert store.memory is not None
                store.memory.note_read(3, end - first)
                with cache.pinned(store, [4]):
                    await fetcher.wait_for(store, *store.layout.bounds(4))
                await _until(lambda: fetcher.crc_mismatches > 0)
                memory = store.memory
                assert memory is not None
                # Part 4 was still held by its reader when the check ran, as it ended
                # the fetch: PARTIAL too. A part KEPT now was fetched after the check
                # (read-ahead goes on): intact.
                assert memory.state.get(3) == PARTIAL
                _kept_parts_are_intact(store, data)
                held = memoryview(bytearray(end - first))
                assert store.read_into(first, held) == end - first
                assert bytes(held) == data[first:end]  # (this part arrived whole)
            sent = client.bytes_sent["obj"]
            fetcher.read_ahead(store, first, end - first)
            await trio.testing.wait_all_tasks_blocked()
            assert memory.state.get(3) == KEPT
            assert client.bytes_sent["obj"] == sent + (end - first)
            with cache.pinned(store, [3]):
                await fetcher.wait_for(store, first, end)
                again = memoryview(bytearray(end - first))
                assert store.read_into(first, again) == end - first
                assert bytes(again) == data[first:end]
            assert client.bytes_sent["obj"] == sent + (end - first)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert fetcher.crc_mismatches == 1 and store.parts == {}
    cache.close()


@pytest.mark.parametrize(
    ("damaged_part", "memory_parts"), [(None, [1, 2, 4]), (3, [0, 2]), (0, [0, 1, 5])]
)
def test_the_whole_object_check_joins_parts_from_memory_and_from_the_cache(
    tmp_path: Path, damaged_part: int | None, memory_parts: list[int]
) -> None:
    """The disk is behind for some parts only: the check combines the CRCs of the
    parts served from memory with those the index records. With a byte damaged on the
    way (in a part cached, or in one served from memory), every cached part is dropped
    and the memory CRCs are forgotten."""
    client, cache, store, data = _damaging_store(
        tmp_path, 6 * PART + 1, at=(damaged_part or 0) * PART + 100, damaged=damaged_part is None
    )
    pressure = [False]
    fetcher, _memory = _behind(client, cache, 8 * PART, pressure)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            if damaged_part is None:
                await _read_each_part(fetcher, cache, store, data, pressure, memory_parts)
            else:
                for p in range(store.layout.count):
                    pressure[0] = p in memory_parts
                    with cache.pinned(store, [p]):
                        await fetcher.wait_for(store, *store.layout.bounds(p))
                await _until(lambda: fetcher.crc_mismatches > 0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    if damaged_part is None:
        assert set(store.parts) == set(range(store.layout.count)) - set(memory_parts)
        assert store.crc_checked and fetcher.crc_mismatches == 0
    else:
        assert client.damaged
        assert not store.crc_checked and fetcher.crc_mismatches == 1
        # Every part was dropped when the check failed; a part the reader went on to
        # read after that (read-ahead may have completed the store before the reader
        # reached its end) was fetched again, intact.
        assert len(store.parts) < store.layout.count
        for p in store.parts:
            first, end = store.layout.bounds(p)
            assert store.read(first, end - first) == data[first:end]
    cache.close()


def test_materialize_while_the_disk_is_behind_still_lands_every_part_in_the_cache(
    tmp_path: Path,
) -> None:
    """A part held in memory is not present: `ensure` (materialize) fetches it into
    the cache, rather than taking the memory copy for done (or looping forever)."""
    client, cache, store, data = _memory_store(tmp_path, 4 * PART + 3)
    pressure = [True]
    fetcher, memory = _behind(client, cache, 8 * PART, pressure)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            with cache.pinned(store, [0, 1]):
                await fetcher.wait_for(store, 0, 2 * PART)  # parts 0 and 1, into memory
            with trio.fail_after(30):
                await fetcher.ensure(store, 0)
                await fetcher.ensure_run(store, list(range(store.layout.count)))
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert store.complete
    assert store.check_crc()
    assert os.pread(store.fileno(), len(data), 0) == data
    cache.close()


def _failing_store(tmp_path: Path) -> tuple[MemoryClient, CacheDir, PartStore, bytes]:
    """A 4-part store whose every GET fails half way, in several chunks per part (so a
    reader waiting for the start of a part wakes before the failure)."""
    client, cache, store, data = _memory_store(tmp_path, 4 * PART)
    client.bandwidth = 64 * PART
    client.fail_every = 1
    return client, cache, store, data


async def _read_the_start_then_the_fetch_fails(fetcher: Fetcher, store: PartStore) -> None:
    """Wait (part 0 pinned by the caller) for its first bytes, then let its fetch go
    on and fail half way."""
    await fetcher.wait_for(store, 0, PART // 8)
    await trio.sleep(1)


def test_what_a_failed_fetch_into_memory_left_stays_readable_for_its_reader(
    tmp_path: Path,
) -> None:
    """A reader waits only for its own bytes; if the fetch of the rest of the part then
    fails, the bytes that arrived must stay readable while the reader holds the part
    (as the cache file's do), and the next fetch of the part takes them over."""
    client, cache, store, data = _failing_store(tmp_path)
    fetcher, memory = _behind(client, cache, 8 * PART, [True])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            with cache.pinned(store, [0]):
                await _read_the_start_then_the_fetch_fails(fetcher, store)
                assert store.memory is not None and store.memory.state.get(0) == PARTIAL
                view = memoryview(bytearray(PART // 8))
                assert store.read_into(0, view) == PART // 8
                assert bytes(view) == data[: PART // 8]
                client.fail_every = 0
                await fetcher.wait_for(store, 0, PART)
                whole = memoryview(bytearray(PART))
                assert store.read_into(0, whole) == PART and bytes(whole) == data[:PART]
            assert memory.held == PART
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    cache.close()
    assert memory.held == 0


def test_what_a_failed_fetch_left_for_its_reader_is_punched_once_it_lets_go(
    tmp_path: Path,
) -> None:
    """The cache-file counterpart: the bytes stay while the reader holds the part, and
    are punched out (and no longer counted) once it lets go."""
    client, cache, store, data = _failing_store(tmp_path)
    fetcher = Fetcher(client, connections=4, budget=cache)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            with cache.pinned(store, [0]):
                await _read_the_start_then_the_fetch_fails(fetcher, store)
                assert store.read(0, PART // 8) == data[: PART // 8]
                assert os.fstat(store.fileno()).st_blocks * 512 >= PART // 2
            assert os.fstat(store.fileno()).st_blocks * 512 == 0
            assert cache.used_bytes == 0
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    cache.close()


def test_a_part_a_failed_fetch_left_in_the_cache_for_its_reader_is_fetched_there_again(
    tmp_path: Path,
) -> None:
    """The disk fell behind meanwhile, but the reader may still be reading the cache
    file's bytes of the part: the next fetch must not move the part to memory (where
    its bytes are not there yet)."""
    client, cache, store, data = _failing_store(tmp_path)
    pressure = [False]
    fetcher, memory = _behind(client, cache, 8 * PART, pressure)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            with cache.pinned(store, [0]):
                await _read_the_start_then_the_fetch_fails(fetcher, store)  # cache file
                pressure[0] = True
                client.fail_every = 0
                fetcher.start(store, 0)  # another reader wants the part now
                view = memoryview(bytearray(PART // 8))
                assert store.read_into(0, view) == PART // 8
                assert bytes(view) == data[: PART // 8]
                await fetcher.wait_for(store, 0, PART)
            # wait_for returns once the bytes are written; the part is recorded after.
            await trio.sleep(1)
            assert store.is_present(0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert memory.fetched_bytes == 0
    cache.close()


async def _the_fetch_fails_and_another_process_takes_the_part(
    fetcher: Fetcher, store: PartStore, other: int, data: bytes
) -> None:
    """(Part 0 pinned by the caller.) A read of part 0 meets a fetch that fails half
    way; then another process (its open file *other*) claims the part and writes it."""
    await _read_the_start_then_the_fetch_fails(fetcher, store)
    assert _ofd_lock(other, 0, PART, fcntl.F_WRLCK)
    os.pwrite(other, data[:PART], 0)


def test_a_failed_fetch_s_leftovers_are_not_punched_while_another_process_claims_the_part(
    tmp_path: Path,
) -> None:
    client, cache, store, data = _failing_store(tmp_path)
    fetcher = Fetcher(client, connections=4, budget=cache)
    other = os.open(store.data_path, os.O_RDWR)  # another process's open file

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            with cache.pinned(store, [0]):
                await _the_fetch_fails_and_another_process_takes_the_part(
                    fetcher, store, other, data
                )
            assert os.pread(store.fileno(), PART, 0) == data[:PART]
            assert cache.used_bytes == 0  # (its bytes: the other process counts them)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        os.close(other)
    cache.close()


def test_a_refetch_that_wrote_nothing_leaves_the_bytes_of_the_process_that_claims_the_part(
    tmp_path: Path,
) -> None:
    """A failed fetch left bytes for its reader; the next fetch of the part waits for
    another process's claim, the reader lets go meanwhile, and the fetch ends (the
    mount closes) having written nothing. What the first fetch left is now the other
    process's bytes: ending must not punch them."""
    client, cache, store, data = _failing_store(tmp_path)
    fetcher = Fetcher(client, connections=4, budget=cache)
    other = os.open(store.data_path, os.O_RDWR)  # another process's open file

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            with cache.pinned(store, [0]):
                await _the_fetch_fails_and_another_process_takes_the_part(
                    fetcher, store, other, data
                )
                client.fail_every = 0
                assert fetcher.start(store, 0) is not None  # waits for the claim
                await trio.sleep(1)
            await trio.sleep(1)  # the reader has let go; the fetch still waits
            assert os.pread(store.fileno(), PART, 0) == data[:PART]
            nursery.cancel_scope.cancel()  # the fetch ends, having written nothing

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        os.close(other)
    assert os.pread(store.fileno(), PART, 0) == data[:PART]
    assert client.gets == 1  # (the refetch never started its GET)
    cache.close()
