"""The data-plane HTTP/1.1 client against a scripted server on 127.0.0.1.

Each test serves raw response bytes, so framing (Content-Length, chunked,
close-delimited), truncation, stalls and connection reuse are exercised
exactly as they would arrive from a real server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from ossfs.wire import READ_SIZE, Pool, WireError


@asynccontextmanager
async def scripted(
    handler: Callable[[trio.SocketStream, int], object],
) -> AsyncIterator[tuple[str, list[int]]]:
    """Serve connections with *handler(stream, connection_number)*; yield (url, accepted)."""
    accepted: list[int] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, _wrap(handler, accepted), 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}", accepted
        nursery.cancel_scope.cancel()


def _wrap(
    handler: Callable[[trio.SocketStream, int], object], accepted: list[int]
) -> Callable[[trio.SocketStream], object]:
    async def serve(stream: trio.SocketStream) -> None:
        accepted.append(len(accepted))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream, len(accepted) - 1)  # type: ignore[misc]

    return serve


async def read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return data
        data += chunk
    return data


async def fetch(pool: Pool, collected: bytearray) -> tuple[int, dict[str, str]]:
    async with pool.connection("127.0.0.1") as conn:
        await conn.send("GET", "/b/k", [("Host", "127.0.0.1")])
        head = await conn.read_head()

        def sink(done: int, view: memoryview) -> None:
            assert done == len(collected)
            collected.extend(view)

        await conn.read_body(head, sink)
        return head.status, head.headers


def pool_for(url: str, stall: float = 5.0) -> Pool:
    return Pool(url, max_idle=4, connect_timeout=5, stall=stall)


BIG = bytes(range(256)) * ((3 * READ_SIZE + 12345) // 256)


async def test_content_length_body_and_keep_alive_reuse() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        for _ in range(3):
            req = await read_request(stream)
            assert req.startswith(b"GET /b/k HTTP/1.1\r\n")
            await stream.send_all(
                b"HTTP/1.1 206 Partial Content\r\nContent-Length: "
                + str(len(BIG)).encode()
                + b"\r\nX-Oss-Hash: 1\r\n\r\n"
            )
            await stream.send_all(BIG)

    async with scripted(handler) as (url, accepted):
        pool = pool_for(url)
        for _ in range(3):
            got = bytearray()
            status, headers = await fetch(pool, got)
            assert status == 206 and headers["x-oss-hash"] == "1"
            assert bytes(got) == BIG
        assert accepted == [0]  # one connection served all three requests
        await pool.aclose()


async def test_chunked_body() -> None:
    pieces = [b"hello ", b"x" * 70000, b"", b"end"]

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        for p in pieces:
            if p:
                out += f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n"
        out += b"0\r\nTrailer: yes\r\n\r\n"
        for i in range(0, len(out), 7):  # dribble it in small pieces
            await stream.send_all(out[i : i + 7])

    async with scripted(handler) as (url, _):
        got = bytearray()
        pool = pool_for(url)
        status, _h = await fetch(pool, got)
        await pool.aclose()
        assert status == 200 and bytes(got) == b"".join(pieces)


async def test_close_delimited_body_is_not_reused() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await stream.aclose()

    async with scripted(handler) as (url, accepted):
        pool = pool_for(url)
        got = bytearray()
        await fetch(pool, got)
        assert bytes(got) == b"until the end"
        got.clear()
        await fetch(pool, got)
        await pool.aclose()
        assert accepted == [0, 1]


async def test_truncated_body_reports_what_was_delivered() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 206 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 400)
        await stream.aclose()

    async with scripted(handler) as (url, _):
        got = bytearray()
        with pytest.raises(WireError) as e:
            await fetch(pool_for(url), got)
        assert e.value.received == 400 and bytes(got) == b"a" * 400
        assert "400 of 1000" in e.value.reason


async def test_stall_is_detected_and_the_deadline_moves_with_data() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 206 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(4):  # slow but steady: 4 x 0.15 s > stall, each gap < stall
            await trio.sleep(0.15)
            await stream.send_all(b"b" * 10)
        await trio.sleep(10)  # then silence

    async with scripted(handler) as (url, _):
        got = bytearray()
        with pytest.raises(WireError) as e:
            await fetch(pool_for(url, stall=0.4), got)
        assert "stalled" in e.value.reason and e.value.received == 40


async def test_server_closing_an_idle_connection_is_seen() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await stream.aclose()  # without saying Connection: close

    async with scripted(handler) as (url, _):
        pool = pool_for(url)
        await fetch(pool, bytearray())
        async with pool.connection("127.0.0.1") as conn:
            assert conn.from_pool
            with pytest.raises(WireError):
                await conn.send("GET", "/b/k", [("Host", "x")])
                await conn.read_head()
        await pool.aclose()


async def test_refused_connection_and_garbage_answers() -> None:
    with pytest.raises(WireError, match="cannot connect"):
        async with pool_for("http://127.0.0.1:1").connection("127.0.0.1"):
            pass

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")

    async with scripted(handler) as (url, _):
        with pytest.raises(WireError, match="status line|protocol"):
            await fetch(pool_for(url), bytearray())


def _head_of_length(length: int, body: int) -> bytes:
    """A 200 head for a *body*-byte body, padded with a header to *length* bytes."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Pad: \r\n\r\n" % body
    return head.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (length - len(head)))


# The blank line that ends the head ends before, inside and just after the first
# 16 KiB received, and one head spans several receives.
@pytest.mark.parametrize("length", [200, 16 * 1024 - 1, 16 * 1024 + 1, 16 * 1024 + 3, 40_000])
async def test_a_head_and_body_sent_together_split_at_any_point(length: int) -> None:
    # The head is received a piece at a time; the body bytes that came with it must
    # be handed over first, in order, wherever the end of the head falls.
    head = _head_of_length(length, len(BIG))
    assert len(head) == length

    async def handler(stream: trio.SocketStream, n: int) -> None:
        for _ in range(2):
            await read_request(stream)
            await stream.send_all(head + BIG)

    async with scripted(handler) as (url, accepted):
        pool = pool_for(url)
        for _ in range(2):
            got = bytearray()
            status, headers = await fetch(pool, got)
            assert status == 200 and len(headers["x-pad"]) > 0
            assert bytes(got) == BIG
        assert accepted == [0]
        await pool.aclose()
