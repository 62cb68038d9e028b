"""The data plane: HTTP/1.1 ranged GET bodies read straight into a reused buffer.

httpx serves HEAD and LIST (the control plane). Object bytes go through this
small HTTP/1.1 client instead, because per GiB httpx's layered reads cost
about 1 s of CPU in Python (a fresh ``bytes`` per 64 KiB read, copied twice
more on the way up), which made the client, not the network, the bottleneck:
measured on loopback against nginx, a 1 GiB download took 2.1 s through httpx
and 0.75 s this way (curl: 1.2 s). See ``docs/architecture.md``.

What it does: one request at a time per connection, keep-alive, a pool of
idle connections per endpoint, ``Content-Length`` and chunked bodies, TLS
through trio's SSLStream, ``recv_into`` a 1 MiB buffer per connection on plain
sockets, and a stall deadline that moves forward with every byte received.
What it leaves to httpx: proxies, redirects, HTTP/2, cookies. Failures are
`WireError` (retryable by the caller); the caller retries and resumes.

Must not import: httpx, pyfuse3.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

__all__ = [
    "WireError",
    "Head",
    "Connection",
    "Pool",
    "BodySink",
    "READ_SIZE",
    "certificate_problem",
]


READ_SIZE = 1 << 20
_MAX_HEAD = 64 * 1024
# A response head is received this many bytes at a time. The body bytes that
# arrive with it are copied aside to be handed over first, so this keeps them
# few: receiving the head into the whole 1 MiB buffer had each GET copy up to
# 1 MiB of its body four more times, into freshly allocated memory.
_HEAD_RECV = 16 * 1024
# The longest chunk-size line or trailer line accepted.
_MAX_LINE = 4096
# Informational answers (1xx, e.g. 103 Early Hints) skipped before the answer, at most.
_MAX_INFORMATIONAL = 8
# Framing fields are plain digits: Python's int() would also take "-1", "+5", "0x5",
# "1_0" or surrounding spaces, and a negative chunk size made the reader spin.
_DIGITS = re.compile(rb"[0-9]{1,19}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
# A partly filled buffer is handed over once it holds this much and the first byte
# arrived this long ago (seconds).
_MIN_HANDOVER = 64 * 1024
_HANDOVER_DELAY = 0.002

# Called with (bytes so far in this body, view of the new bytes); the view is only
# valid during the call. May return an awaitable (awaited before reading on).
BodySink = Callable[[int, memoryview], Awaitable[None] | None]


class WireError(Exception):
    """The connection failed (refused, reset, closed early, stalled, bad framing).

    :received: body bytes delivered to the sink before the failure.
    :fatal: no retry can help (the server's TLS certificate is not trusted).
    """

    def __init__(self, reason: str, *, received: int = 0, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.received = received
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class Head:
    """Status line and headers of a response (header names lower-case)."""

    status: int
    reason: str
    headers: dict[str, str]
    keep_alive: bool


class Connection:
    """One HTTP/1.1 connection, used for one request at a time."""

    def __init__(
        self, stream: trio.abc.Stream, sock: trio.socket.SocketType | None, stall: float
    ) -> None:
        self._stream = stream
        self._sock = sock  # a plain socket can recv_into our buffer directly
        self._stall = stall
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self._pending = b""  # bytes read past the head, not yet consumed
        self.reusable = True
        self.from_pool = False

    async def aclose(self) -> None:
        self.reusable = False
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await trio.aclose_forcefully(self._stream)

    # ------------------------------------------------------------ low level

    async def _recv_into(self, view: memoryview) -> int:
        """Receive into *view*; WireError when the peer is silent for ``stall`` seconds."""
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        n = 0
        try:
            with trio.move_on_after(self._stall) as scope:
                if self._sock is not None:
                    n = await self._sock.recv_into(view)
                else:
                    data = await self._stream.receive_some(len(view))
                    n = len(data)
                    view[:n] = data
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.reusable = False
            raise WireError(f"connection broken: {e}") from e
        if scope.cancelled_caught:
            self.reusable = False
            raise WireError("stalled: no data within the stall timeout")
        return n

    async def _fill(self, want: int, sink: BodySink, done: int) -> tuple[int, bool]:
        """Receive up to *want* bytes into the buffer and hand them to *sink*.

        Returns how many arrived and whether the stream ended. On a failure the
        bytes that did arrive are handed over first, so a retry resumes after
        them; the error carries the new total.
        """
        view = self._view
        filled = 0
        ended = False
        started = trio.current_time()
        try:
            while filled < want:
                n = await self._recv_into(view[filled:want])
                if n == 0:
                    ended = True
                    break
                filled += n
                # On a fast link the buffer fills in about a millisecond: hand it over
                # whole. On a slow one, do not keep a reader waiting for a full buffer.
                if filled >= _MIN_HANDOVER and trio.current_time() - started > _HANDOVER_DELAY:
                    break
        except WireError as e:
            if filled:
                await _call(sink, done, view[:filled])
            e.received = done + filled
            raise
        if filled:
            await _call(sink, done, view[:filled])
        return filled, ended

    # ------------------------------------------------------------ request

    async def send(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            with trio.fail_after(self._stall):
                await self._stream.send_all(data)
        except trio.TooSlowError as e:
            self.reusable = False
            raise WireError("stalled sending the request") from e
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.reusable = False
            raise WireError(f"connection broken: {e}") from e

    async def read_head(self) -> Head:
        """The head of the answer, after any informational (1xx) ones, which are
        skipped (RFC 9110, 15.2). A bad head leaves the connection unusable."""
        try:
            for _ in range(_MAX_INFORMATIONAL + 1):
                head = await self._read_one_head()
                if not 100 <= head.status < 200 or head.status == 101:
                    return head
        except WireError:
            self.reusable = False
            raise
        self.reusable = False
        raise WireError(f"more than {_MAX_INFORMATIONAL} informational answers")

    async def _read_one_head(self) -> Head:
        head = bytearray()
        while True:
            n = await self._recv_into(self._view[:_HEAD_RECV])
            if n == 0:
                self.reusable = False
                raise WireError("connection closed before a response")
            head += self._view[:n]
            end = head.find(b"\r\n\r\n", max(0, len(head) - n - 3))
            if end >= 0:
                self._pending = bytes(head[end + 4 :]) + self._pending
                return _parse_head(bytes(head[:end]))
            if len(head) > _MAX_HEAD:
                self.reusable = False
                raise WireError("response head too large")

    async def read_body(self, head: Head, sink: BodySink) -> int:
        """Stream the body into *sink* in buffer-sized pieces; return its length.

        Only GET answers come here (HEAD goes through httpx): a body is framed by
        its status and headers alone.
        """
        n = await self._read_framed(head, sink)
        if self._pending:
            # Bytes past the end of the body, sent before any next request: they are
            # no answer to it. (Taken as one, a connection would stay an answer behind.)
            self.reusable = False
        return n

    async def _read_framed(self, head: Head, sink: BodySink) -> int:
        if head.status in (204, 304) or 100 <= head.status < 200:
            return 0
        te = head.headers.get("transfer-encoding", "").lower()
        if "chunked" in te:
            return await self._read_chunked(sink)
        length = head.headers.get("content-length")
        if length is not None:
            if not _DIGITS.fullmatch(length.encode("latin-1")):
                self.reusable = False
                raise WireError(f"bad Content-Length {length[:40]!r}")
            return await self._read_length(int(length), sink)
        # No framing: the body runs to the end of the connection.
        self.reusable = False
        return await self._read_length(None, sink)

    async def _read_length(self, total: int | None, sink: BodySink) -> int:
        done = 0
        while total is None or done < total:
            want = READ_SIZE if total is None else min(READ_SIZE, total - done)
            filled, ended = await self._fill(want, sink, done)
            done += filled
            if ended:
                if total is None:
                    return done
                self.reusable = False
                raise WireError(f"body ended after {done} of {total} bytes", received=done)
        return done

    async def _readline(self) -> bytes:
        line = bytearray()
        one = memoryview(bytearray(1))
        while not line.endswith(b"\r\n"):
            if self._pending:
                nl = self._pending.find(b"\n")
                take = len(self._pending) if nl < 0 else nl + 1
                line += self._pending[:take]
                self._pending = self._pending[take:]
            elif await self._recv_into(one) == 0:
                self.reusable = False
                raise WireError("connection closed inside a chunked body")
            else:
                line += one
            if len(line) > _MAX_LINE:
                self.reusable = False
                raise WireError("chunk header too long")
        return bytes(line[:-2])

    async def _line(self, done: int) -> bytes:
        """`_readline` inside a chunked body: an error carries the *done* bytes."""
        try:
            return await self._readline()
        except WireError as e:
            e.received = done
            raise

    async def _read_chunked(self, sink: BodySink) -> int:
        done = 0
        while True:
            # chunk-size [ BWS ";" extensions ] (RFC 9112, 7.1)
            field = (await self._line(done)).split(b";", 1)[0].rstrip(b" \t")
            if not _HEX.fullmatch(field):
                self.reusable = False
                raise WireError(f"bad chunk size {bytes(field[:40])!r}", received=done)
            size = int(field, 16)
            if size == 0:
                trailers = 0
                while line := await self._line(done):
                    trailers += len(line)
                    if trailers > _MAX_HEAD:
                        self.reusable = False
                        raise WireError("chunked trailers too large", received=done)
                return done
            left = size
            while left:
                want = min(READ_SIZE, left)
                filled, ended = await self._fill(want, sink, done)
                done += filled
                left -= filled
                if ended:
                    self.reusable = False
                    raise WireError("connection closed inside a chunk", received=done)
            if await self._line(done):
                self.reusable = False
                raise WireError("bad chunk framing: more bytes than the chunk size", received=done)

    async def read_all(self, head: Head, *, limit: int = 64 * 1024) -> bytes:
        """A small body, e.g. an error document: at most *limit* bytes of it.

        A longer body is not read to its end (it may never end): reading stops
        after *limit* bytes and the connection is not reused.
        """
        parts: list[bytes] = []
        size = 0

        def keep(_offset: int, data: memoryview) -> None:
            nonlocal size
            take = min(len(data), limit - size)
            parts.append(bytes(data[:take]))
            size += take
            if take < len(data):
                raise _Enough()

        try:
            await self.read_body(head, keep)
        except _Enough:
            self.reusable = False
        return b"".join(parts)

    def discard(self) -> None:
        """Leave the body unread: the connection cannot carry another request."""
        self.reusable = False


class _Enough(Exception):
    """A capped read has what it wanted."""


def certificate_problem(error: BaseException) -> str | None:
    """A message when *error* (or what caused it) is a failed TLS certificate check or
    handshake: neither is helped by a retry."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (
                f"the server's TLS certificate is not trusted ({seen.verify_message}); "
                "set SSL_CERT_FILE to a CA bundle that signs it"
            )
        if isinstance(seen, ssl.SSLError):
            # No retry helps a handshake that fails this way; the usual cause is an
            # https:// endpoint (the default when no scheme is given) on a plain-http port.
            return (
                f"TLS handshake failed ({seen.reason or seen}); if the endpoint speaks "
                "plain HTTP, give it as --endpoint http://HOST:PORT"
            )
        seen = seen.__cause__ or seen.__context__
    return None


async def _call(sink: BodySink, done: int, data: memoryview) -> None:
    result = sink(done, data)
    if result is not None:
        await result


def _parse_head(raw: bytes) -> Head:
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status, _, reason = rest.partition(" ")
    if not (len(status) == 3 and _DIGITS.fullmatch(status.encode("latin-1"))):
        raise WireError(f"bad status line {lines[0][:80]!r}")
    code = int(status)
    if not version.startswith("HTTP/1."):
        raise WireError(f"unsupported protocol {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
    return Head(code, reason, headers, keep)


class Pool:
    """Idle connections to one endpoint (``scheme://host:port``)."""

    def __init__(
        self,
        url: str,
        *,
        max_idle: int,
        connect_timeout: float,
        stall: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.stall = stall
        self._ssl = ssl_context
        if self.scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        self._idle: list[Connection] = []
        self.open = 0  # connections made and not closed (idle or in use)

    @property
    def buffered_bytes(self) -> int:
        """Memory held by the receive buffers of the open connections."""
        return self.open * READ_SIZE

    async def _connect(self, host: str) -> Connection:
        tcp: trio.SocketStream | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(self.host, self.port)
                tcp.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                if self._ssl is None:
                    return Connection(tcp, tcp.socket, self.stall)
                tls = trio.SSLStream(tcp, self._ssl, server_hostname=host)
                await tls.do_handshake()
                return Connection(tls, None, self.stall)
        except BaseException as e:
            if tcp is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(tcp)
            if isinstance(e, trio.TooSlowError):
                raise WireError("connect timed out") from e
            if isinstance(e, (OSError, trio.BrokenResourceError)):
                untrusted = certificate_problem(e)
                if untrusted is not None:
                    raise WireError(untrusted, fatal=True) from e
                raise WireError(f"cannot connect: {e}") from e
            raise

    @asynccontextmanager
    async def connection(self, host: str) -> AsyncIterator[Connection]:
        """A connection for one request; returned to the pool if still clean."""
        if self._idle:
            conn = self._idle.pop()
            conn.from_pool = True
        else:
            conn = await self._connect(host)
            self.open += 1
        ok = False
        try:
            yield conn
            ok = True
        finally:
            if ok and conn.reusable and len(self._idle) < self.max_idle:
                conn.from_pool = False
                self._idle.append(conn)
            else:
                self.open -= 1
                await conn.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        self.open -= len(idle)
        for conn in idle:
            await conn.aclose()
