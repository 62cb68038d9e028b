"""Every wait of the object client has an end (``docs/semantics.md``, "Time bounds").

Against the OSS test server's faults that never end by themselves:

- a body that stalls and then trickles one byte at a time (each byte resets a
  stall timer), and a server that accepts and never answers: the request's
  deadline ends them;
- a transfer that moves a little and breaks, again and again: the retries it
  earns by moving are capped;
- a 200 with an endless body to a ranged GET, an error with an endless body,
  a 206 that sends more than asked, an endless listing page: never read to
  their end;
- a slow transfer that keeps moving (server bandwidth cap, client rate
  limit) is not cut off by the deadline;
- listings whose continuation token repeats, whose keys do not increase, or
  that never end: a clear error, and a directory of the mount holds at most
  ``--max-dir-entries`` entries;
- ``ossfs ls``, ``materialize`` and ``download`` against these, a silent server and 503
  on every request end with one line and exit 1; so does a mount read.

The deadlines here are a second or two so that each test is quick; each test
also has a pytest timeout far above that, which only a hang reaches.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ossfs.client import ClientConfig, HttpObjectClient
from ossfs.errors import GaveUpError, ListingError, ServiceError, TransferError
from ossfs.model import ListPage, ObjectMeta
from ossfs.namespace import ROOT_INODE, ListingGuard, Namespace
from ossfs.testing import Fault, OssTestServer, RequestInfo
from tests.helpers import mounted, run_ossfs
from tests.integration.test_client import get_bytes, get_records, one_request, pattern

KiB = 1024
MiB = 1024 * KiB

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def oss(oss_server: OssTestServer) -> OssTestServer:
    oss_server.put("bkt", "obj", pattern(1 * MiB, seed=3))
    oss_server.put("bkt", "small", b"0123456789")
    return oss_server


@pytest.fixture(params=["wire", "httpx"])
def transport(request: pytest.FixtureRequest) -> str:
    """Object bytes go through wire, or through httpx (as behind a proxy)."""
    return str(request.param)


def client_for(
    server: OssTestServer, config: ClientConfig, transport: str = "wire"
) -> HttpObjectClient:
    client = HttpObjectClient(server.endpoint(), config)
    if transport == "httpx":
        client._pool = None  # what a configured proxy does
    return client


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# ------------------------------------------------------------------ deadlines


async def test_trickle_is_ended_by_the_deadline(oss: OssTestServer, transport: str) -> None:
    # One byte every 0.05 s never trips the 5 s stall timer; only a deadline ends it.
    oss.faults.add(
        Fault(
            "stall",
            op="get",
            key="obj",
            after_bytes=1000,
            seconds=0.1,
            then="trickle",
            interval=0.05,
        ),
        times=None,
    )
    config = ClientConfig(timeout=1.5, stall_timeout=5, backoff_base=0.01, backoff_max=0.02)
    async with client_for(oss, config, transport) as client:
        with pytest.raises(GaveUpError) as info:
            await get_bytes(client, "bkt", "obj", 0, 1 * MiB)
    assert info.value.timed_out
    assert "timed out" in str(info.value) and "limit 1.5s" in str(info.value)
    records = get_records(oss, "obj")
    # The first attempt delivered 1000 bytes and then trickled; whatever followed,
    # nowhere near the megabyte asked for was sent.
    assert records and sum(r.bytes_sent for r in records) < 100 * KiB


@pytest.mark.parametrize("op", ["get", "head", "list"])
async def test_silent_server_is_ended_by_the_deadline(silent_server: str, op: str) -> None:
    from ossfs.protocol.ops import Endpoint

    endpoint = Endpoint(silent_server, dialect="oss", path_style=True, credentials=None)
    # Without a deadline: 6 attempts x 30 s stall timeout.
    config = ClientConfig(timeout=1.0, backoff_base=0.01, backoff_max=0.02)
    async with HttpObjectClient(endpoint, config) as client:
        with pytest.raises(GaveUpError) as info:
            await one_request(client, op)
    assert info.value.timed_out and info.value.attempts == 1
    assert "was still waiting for the server" in str(info.value)


async def test_a_slow_transfer_that_moves_is_not_cut_off(oss: OssTestServer) -> None:
    data = pattern(512 * KiB, seed=4)
    oss.put("bkt", "slow", data)
    # 256 KiB/s takes about 2 s, well past the 0.5 s timeout; every 16 KiB received
    # earns a second, so a transfer this fast is never near its deadline.
    oss.faults.bandwidth = 256 * KiB
    config = ClientConfig(timeout=0.5, min_speed=16 * KiB, backoff_base=0.01)
    async with client_for(oss, config) as client:
        got, _ = await get_bytes(client, "bkt", "slow", 0, len(data))
    assert got == data
    assert [r.status for r in get_records(oss, "slow")] == [206]


async def test_time_in_the_rate_limiter_and_the_sink_is_not_the_servers(oss: OssTestServer) -> None:
    data = pattern(256 * KiB, seed=5)
    oss.put("bkt", "limited", data)
    # The client's own rate limit (64 KiB/s, about 3 s) and a slow sink hold the
    # transfer far past the 0.5 s timeout; that is our waiting, not the server's.
    config = ClientConfig(timeout=0.5, min_speed=0, rate_limit=64 * KiB, backoff_base=0.01)
    got = bytearray()

    async def slow_sink(offset: int, chunk: memoryview) -> None:
        assert offset == len(got)
        got.extend(chunk)
        await trio.sleep(0.05)

    async with client_for(oss, config) as client:
        await client.get_range("bkt", "limited", 0, len(data), None, slow_sink)
    assert bytes(got) == data
    assert [r.status for r in get_records(oss, "limited")] == [206]


# ------------------------------------------------------------------ attempts


async def test_retries_earned_by_progress_are_capped(oss: OssTestServer) -> None:
    # Every answer sends 1000 bytes and then goes silent: each attempt moves, so
    # without a cap 1 MiB would take over a thousand stall timeouts.
    oss.faults.add(
        Fault("stall", op="get", key="obj", after_bytes=1000, seconds=1, then="close"), times=None
    )
    config = ClientConfig(
        attempts=2,
        progress_retries=3,
        stall_timeout=0.2,
        timeout=60,
        backoff_base=0.01,
        backoff_max=0.02,
    )
    async with client_for(oss, config) as client:
        with pytest.raises(GaveUpError) as info:
            await get_bytes(client, "bkt", "obj", 0, 1 * MiB)
    assert not info.value.timed_out
    # The first attempt and 3 resumed after it moved; then moving earns nothing more,
    # and 2 attempts use up the budget: 5, which is also the hard cap (2 + 3).
    assert info.value.attempts == 5
    assert "3 of them resumed" in str(info.value)
    starts = [r.req_start for r in sorted(get_records(oss, "obj"), key=lambda r: r.req_start)]
    assert starts == [0, 1000, 2000, 3000, 4000]


async def test_attempts_are_capped_in_all(oss: OssTestServer) -> None:
    # Moving and failing by turns: moving keeps resetting the count of failures in
    # a row, so only the cap on attempts in all (attempts + progress_retries) ends it.
    for _ in range(20):
        oss.faults.add(Fault("truncate", op="get", key="obj", after_bytes=1000))
        oss.faults.add(Fault("reset", op="get", key="obj", after_bytes=0))
    config = ClientConfig(attempts=2, progress_retries=4, backoff_base=0.01, backoff_max=0.02)
    async with client_for(oss, config) as client:
        with pytest.raises(GaveUpError) as info:
            await get_bytes(client, "bkt", "obj", 0, 1 * MiB)
    assert info.value.attempts == 6 and not info.value.timed_out
    assert len(get_records(oss, "obj")) == 6


# ------------------------------------------------------------------ bodies


async def test_200_to_a_ranged_get_is_not_read(oss: OssTestServer, transport: str) -> None:
    oss.faults.add(Fault("endless", op="get", key="obj", answer=200), times=None)
    async with client_for(oss, ClientConfig(backoff_base=0.01), transport) as client:
        with pytest.raises(ServiceError) as info:
            await get_bytes(client, "bkt", "obj", 10, 20)
        assert client.stats.bytes_received == 0
    assert info.value.code == "RangeIgnored"
    assert len(get_records(oss, "obj")) == 1  # not retried


async def test_endless_error_body_is_cut(oss: OssTestServer, transport: str) -> None:
    oss.faults.add(Fault("endless", op="get", key="obj", answer=503), times=None)
    config = ClientConfig(attempts=3, backoff_base=0.01, backoff_max=0.02)
    async with client_for(oss, config, transport) as client:
        with pytest.raises(GaveUpError) as info:
            await get_bytes(client, "bkt", "obj", 0, 100)
    assert info.value.attempts == 3 and not info.value.timed_out
    assert "ServiceUnavailable" in str(info.value)
    assert [r.status for r in get_records(oss, "obj")] == [503] * 3


async def test_206_longer_than_asked_is_not_read_on(oss: OssTestServer, transport: str) -> None:
    data = oss.get("bkt", "obj")
    # Right Content-Range, no Content-Length, and bytes that never end.
    oss.faults.add(Fault("endless", op="get", key="obj", answer=206))
    async with client_for(oss, ClientConfig(backoff_base=0.01), transport) as client:
        got, _ = await get_bytes(client, "bkt", "obj", 100, 200_000)
    assert got == data[100:200_000]
    # Always an endless 206: the client gives up; it never reads to an end.
    oss.faults.add(Fault("endless", op="get", key="obj", answer=206), times=None)
    config = ClientConfig(attempts=2, progress_retries=2, backoff_base=0.01)
    async with client_for(oss, config, transport) as client:
        with pytest.raises(TransferError):
            await get_bytes(client, "bkt", "obj", 100, 200)


async def test_206_with_a_wrong_content_length_is_refused(oss: OssTestServer) -> None:
    # A 206 whose Content-Length is not the range asked: the range header is right,
    # so only the length gives it away (here: a whole-object length).
    from ossfs.client import HttpObjectClient as Client

    async with Client(oss.endpoint(), ClientConfig(backoff_base=0.01)) as client:
        client_check = client._check_answer
        headers = {"content-range": "bytes 0-9/10", "content-length": "1000000"}
        with pytest.raises(ServiceError) as info:
            client_check(206, headers, None, 0, 10, "oss://bkt/small")
    assert info.value.code == "BadContentRange"
    assert "Content-Length" in str(info.value)


async def test_endless_listing_page_is_capped(oss: OssTestServer) -> None:
    oss.faults.add(Fault("endless", op="list"), times=None)
    config = ClientConfig(max_list_bytes=256 * KiB, backoff_base=0.01)
    async with client_for(oss, config) as client:
        with pytest.raises(ServiceError) as info:
            await client.list_page("bkt")
    assert info.value.code == "ListingTooLarge"
    assert oss.stats.count(op="list") == 1  # not retried: it would be the same again


async def test_endless_error_to_a_listing_is_cut(oss: OssTestServer) -> None:
    oss.faults.add(Fault("endless", op="list", answer=503), times=None)
    config = ClientConfig(attempts=2, backoff_base=0.01, backoff_max=0.02)
    async with client_for(oss, config) as client:
        with pytest.raises(GaveUpError):
            await client.list_page("bkt")
    assert oss.stats.count(op="list") == 2


# ------------------------------------------------------------------ listings


def _prefix_is(prefix: str) -> Callable[[RequestInfo], bool]:
    return lambda info: dict(info.query).get("prefix") == prefix


def _keys(prefix: str, n: int) -> list[str]:
    return [f"{prefix}k{i:05d}" for i in range(n)]


@pytest.fixture
def listed(oss_server: OssTestServer) -> OssTestServer:
    for key in _keys("dir/", 2500):
        oss_server.put("bkt", key, b"x")
    oss_server.put("bkt", "dir/sub/x", b"x")
    return oss_server


async def _read_dir(ns: Namespace, path: str) -> list[str]:
    node = ns.node(ROOT_INODE)
    for name in filter(None, path.split("/")):
        node = await ns.lookup(node.inode, name)
    reader = ns.open_dir(node.inode)
    pos = 0
    names: list[str] = []
    while True:
        await ns.fill(reader, pos)
        if pos >= len(reader.entries):
            return names
        for i, entry in ns.iter_entries(reader, pos):
            names.append(entry.name)
            pos = i + 1


async def test_a_directory_listing_that_moves_forward_is_whole(listed: OssTestServer) -> None:
    async with HttpObjectClient(listed.endpoint(), ClientConfig()) as client:
        ns = Namespace(client, "bkt", "", max_dir_entries=2501)
        names = await _read_dir(ns, "dir")
    assert names == [k.removeprefix("dir/") for k in _keys("dir/", 2500)] + ["sub"]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("token_loop", "the continuation token repeats"),
        ("keys_repeat", "page 2 starts at 'dir/k00000', not after 'dir/k00999'"),
    ],
)
async def test_a_directory_listing_that_loops_fails(
    listed: OssTestServer, kind: str, expected: str
) -> None:
    listed.faults.add(Fault(kind, when=_prefix_is("dir/")), times=None)  # type: ignore[arg-type]
    async with HttpObjectClient(listed.endpoint(), ClientConfig()) as client:
        ns = Namespace(client, "bkt", "")
        with pytest.raises(ListingError) as info:
            await _read_dir(ns, "dir")
        assert "the listing of oss://bkt/dir/ does not move forward" in str(info.value)
        assert expected in str(info.value)
        # The directory stays failed for that reader, without more requests.
        reader = ns.open_dir((await ns.lookup(ROOT_INODE, "dir")).inode)
        before = listed.stats.count(op="list")
        with pytest.raises(ListingError):
            await ns.fill(reader, 10**9)
        with pytest.raises(ListingError):
            await ns.fill(reader, 10**9)
        assert listed.stats.count(op="list") - before == 2


async def test_a_listing_that_never_ends_is_capped(listed: OssTestServer) -> None:
    listed.faults.add(Fault("endless_listing", when=_prefix_is("dir/")), times=None)
    async with HttpObjectClient(listed.endpoint(), ClientConfig()) as client:
        ns = Namespace(client, "bkt", "", max_dir_entries=2500)
        node = await ns.lookup(ROOT_INODE, "dir")
        reader = ns.open_dir(node.inode)
        with pytest.raises(ListingError) as info:
            await ns.fill(reader, 10**9)
    assert "oss://bkt/dir/ has more than 2500 entries" in str(info.value)
    assert len(reader.entries) + len(reader._pending) <= 2500


def test_listing_guard_rules() -> None:
    def page(keys: list[str], token: str | None, prefixes: tuple[str, ...] = ()) -> ListPage:
        return ListPage(tuple(ObjectMeta(k, 1, "e", 0.0) for k in keys), prefixes, token)

    guard = ListingGuard("oss://b/")
    guard.check(page(["a", "b/"], "t1", ("c/",)), None)
    guard.check(page([], "t2"), "t1")  # an empty page is allowed
    guard.check(page(["d"], "t3", ("c0/",)), "t2")
    guard.check(page([], None), "t3")
    with pytest.raises(ListingError, match="continuation token repeats"):
        ListingGuard("oss://b/").check(page(["a"], "t"), "t")
    guard = ListingGuard("oss://b/")
    guard.check(page(["a"], "t1"), None)
    guard.check(page([], "t2"), "t1")
    with pytest.raises(ListingError, match="continuation token repeats"):
        guard.check(page([], "t2"), "t2")
    guard = ListingGuard("oss://b/", max_empty_pages=3)
    with pytest.raises(ListingError, match="3 pages in a row have no entries"):
        for i in range(10):
            guard.check(page([], f"t{i + 1}"), f"t{i}" if i else None)
    guard = ListingGuard("oss://b/")
    guard.check(page(["b"], "t1"), None)
    with pytest.raises(ListingError, match="page 2 starts at 'a'"):
        guard.check(page(["a", "c"], "t2"), "t1")
    guard = ListingGuard("oss://b/")
    guard.check(page([], "t1", ("x/",)), None)
    with pytest.raises(ListingError, match="not after 'x/'"):
        guard.check(page(["x/"], None), "t1")


# ------------------------------------------------------------------ commands


def _cli(server_url: str, env: dict[str, str], *args: str) -> Any:
    # The timeout only ends a hang of the code before these bounds existed.
    return run_ossfs(*args, "--endpoint", server_url, env=env, timeout=60)


def _one_error_line(result: Any) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("ossfs: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("kind", "args", "expected"),
    [
        ("token_loop", ["ls", "oss://bkt/dir/"], "continuation token repeats"),
        ("keys_repeat", ["ls", "-r", "oss://bkt/dir/"], "page 2 starts at"),
    ],
)
def test_ls_of_a_listing_that_loops(
    listed: OssTestServer, oss_env: dict[str, str], kind: str, args: list[str], expected: str
) -> None:
    listed.faults.add(Fault(kind), times=None)  # type: ignore[arg-type]
    result = _cli(listed.url, oss_env, *args)
    line = _one_error_line(result)
    assert "does not move forward" in line and expected in line
    # What came before the loop was printed once.
    assert len(result.stdout.splitlines()) == 1000


def test_materialize_of_a_listing_that_loops(
    listed: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    listed.faults.add(Fault("token_loop"), times=None)
    result = _cli(
        listed.url,
        oss_env,
        "materialize",
        "oss://bkt/dir/",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    )
    line = _one_error_line(result)
    assert "bkt/dir/ does not move forward" in line and "token repeats" in line


@pytest.mark.slow
def test_ls_and_download_against_a_silent_server(
    silent_server: str, oss_env: dict[str, str], tmp_path: Path
) -> None:
    result = _cli(silent_server, oss_env, "ls", "oss://bkt/", "--timeout", "2")
    assert "timed out after" in _one_error_line(result)
    result = _cli(
        silent_server, oss_env, "download", "oss://bkt/obj", str(tmp_path / "obj"), "--timeout", "2"
    )
    assert "timed out after" in _one_error_line(result)
    assert not (tmp_path / "obj").exists()


@pytest.mark.slow
def test_ls_and_download_against_503_forever(
    oss: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    oss.faults.add(Fault("status", status=503), times=None)
    result = _cli(oss.url, oss_env, "ls", "oss://bkt/")
    assert "failed after 6 attempts" in _one_error_line(result)
    result = _cli(oss.url, oss_env, "download", "oss://bkt/obj", str(tmp_path / "obj"))
    assert "failed after 6 attempts" in _one_error_line(result)


def test_download_of_a_trickle(oss: OssTestServer, oss_env: dict[str, str], tmp_path: Path) -> None:
    oss.faults.add(
        Fault("stall", op="get", after_bytes=1000, seconds=0.1, then="trickle", interval=0.05),
        times=None,
    )
    result = _cli(
        oss.url,
        oss_env,
        "download",
        "oss://bkt/obj",
        str(tmp_path / "obj"),
        "--timeout",
        "2",
        "--no-progress",
    )
    line = _one_error_line(result)
    assert "timed out after" in line
    assert not (tmp_path / "obj").exists()


@pytest.mark.fuse
def test_mount_directory_that_loops_or_never_ends(
    listed: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    for key in _keys("endless/", 3):
        listed.put("bkt", key, b"x")
    for key in _keys("loop/", 3):
        listed.put("bkt", key, b"x")
    listed.faults.add(Fault("endless_listing", when=_prefix_is("endless/")), times=None)
    listed.faults.add(Fault("token_loop", when=_prefix_is("loop/")), times=None)
    mnt = tmp_path / "mnt"
    log = tmp_path / "mount.log"
    with mounted(
        "oss://bkt",
        mnt,
        "--endpoint",
        listed.url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--max-dir-entries",
        "3000",
        env=oss_env,
        log=log,
    ):
        with pytest.raises(OSError) as info:
            os.listdir(mnt / "endless")
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            os.listdir(mnt / "loop")
        assert info.value.errno == errno.EIO
        # The rest of the mount is fine.
        assert len(os.listdir(mnt / "dir")) == 2501
    text = log.read_text()
    assert "oss://bkt/endless/ has more than 3000 entries" in text
    assert "the listing of oss://bkt/loop/ does not move forward" in text


@pytest.mark.fuse
@pytest.mark.slow
def test_mount_read_of_a_trickle_ends(
    oss: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    oss.faults.add(
        Fault(
            "stall",
            op="get",
            key="obj",
            after_bytes=1000,
            seconds=0.1,
            then="trickle",
            interval=0.05,
        ),
        times=None,
    )
    mnt = tmp_path / "mnt"
    with mounted(
        "oss://bkt",
        mnt,
        "--endpoint",
        oss.url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--timeout",
        "2",
        env=oss_env,
    ):
        with pytest.raises(OSError) as info:
            (mnt / "obj").read_bytes()
        assert info.value.errno == errno.EIO
        oss.faults.clear()
        assert (mnt / "obj").read_bytes() == oss.get("bkt", "obj")
