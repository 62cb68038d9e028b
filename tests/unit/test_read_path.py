"""The mount's read path without a kernel: `Operations.read` over an in-memory object
client, with random cache caps, part sizes, read-ahead windows, connection counts and
read patterns, one reader or several at once, with the cache disk keeping up or
behind (parts fetched into memory under a memory budget, or both in turn). Every byte
is compared with the source, and the bytes the client sent, the cache's size on disk
and the memory held are checked against their bounds (docs/cache-format.md,
"Eviction"; ossfs/cache/memory.py).

trio's autojump clock makes the client's latency free; disk work is real (a cache
directory under tmp_path).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ossfs.cache.cachedir import CacheDir
from ossfs.cache.memory import MemoryBudget
from ossfs.cache.store import PartStore
from ossfs.cache.upkeep import evict_ahead
from ossfs.fetcher import Fetcher
from ossfs.fs import FsOptions, Operations
from ossfs.namespace import Namespace
from ossfs.reader import FAILURE_MEMORY
from ossfs.testing.memory import MemoryClient
from tests.helpers import disk_bytes
from tests.unit.test_cachedir import closed_stores

BUCKET = "bkt"
KiB = 1 << 10
MiB = 1 << 20

Read = tuple[int, int]


@dataclass(frozen=True)
class Reader:
    reads: list[Read]
    depth: int  # reads in flight at once on the handle (the kernel sends several)
    sequential: bool


@dataclass(frozen=True)
class Scenario:
    size: int
    part_size: int
    cap: int
    read_ahead_parts: int
    connections: int
    readers: list[Reader]
    together: bool  # readers run at the same time, or one after another
    closed: int = 0  # objects of 2 parts cached before (closed stores, oldest first)
    evictor: bool = False  # closed stores are evicted in a worker thread (as a mount does)
    bandwidth: int = 200 * MiB  # per GET
    # The cache disk is behind: "off" never, "on" always, "flip" now and then (the
    # parts of reads go to memory then, under memory_budget).
    pressure: str = "off"
    memory_budget: int = 64 * MiB
    fail_every: int = 0  # every n-th GET fails half way; a failed read is tried again


def sequential_reads(size: int, start: int, chunk: int) -> list[Read]:
    return [(off, min(chunk, size - off)) for off in range(start, size, chunk)]


def run_scenario(sc: Scenario, root: Path, seed: int) -> MemoryClient:
    """Run the readers of *sc*; assert bytes and bounds; return the client (counters)."""
    data = random.Random(seed).randbytes(sc.size)
    client = MemoryClient(latency=0.003, bandwidth=sc.bandwidth, fail_every=sc.fail_every)
    client.put(BUCKET, "obj", data)
    if sc.closed:
        closed_stores(root, sc.closed, sc.part_size)
    cache = CacheDir(str(root), max_bytes=sc.cap, min_free_fraction=0.0)
    memory = MemoryBudget(sc.memory_budget, pinned=cache.is_pinned, left_over=cache.left_over)
    flips = random.Random(seed)
    retry_rng = random.Random(seed + 1)
    behind = {
        "off": lambda: False,
        "on": lambda: True,
        "flip": lambda: flips.random() < 0.5,
    }[sc.pressure]
    fetcher = Fetcher(
        client,
        connections=sc.connections,
        budget=cache,
        read_ahead=sc.read_ahead_parts * sc.part_size,
        memory=memory,
        pressure=behind,
    )
    ns = Namespace(client, BUCKET, "", ttl=60.0, negative_ttl=5.0, scheme="oss")
    ops = Operations(
        ns,
        fetcher,
        cache,
        FsOptions(uid=0, gid=0, part_size=sc.part_size),
        describe=dict,
        status=dict,
    )
    # Pinned and in-flight parts may take the cache over its cap: at most the parts
    # of the reads in progress, the part each stream is in, and one per connection.
    depth = sum(r.depth for r in sc.readers) if sc.together else max(r.depth for r in sc.readers)
    span = max(size // sc.part_size + 2 for r in sc.readers for _, size in r.reads)
    bound = sc.cap + (sc.connections + len(sc.readers) + depth * span) * sc.part_size
    if sc.evictor:
        bound += sc.cap // 20  # a reader's part may take this slack while the evictor works
    if sc.closed:
        bound = max(bound, disk_bytes(root, name="data"))  # it may start over the cap
    before = disk_bytes(root, name="data")
    # Read-ahead fits in the memory budget; a reader's own parts are fetched anyway,
    # and parts readers hold (reads in progress, each stream's part) are not released.
    memory_bound = sc.memory_budget + (len(sc.readers) + depth * span) * sc.part_size
    worst = 0

    async def read_one(fh: int, off: int, size: int) -> None:
        nonlocal worst
        for attempt in itertools.count():
            try:
                got = bytes(await ops.read(fh, off, size))  # copied before any other task runs
                break
            except pyfuse3.FUSEError:
                if not sc.fail_every or attempt > 20:
                    raise
                if attempt >= 10:
                    # A read that needs many GETs through a cache too small to keep
                    # them meets a failing one every time: the network recovers.
                    client.fail_every = 0
                # As the kernel, or the user, would. (Not all at once: readers that try
                # again in step could meet the failing GET every time.)
                await trio.sleep(FAILURE_MEMORY + 1 + retry_rng.random())
        want = data[off : off + size]
        if got != want:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            raise AssertionError(
                f"read({off}, {size}): wrong bytes from offset {off + first} (got {len(got)} bytes)"
            )
        worst = max(worst, disk_bytes(root, name="data"))

    async def reader(ino: int, r: Reader) -> None:
        info = await ops.open(ino, os.O_RDONLY, None)  # type: ignore[arg-type]
        try:
            send, receive = trio.open_memory_channel[Read](0)

            async def worker() -> None:
                async for off, size in receive:
                    await read_one(info.fh, off, size)

            async with trio.open_nursery() as inner:
                for _ in range(r.depth):
                    inner.start_soon(worker)
                async with send:
                    for read in r.reads:
                        await send.send(read)
        finally:
            await ops.release(info.fh)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            if sc.evictor:
                await nursery.start(evict_ahead, cache)
            attrs = await ops.lookup(pyfuse3.ROOT_INODE, b"obj")
            if sc.together:
                async with trio.open_nursery() as readers:
                    for r in sc.readers:
                        readers.start_soon(reader, attrs.st_ino, r)
            else:
                for r in sc.readers:
                    await reader(attrs.st_ino, r)
            if sc.evictor:
                # The evictor's last pass, if the cache is over its cap (real time: it
                # works in a thread).
                deadline = time.monotonic() + 30
                while cache.used_bytes > max(sc.cap, sc.part_size) and time.monotonic() < deadline:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()  # read-ahead nobody waits for

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        # At rest (every reader done) the cap holds again; a cap smaller than one
        # part holds that part.
        rest = disk_bytes(root, name="data")
        limit = max(sc.cap, sc.part_size) + 8192
        if fetcher.parts_fetched == 0:
            limit = max(limit, before)  # nothing was written, so nothing had to be evicted
        assert rest <= limit, f"{rest} bytes cached at rest, cap {sc.cap}"
    finally:
        cache.close()
    assert worst <= bound, f"cache took {worst} bytes on disk, bound {bound}"
    assert memory.peak <= memory_bound, f"{memory.peak} bytes in memory, bound {memory_bound}"
    assert memory.held == 0, f"{memory.held} bytes still held in memory after the stores closed"
    if sc.pressure == "on" and sc.size > sc.part_size:
        # Every read went to memory: nothing new was written into the cache.
        assert worst <= before, f"{worst} bytes cached while the disk was behind ({before} before)"
    return client


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    part_size = draw(st.sampled_from([64 * KiB, 128 * KiB, 256 * KiB, 1 * MiB]))
    size = draw(st.integers(1, 24)) * part_size + draw(st.integers(0, part_size - 1))
    cap = (
        draw(
            st.sampled_from(
                [
                    part_size // 2,
                    part_size,
                    2 * part_size,
                    3 * part_size,
                    size // 4,
                    size // 2,
                    2 * size,
                ]
            )
        )
        or 1
    )
    readers = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["sequential", "random", "backward", "skips"]))
        chunk = draw(st.sampled_from([4 * KiB, 128 * KiB, 1 * MiB]))
        start = draw(st.integers(0, size - 1))
        if kind == "sequential":
            reads = sequential_reads(size, start, chunk)
        elif kind == "backward":
            reads = sequential_reads(size, start, chunk)[::-1]
        else:
            rng = random.Random(draw(st.integers(0, 1 << 30)))
            reads = []
            off = start
            for _ in range(draw(st.integers(1, 40))):
                if kind == "random" or rng.random() < 0.2:
                    off = rng.randrange(size)
                reads.append((off, rng.randint(1, 2 * chunk)))
                off = (off + reads[-1][1]) % size
        readers.append(Reader(reads, draw(st.integers(1, 3)), kind == "sequential"))
    return Scenario(
        size=size,
        part_size=part_size,
        cap=cap,
        read_ahead_parts=draw(st.integers(1, 16)),
        connections=draw(st.integers(1, 8)),
        readers=readers,
        together=draw(st.booleans()),
        closed=draw(st.sampled_from([0, 0, 2, 8])),
        evictor=draw(st.booleans()),
        pressure=draw(st.sampled_from(["off", "off", "on", "flip"])),
        memory_budget=draw(st.sampled_from([part_size, 4 * part_size, size // 2 + 1, 64 * MiB])),
        fail_every=draw(st.sampled_from([0, 0, 0, 3, 7])),
    )


@pytest.fixture
def scratch() -> Iterator[Path]:
    # hypothesis runs many examples per test: one fresh directory each, made here.
    path = Path(tempfile.mkdtemp(prefix="ossfs-readpath-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_RUNS = itertools.count()
EXAMPLES = int(os.environ.get("OSSFS_READPATH_EXAMPLES", "150"))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(sc=scenarios(), seed=st.integers(0, 1000))
@pytest.mark.slow
def test_every_byte_is_the_objects_under_any_cap(sc: Scenario, seed: int, scratch: Path) -> None:
    root = scratch / f"cache-{next(_RUNS)}"
    client = run_scenario(sc, root, seed)
    if (
        len(sc.readers) == 1
        and sc.readers[0].sequential
        and sc.readers[0].depth == 1
        and sc.cap >= sc.part_size
        and not sc.fail_every
    ):
        # One stream through an object larger than the cache fetches it about once.
        # (Not through a cache smaller than one part: that may fetch a part twice.)
        read = sc.size - sc.readers[0].reads[0][0]
        assert client.bytes_sent["obj"] <= 1.25 * read + sc.part_size, (
            f"fetched {client.bytes_sent['obj']} bytes to read {read}"
        )
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("part_size", [64 * KiB, 1 * MiB])
@pytest.mark.parametrize("cap_parts", [0.5, 1, 2, 5])
def test_one_stream_through_a_small_cache_fetches_the_object_once(
    tmp_path: Path, part_size: int, cap_parts: float
) -> None:
    """The shape of the reported failure: read-ahead larger than the cache."""
    size = 40 * part_size + 123
    sc = Scenario(
        size=size,
        part_size=part_size,
        cap=int(cap_parts * part_size),
        read_ahead_parts=16,
        connections=8,
        readers=[Reader(sequential_reads(size, 0, 128 * KiB), 2, True)],
        together=False,
    )
    client = run_scenario(sc, tmp_path / "cache", seed=7)
    assert client.bytes_sent["obj"] <= 1.25 * size


def test_a_stream_on_slow_connections_fills_them(tmp_path: Path) -> None:
    """Connections of 25 MB/s each (a WAN, a per-connection cap): a stream's window is
    cut into as many GETs as read-ahead may have connections (14 of 16), so that the
    link is filled, and the object is still fetched once."""
    part = 256 * KiB
    size = 160 * part
    sc = Scenario(
        size=size,
        part_size=part,
        cap=1 << 30,
        read_ahead_parts=64,
        connections=16,
        readers=[Reader(sequential_reads(size, 0, 1 << 20), 2, True)],
        together=False,
        bandwidth=25_000_000,
    )
    client = run_scenario(sc, tmp_path / "cache", seed=11)
    assert client.max_in_flight >= 14, client.max_in_flight
    assert client.bytes_sent["obj"] == size


def test_concurrent_streams_share_a_small_cache(tmp_path: Path) -> None:
    size = 30 * 256 * KiB + 5
    streams = [
        Reader(sequential_reads(size, start, 128 * KiB), 2, True)
        for start in (0, 0, size // 3, size // 2)
    ]
    sc = Scenario(
        size=size,
        part_size=256 * KiB,
        cap=3 * 256 * KiB,
        read_ahead_parts=16,
        connections=6,
        readers=streams,
        together=True,
    )
    run_scenario(sc, tmp_path / "cache", seed=3)


def _ops(client: MemoryClient, root: Path) -> tuple[Operations, Fetcher]:
    cache = CacheDir(str(root), max_bytes=1 << 30, min_free_fraction=0.0)
    fetcher = Fetcher(client, connections=4, budget=cache, read_ahead=128 * KiB)
    ns = Namespace(client, BUCKET, "", ttl=0.0, negative_ttl=0.0, scheme="oss")
    ops = Operations(
        ns, fetcher, cache, FsOptions(uid=0, gid=0, part_size=64 * KiB), describe=dict, status=dict
    )
    return ops, fetcher


def test_a_failed_part_fails_again_at_once_for_a_while(tmp_path: Path) -> None:
    """The kernel repeats a failed read; the repeat must not run another retry cycle."""
    client = MemoryClient(latency=1.0)
    client.put(BUCKET, "obj", os.urandom(256 * KiB))
    ops, fetcher = _ops(client, tmp_path / "c")
    slow = 30.0  # a failure takes a whole retry cycle to arrive

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            attrs = await ops.lookup(pyfuse3.ROOT_INODE, b"obj")
            info = await ops.open(attrs.st_ino, os.O_RDONLY, None)  # type: ignore[arg-type]
            client.fail_every = 1
            client.latency = slow
            with pytest.raises(pyfuse3.FUSEError):
                await ops.read(info.fh, 0, 4096)
            tried = client.gets  # the part, and maybe one read ahead
            for _ in range(3):
                with pytest.raises(pyfuse3.FUSEError):
                    await ops.read(info.fh, 0, 4096)
            assert client.gets == tried  # remembered: no new retry cycle
            client.fail_every = 0
            # A new open (a user trying again) is not held to it.
            again = await ops.open(attrs.st_ino, os.O_RDONLY, None)  # type: ignore[arg-type]
            assert len(bytes(await ops.read(again.fh, 0, 4096))) == 4096
            assert client.gets > tried
            await ops.release(again.fh)
            # Nor is the same open once the memory has passed.
            await trio.sleep(11)
            assert len(bytes(await ops.read(info.fh, 0, 4096))) == 4096
            await ops.release(info.fh)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_parts_an_earlier_run_cached_are_checked_once_and_a_damaged_one_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second mount of the same cache (the bytes in the page cache, as after a
    restart) checks each part against its CRC before serving it, once, inline
    (`Reader.checked_answer`); a part whose bytes changed on disk goes to the worker
    thread's check, which drops it, and is fetched again, only that one."""
    part = 64 * KiB
    data = os.urandom(8 * part - 1000)  # (a shorter last part)
    client = MemoryClient()
    client.put(BUCKET, "obj", data)
    root = tmp_path / "c"
    root.mkdir()
    probe = os.open(root, os.O_RDWR | os.O_TMPFILE)
    try:
        os.write(probe, b"x")
        os.preadv(probe, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError as e:
        pytest.skip(f"this file system cannot read with RWF_NOWAIT: {e}")
    finally:
        os.close(probe)
    in_thread: list[int] = []  # parts checked by the worker thread's check
    verify = PartStore.verify

    def spy(store: PartStore, p: int) -> bool:
        in_thread.append(p)
        return verify(store, p)

    monkeypatch.setattr(PartStore, "verify", spy)

    async def read_all(ops: Operations, fetcher: Fetcher, reads: list[Read]) -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            attrs = await ops.lookup(pyfuse3.ROOT_INODE, b"obj")
            info = await ops.open(attrs.st_ino, os.O_RDONLY, None)  # type: ignore[arg-type]
            for off, size in reads:
                got = bytes(await ops.read(info.fh, off, size))
                assert got == data[off : off + size], (off, size)
            await ops.release(info.fh)
            await trio.sleep(1)  # the last parts are recorded after their bytes are read
            nursery.cancel_scope.cancel()

    def run(reads: list[Read]) -> Operations:
        in_thread.clear()
        for path in root.rglob("data"):
            path.read_bytes()  # in the page cache (the first run let the kernel drop it)
        ops, fetcher = _ops(client, root)
        try:
            clock = trio.testing.MockClock(autojump_threshold=0)
            trio.run(read_all, ops, fetcher, reads, clock=clock)
            return ops
        finally:
            ops.cache.close()

    def sent() -> int:
        return sum(client.bytes_sent.values())

    run(sequential_reads(len(data), 0, part))
    assert sent() == len(data)
    [path] = [p for p in root.rglob("data")]
    with open(path, "r+b") as f:  # one byte of part 5 changes on disk
        f.seek(5 * part + 1000)
        f.write(bytes([data[5 * part + 1000] ^ 0xFF]))
    assert run(sequential_reads(len(data), 0, part)).reader.verifications == 8
    assert in_thread == [5]  # the others inline
    assert sent() == len(data) + part  # part 5, once
    # Each part's first read from its middle (the last part's too), or across two
    # parts; then the rest. The repaired part is good.
    reads = [(p * part + 10 * KiB, 20 * KiB) for p in (7, 0, 3)] + [(part - 8, 16)]
    assert run(reads + sequential_reads(len(data), 0, 24 * KiB)).reader.verifications == 8
    assert in_thread == []
    assert sent() == len(data) + part


def test_an_open_of_a_changed_object_gets_a_new_inode(tmp_path: Path) -> None:
    client = MemoryClient()
    old, new = os.urandom(200 * KiB), os.urandom(200 * KiB)
    client.put(BUCKET, "obj", old)
    ops, fetcher = _ops(client, tmp_path / "c")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            first = await ops.lookup(pyfuse3.ROOT_INODE, b"obj")
            h1 = await ops.open(first.st_ino, os.O_RDONLY, None)  # type: ignore[arg-type]
            assert bytes(await ops.read(h1.fh, 0, 64 * KiB)) == old[: 64 * KiB]
            client.replace(BUCKET, "obj", new)
            # The kernel still holds the old inode: opening it again says ESTALE, and
            # the lookup the kernel then makes finds the new version's inode.
            with pytest.raises(pyfuse3.FUSEError) as e:
                await ops.open(first.st_ino, os.O_RDONLY, None)  # type: ignore[arg-type]
            assert e.value.errno == errno.ESTALE
            second = await ops.lookup(pyfuse3.ROOT_INODE, b"obj")
            assert second.st_ino != first.st_ino
            h2 = await ops.open(second.st_ino, os.O_RDONLY, None)  # type: ignore[arg-type]
            assert bytes(await ops.read(h2.fh, 0, len(new))) == new
            # The old open keeps its version: what it cached, or EIO, never new bytes.
            assert bytes(await ops.read(h1.fh, 0, 64 * KiB)) == old[: 64 * KiB]
            with pytest.raises(pyfuse3.FUSEError):
                await ops.read(h1.fh, 150 * KiB, 4096)
            for h in (h1, h2):
                await ops.release(h.fh)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_stream_lets_the_kernel_drop_the_cache_pages_it_has_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts fetched ahead for a stream and read through are given to the kernel to drop
    from its page cache (in a worker thread): the reader's own pages hold them, and
    keeping both made long sequential reads slow. Random reads drop nothing."""
    dropped: list[int] = []
    in_loop: list[bool] = []

    def drop_pages(self: object, parts: list[int]) -> None:
        in_loop.append(threading.current_thread() is threading.main_thread())
        dropped.extend(parts)

    monkeypatch.setattr("ossfs.cache.store.PartStore.drop_pages", drop_pages)
    client = MemoryClient(latency=0.001)
    data = random.Random(9).randbytes(64 * 64 * KiB)
    client.put(BUCKET, "obj", data)
    ops, fetcher = _ops(client, tmp_path / "c")
    # More than a stream's skip (1 MiB) apart: three reads, not one stream.
    randoms = (5 * 64 * KiB + 7, 40 * 64 * KiB + 3, 22 * 64 * KiB)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            attrs = await ops.lookup(pyfuse3.ROOT_INODE, b"obj")
            info = await ops.open(attrs.st_ino, os.O_RDONLY, None)  # type: ignore[arg-type]
            for off in randoms:
                assert bytes(await ops.read(info.fh, off, 4096)) == data[off : off + 4096]
            await trio.sleep(1)
            assert dropped == []
            for off, size in sequential_reads(len(data), 0, 32 * KiB):
                got = bytes(await ops.read(info.fh, off, size))
                assert got == data[off : off + size]
            await trio.sleep(1)
            await ops.release(info.fh)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # Parts fetched ahead of the stream and read through, each once; never the parts
    # the random reads fetched (the stream found them cached).
    assert len(dropped) == len(set(dropped)) >= 8, dropped
    assert not set(dropped) & {5, 40, 22}
    assert in_loop and not any(in_loop)


def test_a_stream_served_from_memory_as_it_arrives_lets_each_part_go(tmp_path: Path) -> None:
    """The disk is behind: a reader that keeps up with its read-ahead reads each part
    while it is still arriving. Every part is fetched once, and let go once read, so
    the memory held stays small and read-ahead is never starved."""
    part = 256 * KiB
    data = os.urandom(24 * part)
    client = MemoryClient(latency=0.003, bandwidth=20 * MiB)
    client.put(BUCKET, "obj", data)
    cache = CacheDir(str(tmp_path / "c"), max_bytes=1 << 30, min_free_fraction=0.0)
    memory = MemoryBudget(6 * part, pinned=cache.is_pinned, left_over=cache.left_over)
    fetcher = Fetcher(
        client,
        connections=4,
        budget=cache,
        read_ahead=4 * part,
        memory=memory,
        pressure=lambda: True,
    )
    ns = Namespace(client, BUCKET, "", ttl=60.0, negative_ttl=5.0, scheme="oss")
    ops = Operations(
        ns, fetcher, cache, FsOptions(uid=0, gid=0, part_size=part), describe=dict, status=dict
    )
    held_at_end = -1

    async def main() -> None:
        nonlocal held_at_end
        async with trio.open_nursery() as nursery:
            fetcher.attach(nursery)
            attrs = await ops.lookup(pyfuse3.ROOT_INODE, b"obj")
            info = await ops.open(attrs.st_ino, os.O_RDONLY, None)  # type: ignore[arg-type]
            for off in range(0, len(data), 64 * KiB):
                got = bytes(await ops.read(info.fh, off, 64 * KiB))
                assert got == data[off : off + 64 * KiB], off
            await trio.testing.wait_all_tasks_blocked()  # the last GET has ended
            held_at_end = memory.held
            await ops.release(info.fh)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    cache.close()
    assert client.bytes_sent["obj"] == len(data)
    assert memory.fetched_bytes == len(data)
    assert held_at_end <= part, f"{held_at_end} bytes still held after reading it all"
    assert memory.held == 0
