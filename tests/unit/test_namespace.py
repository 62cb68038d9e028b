"""Listings as directories: naming rules, collisions across pages, lazy paging, lookups."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from ossfs.client import HttpObjectClient
from ossfs.crc import crc64
from ossfs.errors import ListingError, NotFoundError, ObjectChangedError
from ossfs.namespace import ROOT_INODE, Namespace
from ossfs.testing import OssTestServer

BUCKET = "names"


@pytest.fixture
def server() -> Iterator[OssTestServer]:
    with OssTestServer(credentials={"ak": "sk"}) as srv:
        yield srv


def _client(server: OssTestServer) -> HttpObjectClient:
    return HttpObjectClient(server.endpoint())


async def _all_names(ns: Namespace, inode: int) -> list[tuple[str, bool]]:
    reader = ns.open_dir(inode)
    pos = 0
    out = []
    while True:
        await ns.fill(reader, pos)
        if pos >= len(reader.entries):
            return out
        for i, entry in ns.iter_entries(reader, pos):
            out.append((entry.name, entry.is_dir))
            pos = i + 1


async def test_directory_wins_even_when_pages_split_the_pair(server: OssTestServer) -> None:
    # "x" and "x/..." with names sorting between them ("x-1", "x.txt"), split over pages
    # of 2 keys so the file and the prefix arrive in different pages.
    for key in ["x", "x-1", "x.txt", "x/inner", "y"]:
        server.put(BUCKET, key, b"1")
    async with _client(server) as client:
        ns = Namespace(client, BUCKET, "")
        reader = ns.open_dir(ROOT_INODE)
        original = client.list_page

        async def small_pages(*args: object, **kwargs: object) -> object:
            kwargs["max_keys"] = 2
            return await original(*args, **kwargs)  # type: ignore[arg-type]

        client.list_page = small_pages  # type: ignore[method-assign]
        pos = 0
        names = []
        while True:
            await ns.fill(reader, pos)
            if pos >= len(reader.entries):
                break
            names += [(e.name, e.is_dir) for _, e in ns.iter_entries(reader, pos)]
            pos = len(reader.entries)
        # readdir order carries no meaning; each name once, the directory shadowing the file.
        assert len(names) == len(set(names))
        assert sorted(names) == [("x", True), ("x-1", False), ("x.txt", False), ("y", False)]
        node = await ns.lookup(ROOT_INODE, "x")
        assert node.is_dir


async def test_invalid_names_are_skipped(server: OssTestServer) -> None:
    for key in [
        "ok.txt",
        "a//b",
        "dot/./c",
        "dots/../d",
        "long/" + "n" * 256,
        "fine/" + "n" * 255,
        "dir/",
        "dir/file",
    ]:
        server.put(BUCKET, key, b"1")
    async with _client(server) as client:
        ns = Namespace(client, BUCKET, "")
        root = await _all_names(ns, ROOT_INODE)
        assert ("ok.txt", False) in root and ("dir", True) in root
        for name in ("a", "dot", "dots", "long", "fine"):
            node = await ns.lookup(ROOT_INODE, name)
            names = await _all_names(ns, node.inode)
            assert names == ([("n" * 255, False)] if name == "fine" else []), name
        dir_node = await ns.lookup(ROOT_INODE, "dir")
        assert await _all_names(ns, dir_node.inode) == [("file", False)]  # marker not listed
        with pytest.raises(NotFoundError):
            await ns.lookup(ROOT_INODE, "..x")


async def test_paging_is_lazy_and_lookups_use_the_listing(server: OssTestServer) -> None:
    for i in range(2500):
        server.put(BUCKET, f"big/f{i:05d}", b"x")
    async with _client(server) as client:
        ns = Namespace(client, BUCKET, "")
        big = await ns.lookup(ROOT_INODE, "big")
        server.reset_stats()
        reader = ns.open_dir(big.inode)
        await ns.fill(reader, 0)
        # The page's last file waits until no same-named prefix can follow it.
        assert len(reader.entries) == 999 and server.stats.count(op="list") == 1
        await ns.fill(reader, 2400)
        assert reader.done and len(reader.entries) == 2500
        assert server.stats.count(op="list") == 3
        node = await ns.lookup(big.inode, "f02499")
        assert node.meta is not None and node.meta.size == 1
        with pytest.raises(NotFoundError):
            await ns.lookup(big.inode, "nope")
        assert server.stats.count() == 3  # both answered from the complete listing
        again = ns.open_dir(big.inode)
        assert again.done and len(again.entries) == 2500


async def test_prefix_mount_and_probe_lookups(server: OssTestServer) -> None:
    server.put(BUCKET, "top/sub/a.txt", b"abc")
    server.put(BUCKET, "top/b.txt", b"b")
    server.put(BUCKET, "topless", b"c")
    async with _client(server) as client:
        ns = Namespace(client, BUCKET, "top", negative_ttl=60)
        assert sorted(await _all_names(ns, ROOT_INODE)) == [("b.txt", False), ("sub", True)]
        ns2 = Namespace(client, BUCKET, "top")
        sub = await ns2.lookup(ROOT_INODE, "sub")  # no listing yet: a probe
        assert sub.is_dir and sub.path == "sub"
        a = await ns2.lookup(sub.inode, "a.txt")
        assert a.meta is not None and a.meta.size == 3 and ns2.key_of(a.path) == "top/sub/a.txt"
        server.reset_stats()
        with pytest.raises(NotFoundError):
            await ns.lookup(ROOT_INODE, "missing")
        with pytest.raises(NotFoundError):
            await ns.lookup(ROOT_INODE, "missing")
        assert server.stats.count() == 0  # the root listing is complete: no probe needed
        # The kernel forgets: a node goes once all its lookups are returned, not before.
        sub.lookups = 2
        ns2.forget(sub.inode, 1)
        assert ns2.node(sub.inode) is sub
        ns2.forget(sub.inode, 1)
        with pytest.raises(NotFoundError):
            ns2.node(sub.inode)
        assert ns2.node(ROOT_INODE).is_dir  # the root is never forgotten
        ns2.forget(ROOT_INODE, 5)
        assert ns2.node(ROOT_INODE).is_dir


async def test_one_listing_per_directory_shared_by_concurrent_lookups(
    server: OssTestServer,
) -> None:
    # 1,200 names looked up at once in 20 directories nothing has listed yet: one LIST per
    # directory (and one of the root), no HEAD. (It was a LIST and a HEAD per name.)
    for d in range(20):
        for f in range(60):
            server.put(BUCKET, f"d{d:02d}/f{f:03d}", b"x" * (f + 1))
    async with _client(server) as client:
        ns = Namespace(client, BUCKET, "")
        server.reset_stats()
        found: dict[str, int] = {}
        missing: list[str] = []

        async def look(d: int, f: int) -> None:
            parent = await ns.lookup(ROOT_INODE, f"d{d:02d}")
            try:
                node = await ns.lookup(parent.inode, f"f{f:03d}")
            except NotFoundError:
                missing.append(f"d{d:02d}/f{f:03d}")
                return
            assert node.meta is not None
            found[node.path] = node.meta.size

        async with trio.open_nursery() as nursery:
            for d in range(20):
                for f in range(61):  # f060 does not exist
                    nursery.start_soon(look, d, f)
        assert len(found) == 1200 and all(size == int(p[-3:]) + 1 for p, size in found.items())
        assert sorted(missing) == [f"d{d:02d}/f060" for d in range(20)]
        assert server.stats.count(op="list") == 21
        assert server.stats.count(op="head") == 0


async def test_wide_directory_is_listed_once_while_far_names_are_probed(
    server: OssTestServer,
) -> None:
    for i in range(2500):
        server.put(BUCKET, f"wide/f{i:05d}", b"x")
    async with _client(server) as client, trio.open_nursery() as nursery:
        ns = Namespace(client, BUCKET, "")
        ns.attach(nursery)
        wide = await ns.lookup(ROOT_INODE, "wide")
        server.reset_stats()
        # Beyond the first page: the lookup does not wait for the whole listing.
        far = await ns.lookup(wide.inode, "f02400")
        assert far.meta is not None and far.meta.size == 1
        assert server.stats.count(op="head") == 1
        # The listing goes on in the background; then every name is answered from it.
        with trio.fail_after(30):
            while "wide" not in ns._listings or not ns._listings["wide"].complete:
                await trio.sleep(0.01)
        lists = server.stats.count(op="list")
        assert lists <= 3 + 1  # three pages, and the probe's one-key listing
        for i in range(0, 2500, 7):
            await ns.lookup(wide.inode, f"f{i:05d}")
        with pytest.raises(NotFoundError):
            await ns.lookup(wide.inode, "g")
        assert server.stats.count(op="list") == lists
        assert server.stats.count(op="head") == 1
        # A directory being listed for lookups is shared with readdir (no second listing).
        reader = ns.open_dir(wide.inode)
        assert reader.done and len(reader.entries) == 2500


async def test_a_walk_lists_the_next_subdirectories_ahead(server: OssTestServer) -> None:
    for d in range(20):
        server.put(BUCKET, f"t/d{d:02d}/f", b"x")
    async with _client(server) as client, trio.open_nursery() as nursery:
        ns = Namespace(client, BUCKET, "")
        ns.attach(nursery)
        t = await ns.lookup(ROOT_INODE, "t")
        await _all_names(ns, t.inode)
        d = {i: await ns.lookup(t.inode, f"d{i:02d}") for i in range(20)}
        server.reset_stats()
        # One subdirectory opened: not a walk yet, nothing is listed ahead.
        await _all_names(ns, d[0].inode)
        await trio.sleep(0.2)
        assert server.stats.count(op="list") == 1
        # The next one in order: the eight after it are listed in the background.
        await _all_names(ns, d[1].inode)
        with trio.fail_after(30):
            while server.stats.count(op="list") < 10 or ns._filling:
                await trio.sleep(0.01)
        assert all(f"t/d{i:02d}" in ns._listings for i in range(2, 10))
        assert server.stats.count(op="list") == 10
        for i in range(2, 10):  # ... and the walk finds them listed
            assert [n for n, _ in await _all_names(ns, d[i].inode)] == ["f"]
        with trio.fail_after(30):
            while ns._filling:
                await trio.sleep(0.01)
        assert server.stats.count(op="list") == 10 + 8  # and it keeps going ahead
        # A jump is not a walk: nothing more is listed ahead.
        await _all_names(ns, d[19].inode)
        await trio.sleep(0.2)
        assert server.stats.count(op="list") == 10 + 8 + 1


async def test_the_crc64_of_a_version_replaced_since_is_an_error_not_none(
    server: OssTestServer,
) -> None:
    # None would say "the service keeps no CRC-64": a mount that hears that for a few
    # objects in a row stops checking cached objects against the service at all.
    server.put(BUCKET, "obj", b"first version")
    async with _client(server) as client:
        ns = Namespace(client, BUCKET, "")
        await _all_names(ns, ROOT_INODE)
        node = await ns.lookup(ROOT_INODE, "obj")
        assert node.meta is not None and node.meta.crc64 is None  # (not in a listing)
        server.put(BUCKET, "obj", b"second version")
        with pytest.raises(ObjectChangedError):
            await ns.object_crc64(node)
        server.put(BUCKET, "obj", b"first version")  # (the same ETag: the same bytes)
        assert await ns.object_crc64(node) == crc64(b"first version")


async def test_files_whose_names_extend_another_files_name_are_found(
    server: OssTestServer,
) -> None:
    """ "ckpt" and "ckpt-1" ... "ckpt-1999" (README and README.md, data and data.json):
    "ckpt" waits until no "ckpt/" can follow, and every name sorting before "ckpt/"
    used to wait behind it, so a lookup once the listing had passed them said ENOENT."""
    server.put(BUCKET, "d/ckpt", b"c")
    for i in range(2000):
        server.put(BUCKET, f"d/ckpt-{i}", b"x")
    async with _client(server) as client:
        ns = Namespace(client, BUCKET, "")
        d = await ns.lookup(ROOT_INODE, "d")
        for name in ("ckpt-1", "ckpt-1500", "ckpt", "ckpt-999"):
            node = await ns.lookup(d.inode, name)
            assert not node.is_dir and node.meta is not None and node.meta.size == 1, name
        with pytest.raises(NotFoundError):
            await ns.lookup(d.inode, "ckpt-1x")
        names = await _all_names(ns, d.inode)
        assert len(names) == len(set(names)) == 2001


async def test_the_entry_cap_counts_the_names_that_are_skipped(server: OssTestServer) -> None:
    """Keys that give no entry (names over 255 bytes) still count against the cap: a
    listing of nothing but such keys ended never."""
    for i in range(30):
        server.put(BUCKET, f"w/{i:03d}" + "x" * 300, b"x")
    async with _client(server) as client:
        ns = Namespace(client, BUCKET, "", max_dir_entries=20)
        w = await ns.lookup(ROOT_INODE, "w")
        original = client.list_page

        async def pages_of_10(*args: object, **kwargs: object) -> object:
            kwargs["max_keys"] = 10  # each page alone is under the cap
            return await original(*args, **kwargs)  # type: ignore[arg-type]

        client.list_page = pages_of_10  # type: ignore[method-assign]
        with pytest.raises(ListingError, match="more than 20"):
            await _all_names(ns, w.inode)
