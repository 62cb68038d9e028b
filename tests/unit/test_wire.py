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


def _answer_once(raw: bytes, *, close: bool = True) -> Callable[[trio.SocketStream, int], object]:
    """A handler that answers the first request with *raw* (then closes)."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(raw)
        if close:
            await stream.aclose()
        else:
            await trio.sleep(30)

    return handler


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


async def fetch_once(url: str, collected: bytearray) -> tuple[int, dict[str, str]]:
    """`fetch` on a pool of its own, closed after (within 5 s: nothing may hang)."""
    pool = pool_for(url)
    try:
        with trio.fail_after(5):
            return await fetch(pool, collected)
    finally:
        await pool.aclose()


# Each is refused with one clear error, without waiting for the server: a size that
# is not plain hex (a negative one made the reader spin with no checkpoint, so not
# even a deadline could stop it), and a chunk followed by more than its CRLF.
@pytest.mark.parametrize(
    "body",
    [
        b"-1\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"1_0\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"\r\n",
        b"5\r\nhelloEXTRA\r\n0\r\n\r\n",
    ],
)
async def test_bad_chunk_framing_is_an_error_not_a_hang(body: bytes) -> None:
    async with scripted(_answer_once(CHUNKED + body, close=False)) as (url, _):
        got = bytearray()
        with pytest.raises(WireError, match="chunk"):
            await fetch_once(url, got)
        assert len(got) <= 5


async def test_chunk_size_may_have_extensions_and_spaces_before_them() -> None:
    body = b"5 ;a=b\r\nhello\r\n3\t;x\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n"
    async with scripted(_answer_once(CHUNKED + body, close=False)) as (url, _):
        got = bytearray()
        await fetch_once(url, got)
        assert bytes(got) == b"helloabc0123456789"


@pytest.mark.parametrize("length", [b"-1", b"+5", b"5_0", b"0x5", b""])
async def test_a_content_length_that_is_not_plain_digits_is_refused(length: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nbodybytes"
    async with scripted(_answer_once(raw, close=False)) as (url, _):
        with pytest.raises(WireError, match="Content-Length"):
            await fetch_once(url, bytearray())


@pytest.mark.parametrize(
    "tail", [b"5\r\nhello", b"5\r\nhello\r\n", b"5\r\nhello\r\n0\r\n", b"5\r\nhello\r\n0\r\nX: y"]
)
async def test_a_chunked_body_cut_after_its_data_reports_every_byte_delivered(
    tail: bytes,
) -> None:
    async with scripted(_answer_once(CHUNKED + tail)) as (url, _):
        got = bytearray()
        with pytest.raises(WireError) as e:
            await fetch_once(url, got)
        assert bytes(got) == b"hello" and e.value.received == 5


async def test_bytes_past_the_end_of_a_body_are_not_taken_as_the_next_answer() -> None:
    # Sent with the first answer, ahead of any second request: not an answer to it.
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    early = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTALE"

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        if n == 0:
            await stream.send_all(first + early)
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        await trio.sleep(30)

    async with scripted(handler) as (url, accepted):
        pool = pool_for(url)
        got = bytearray()
        with trio.fail_after(5):
            await fetch(pool, got)
            assert bytes(got) == b"hello"
            got.clear()
            await fetch(pool, got)
        assert bytes(got) == b"fresh" and accepted == [0, 1]
        await pool.aclose()


@pytest.mark.parametrize("informational", [b"100 Continue", b"103 Early Hints\r\nLink: </x>"])
async def test_informational_answers_before_the_answer_are_skipped(informational: bytes) -> None:
    raw = b"HTTP/1.1 " + informational + b"\r\n\r\n"
    raw += b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    async with scripted(_answer_once(raw, close=False)) as (url, _):
        got = bytearray()
        status, _h = await fetch_once(url, got)
        assert status == 200 and bytes(got) == b"hello"


async def test_endless_informational_answers_are_refused() -> None:
    raw = b"HTTP/1.1 103 Early Hints\r\n\r\n" * 100
    async with scripted(_answer_once(raw, close=False)) as (url, _):
        with pytest.raises(WireError, match="informational"):
            await fetch_once(url, bytearray())


async def test_a_ranged_get_whose_chunked_framing_breaks_after_every_byte_is_whole() -> None:
    # The object client resumes a broken transfer after the bytes delivered; when all
    # of them were, there is nothing to resume (it raised ValueError("empty range")).
    from ossfs.client import ClientConfig, HttpObjectClient
    from ossfs.protocol.ops import Endpoint

    raw = (
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4/10\r\n"
        b'ETag: "e"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n'
    )
    async with scripted(_answer_once(raw)) as (url, accepted):
        async with HttpObjectClient(Endpoint(url), ClientConfig(attempts=2)) as client:
            got = bytearray()

            def sink(at: int, data: memoryview) -> None:
                assert at == len(got)
                got.extend(data)

            with trio.fail_after(5):
                result = await client.get_range("b", "k", 0, 5, None, sink)
        assert bytes(got) == b"hello" and result.nbytes == 5 and accepted == [0]


async def test_endless_trailers_and_long_chunk_lines_are_refused() -> None:
    endless = CHUNKED + b"5\r\nhello\r\n0\r\n" + b"X-T: tt\r\n" * 20000
    async with scripted(_answer_once(endless, close=False)) as (url, _):
        got = bytearray()
        with pytest.raises(WireError, match="trailers too large") as e:
            await fetch_once(url, got)
        assert bytes(got) == b"hello" and e.value.received == 5
    # A long line that arrived with the head (served from what was read past it).
    long_line = CHUNKED + b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n"
    async with scripted(_answer_once(long_line, close=False)) as (url, _):
        with pytest.raises(WireError, match="too long"):
            await fetch_once(url, bytearray())
