"""The object client: the only module that talks to the network.

`HttpObjectClient` sends the requests `ossfs.protocol.ops` builds over one
shared ``httpx.AsyncClient`` (running on trio), with a connection pool sized
to the configured concurrency. It retries with jittered exponential backoff on
5xx, 429 and 408 answers, connection errors, bodies cut short and stalls (no
byte for ``stall_timeout`` seconds); everything else surfaces at once as a
typed `ServiceError`. A ranged GET that breaks half way resumes from the first
missing byte, so a flaky network costs only what was lost in flight.

Every wait ends. One call (``head``, ``list_page``, ``get_range``) is one
*retry cycle* with a hard end:

- at most ``attempts`` attempts in a row that deliver nothing, at most
  ``progress_retries`` retries earned by delivering bytes, and never more
  than ``attempts + progress_retries`` attempts in all;
- a deadline ``timeout`` seconds after the cycle starts, moved later by one
  second for every ``min_speed`` bytes received (a slow transfer that moves
  is not cut off; a trickle, which resets any stall timer, is) and by the time
  spent in the caller's sink and the rate limiter (our waits, not the
  server's). Nothing arriving at all: the cycle ends after ``timeout``;
- no body is read further than needed: an error document up to 64 KiB, a
  listing page up to ``max_list_bytes``, a 206 up to the range asked, and a
  200 to a ranged GET not at all.

When a cycle fails it raises `GaveUpError` (a `TransferError`).

Object bytes (ranged GETs) travel through `ossfs.wire`, a small HTTP/1.1
client that reads bodies straight into a reused buffer; HEAD and LIST use
httpx. When a proxy is configured for the endpoint, GETs use httpx too (wire
speaks to the endpoint directly).

Requests are signed with the endpoint's credentials, or, when the client is
given a `CredentialSource` (temporary credentials: `ossfs.refresh`), with
what that source holds when each attempt is built; a retry after the
credentials were renewed carries the new ones.

The rest of ossfs depends on the `ObjectClient` protocol, so tests can put
latency or faults in front of a real client.

Must not import: pyfuse3.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import httpx
import trio

from ossfs import __version__, wire
from ossfs.errors import (
    AccessError,
    GaveUpError,
    NotFoundError,
    ServiceError,
    TransferError,
)
from ossfs.model import ListPage, ObjectMeta, object_url
from ossfs.protocol import ops as proto
from ossfs.protocol.signing import Credentials
from ossfs.protocol.xml import XmlError, parse_list_objects_v2

__all__ = [
    "Sink",
    "GetResult",
    "ObjectClient",
    "ClientConfig",
    "CredentialSource",
    "ClientStats",
    "RateLimiter",
    "HttpObjectClient",
]

log = logging.getLogger(__name__)

# Called with (object offset, bytes) for every piece of a ranged GET, in order. The
# view is only valid during the call (its buffer is reused); the sink may return an
# awaitable, which is awaited before more bytes are read.
Sink = Callable[[int, memoryview], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class GetResult:
    """What a ranged GET delivered.

    :nbytes: bytes passed to the sink.
    :object_crc64: the whole object's CRC-64 when the answer carried it (OSS
        sends ``x-oss-hash-crc64ecma`` for the whole object even on a ranged GET).
    """

    nbytes: int
    object_crc64: int | None = None


class ObjectClient(Protocol):
    """What the rest of ossfs needs from an object store."""

    stats: ClientStats

    async def head(self, bucket: str, key: str) -> ObjectMeta: ...

    async def get_range(
        self, bucket: str, key: str, start: int, end: int, etag: str | None, sink: Sink
    ) -> GetResult: ...

    async def list_page(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        continuation_token: str | None = None,
        max_keys: int = 1000,
    ) -> ListPage: ...

    async def aclose(self) -> None: ...


class CredentialSource(Protocol):
    """Credentials that may change while the client runs (`ossfs.refresh`)."""

    async def get(self) -> Credentials: ...

    def refused(self, credentials: Credentials) -> bool:
        """The service said *credentials* have expired: True when the request
        should be sent again with the ones `get` gives next."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Transport settings.

    :connections: size of the connection pool (the global concurrency).
    :attempts: tries per request that deliver nothing, the first one included.
    :progress_retries: further tries a GET earns by delivering bytes (a
        transfer that keeps breaking but moves resumes at once, this often).
    :backoff_base / backoff_max: seconds; the n-th retry sleeps a random time
        in ``[0, min(backoff_max, backoff_base * 2**n))`` ("full jitter").
    :stall_timeout: seconds without a byte before a transfer counts as stalled.
    :connect_timeout: seconds to open a connection.
    :timeout: seconds a request (its whole retry cycle) may take, plus one
        second per ``min_speed`` bytes it received.
    :min_speed: bytes per second that earn a request more time (0: none).
    :max_list_bytes: the largest listing page accepted (bytes of XML).
    :rate_limit: bytes per second for all transfers together, or None.
    """

    connections: int = 16
    attempts: int = 6
    progress_retries: int = 20
    backoff_base: float = 0.2
    backoff_max: float = 8.0
    stall_timeout: float = 30.0
    connect_timeout: float = 10.0
    timeout: float = 60.0
    min_speed: int = 64 * 1024
    max_list_bytes: int = 8 << 20
    rate_limit: int | None = None


@dataclass(slots=True)
class ClientStats:
    """Counters a test or `ossfs status` can read."""

    requests: int = 0
    retries: int = 0
    errors: int = 0
    bytes_received: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    # (kind, status) -> answers; kind is head, get or list; status 0: no answer
    # (the connection failed).
    by_kind: dict[tuple[str, int], int] = field(default_factory=dict)
    gets_in_flight: int = 0  # get_range calls running (each holds a connection or waits)

    def as_dict(self) -> dict[str, object]:
        kinds: dict[str, dict[str, int]] = {}
        for (kind, status), n in sorted(self.by_kind.items()):
            kinds.setdefault(kind, {})[str(status)] = n
        return {
            "requests": self.requests,
            "retries": self.retries,
            "errors": self.errors,
            "bytes_received": self.bytes_received,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_kind": kinds,
            "gets_in_flight": self.gets_in_flight,
        }


class RateLimiter:
    """A token bucket shared by every transfer of one client (bytes per second).

    Time is trio's clock (so a test's mock clock drives it); the bucket starts
    full at its first use.
    """

    def __init__(self, rate: int, *, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst or max(rate // 4, 64 * 1024)
        self._tokens = float(self.burst)
        self._stamp: float | None = None
        self._lock = trio.Lock()

    async def consume(self, n: int) -> None:
        async with self._lock:
            now = trio.current_time()
            if self._stamp is not None:
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                await trio.sleep(-self._tokens / self.rate)


class _Retryable(Exception):
    """An attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, *, received: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.received = received


class _Cycle:
    """The retry cycle of one request: its attempts, and a deadline that moves.

    ``scope`` is entered around the whole cycle; its deadline starts at
    ``timeout`` seconds from now and moves later as bytes arrive (`earn`) and
    while the caller's own code runs (`paused`).
    """

    def __init__(self, config: ClientConfig, what: str) -> None:
        self.config = config
        self.what = what
        self.started = trio.current_time()
        self.scope = trio.CancelScope(deadline=self.started + config.timeout)
        self.attempts = 0  # requests sent
        self.failures = 0  # consecutive attempts that delivered nothing
        self.resumed = 0  # retries earned by delivering bytes
        self.received = 0
        self.last = ""
        self.signed_with: Credentials | None = None  # the credentials of the last attempt

    @property
    def kind(self) -> str:
        """The request's kind for the counters: head, get or list."""
        return self.what.split(" ", 1)[0].lower()

    def earn(self, nbytes: int) -> None:
        self.received += nbytes
        if self.config.min_speed > 0:
            self.scope.deadline += nbytes / self.config.min_speed

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the clock while our side (a sink, the rate limiter) holds the transfer."""
        saved = self.scope.deadline
        self.scope.deadline = math.inf
        began = trio.current_time()
        try:
            yield
        finally:
            self.scope.deadline = saved + (trio.current_time() - began)

    def fits(self, delay: float) -> bool:
        """Whether sleeping *delay* seconds leaves the deadline ahead."""
        return trio.current_time() + delay < self.scope.deadline

    def gave_up(self, why: str) -> GaveUpError:
        elapsed = trio.current_time() - self.started
        timed_out = self.scope.cancelled_caught or why == "deadline"
        last = self.last or "no answer"
        if self.scope.cancelled_caught:
            last = f"attempt {self.attempts} was still waiting for the server" + (
                f"; before that: {self.last}" if self.last else ""
            )
        if timed_out:
            limit = f"{self.config.timeout:g}s"
            if self.received and self.config.min_speed > 0:
                limit += (
                    f" + {self.received / self.config.min_speed:.0f}s earned by "
                    f"{self.received} bytes"
                )
            text = (
                f"{self.what} timed out after {elapsed:.1f}s and {self.attempts} "
                f"attempt{'s' if self.attempts != 1 else ''} (limit {limit}): {last}"
            )
        else:
            text = (
                f"{self.what} failed after {self.attempts} "
                f"attempt{'s' if self.attempts != 1 else ''}"
            )
            if self.resumed:
                text += f" ({self.resumed} of them resumed a transfer that had moved)"
            text += f": {last}"
        return GaveUpError(text, attempts=self.attempts, elapsed=elapsed, timed_out=timed_out)


_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# The most of an error document ever read; the rest is not waited for.
_ERROR_BODY_LIMIT = 64 * 1024
# Error codes meaning "this temporary key has expired" (OSS, S3).
EXPIRED_CODES = frozenset({"SecurityTokenExpired", "ExpiredToken"})
_USER_AGENT = f"ossfs/{__version__}"
_NETWORK_ERRORS = (httpx.TransportError, trio.BrokenResourceError, OSError)


class HttpObjectClient:
    """`ObjectClient` over HTTP(S) with httpx on trio."""

    def __init__(
        self,
        endpoint: proto.Endpoint,
        config: ClientConfig | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        credentials: CredentialSource | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.credentials = credentials
        self._signed: tuple[Credentials, proto.Endpoint] | None = None
        self.config = config or ClientConfig()
        self.stats = ClientStats()
        self._clock = clock
        self._limiter = RateLimiter(self.config.rate_limit) if self.config.rate_limit else None
        n = max(1, self.config.connections)
        # One trust store for both stacks: the system's CA bundle, or the one named
        # by SSL_CERT_FILE / SSL_CERT_DIR.
        tls = _tls_context() if endpoint.scheme == "https" else None
        self._pool: wire.Pool | None = None
        if not _proxied(endpoint.url):
            self._pool = wire.Pool(
                endpoint.url,
                max_idle=n,
                connect_timeout=self.config.connect_timeout,
                stall=self.config.stall_timeout,
                ssl_context=tls,
            )
        self._http = httpx.AsyncClient(
            verify=tls if tls is not None else True,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            timeout=httpx.Timeout(
                connect=self.config.connect_timeout,
                read=self.config.stall_timeout,
                write=self.config.stall_timeout,
                pool=None,  # waiting for a pooled connection is not a failure
            ),
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
            transport=transport,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        if self.credentials is not None:
            await self.credentials.aclose()
        if self._pool is not None:
            await self._pool.aclose()
        await self._http.aclose()

    async def __aenter__(self) -> HttpObjectClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------- retry loop

    async def _backoff(self, cycle: _Cycle) -> bool:
        """Sleep before the next attempt; False when that would pass the deadline."""
        n = cycle.failures - 1
        delay = random.uniform(0, min(self.config.backoff_max, self.config.backoff_base * 2**n))
        if not cycle.fits(delay):
            return False
        self.stats.retries += 1
        log.info(
            "retrying %s in %.2fs (attempt %d of %d): %s",
            cycle.what,
            delay,
            cycle.failures + 1,
            self.config.attempts,
            cycle.last,
        )
        await trio.sleep(delay)
        return True

    def _count(self, status: int, kind: str = "get") -> None:
        stats = self.stats
        stats.requests += 1
        stats.by_status[status] = stats.by_status.get(status, 0) + 1
        stats.by_kind[kind, status] = stats.by_kind.get((kind, status), 0) + 1

    @property
    def buffered_bytes(self) -> int:
        """Memory held by the receive buffers of the open data connections."""
        return self._pool.buffered_bytes if self._pool is not None else 0

    def _give_up(self, cycle: _Cycle, why: str) -> GaveUpError:
        self.stats.errors += 1
        return cycle.gave_up(why)

    async def _signing_endpoint(self, cycle: _Cycle | None = None) -> proto.Endpoint:
        """The endpoint with the credentials to sign the next attempt with."""
        if self.credentials is None:
            return self.endpoint
        creds = await self.credentials.get()
        if cycle is not None:
            cycle.signed_with = creds
        if self._signed is None or self._signed[0] is not creds:
            self._signed = (creds, dataclasses.replace(self.endpoint, credentials=creds))
        return self._signed[1]

    async def _simple(
        self,
        what: str,
        build: Callable[[proto.Endpoint], proto.HttpRequest],
        resource: str,
        *,
        body_limit: int = 0,
    ) -> tuple[int, httpx.Headers, bytes]:
        """Send a request whose answer body is small, retrying what can be retried.

        Returns status, headers and body of a 2xx answer. A body longer than
        *body_limit* is an error (a listing page that does not end).
        """
        cycle = _Cycle(self.config, what)
        why: str | None = "attempts"
        with cycle.scope:
            while True:
                cycle.attempts += 1
                req = build(await self._signing_endpoint(cycle))
                try:
                    answer = await self._simple_once(req, cycle, resource, body_limit)
                except _Retryable as e:
                    cycle.last = e.reason
                except AccessError as e:
                    if not self._expired_and_renewable(e, cycle):
                        raise
                    cycle.last = str(e)
                else:
                    return answer
                why = await self._failed_attempt(cycle)
                if why is not None:
                    break
        raise self._give_up(cycle, why or "attempts")

    async def _simple_once(
        self, req: proto.HttpRequest, cycle: _Cycle, resource: str, body_limit: int
    ) -> tuple[int, httpx.Headers, bytes]:
        try:
            async with self._http.stream(req.method, req.url, headers=req.headers) as resp:
                status = resp.status_code
                self._count(status, cycle.kind)
                ok = status < 300
                limit = body_limit if ok else _ERROR_BODY_LIMIT
                body, whole = await _read_capped(resp, limit, cycle)
        except _NETWORK_ERRORS as e:
            self._count(0, cycle.kind)
            untrusted = wire.certificate_problem(e)
            if untrusted is not None:
                self.stats.errors += 1
                raise TransferError(f"{cycle.what}: {untrusted}") from None
            raise _Retryable(_describe_network_error(e)) from e
        if ok:
            if not whole:
                self.stats.errors += 1
                raise ServiceError(
                    status,
                    "ListingTooLarge",
                    f"the answer is longer than {body_limit} bytes; a listing "
                    "page is never that long",
                    _request_id(resp.headers),
                    resource=resource,
                )
            return status, resp.headers, body
        err = proto.error_from_response(status, resp.headers, body, resource=resource)
        if status not in _RETRY_STATUS:
            if not isinstance(err, NotFoundError):
                # A miss is an answer (lookups probe for names), not a failure.
                self.stats.errors += 1
            raise err
        raise _Retryable(str(err))

    # -------------------------------------------------------------- operations

    def _resource(self, bucket: str, key: str | None = None) -> str:
        return object_url(self.endpoint.dialect, bucket, key or "")

    async def head(self, bucket: str, key: str) -> ObjectMeta:
        resource = self._resource(bucket, key)
        _, headers, _ = await self._simple(
            f"HEAD {resource}",
            lambda ep: proto.build_head(ep, bucket, key, now=self._clock()),
            resource,
        )
        try:
            return proto.meta_from_head(key, headers)
        except ValueError as e:
            self.stats.errors += 1
            raise ServiceError(200, "MalformedHead", str(e), _request_id(headers)) from e

    async def list_page(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        continuation_token: str | None = None,
        max_keys: int = 1000,
    ) -> ListPage:
        resource = self._resource(bucket) + prefix
        status, headers, body = await self._simple(
            f"LIST {resource}",
            lambda ep: proto.build_list(
                ep,
                bucket,
                prefix=prefix,
                delimiter=delimiter,
                continuation_token=continuation_token,
                max_keys=max_keys,
                now=self._clock(),
            ),
            self._resource(bucket),
            body_limit=self.config.max_list_bytes,
        )
        try:
            return parse_list_objects_v2(body)
        except XmlError as e:
            self.stats.errors += 1
            raise ServiceError(status, "MalformedListing", str(e), _request_id(headers)) from e

    async def get_range(
        self, bucket: str, key: str, start: int, end: int, etag: str | None, sink: Sink
    ) -> GetResult:
        """Stream object bytes ``[start, end)`` into *sink*.

        Every byte reaches the sink once and in order, also across retries:
        after a broken transfer the next attempt asks only for what is missing.
        The call returns only when all ``end - start`` bytes were delivered.
        """
        resource = self._resource(bucket, key)
        cycle = _Cycle(self.config, f"GET {resource} bytes {start}-{end - 1}")
        pos = start
        why: str | None = "attempts"
        self.stats.gets_in_flight += 1
        with _counted_out(self.stats), cycle.scope:
            while True:
                cycle.attempts += 1
                before = pos
                try:
                    pos, crc = await self._get_once(
                        bucket, key, pos, end, etag, sink, resource, cycle
                    )
                    return GetResult(pos - start, crc)
                except _Retryable as e:
                    pos = before + e.received
                    cycle.last = e.reason
                    if pos >= end:
                        # Every byte arrived; what broke came after the body (a chunked
                        # answer's last lines). Nothing is left to ask for.
                        log.debug("%s: %s after the whole body", cycle.what, e.reason)
                        return GetResult(pos - start, None)
                except AccessError as e:
                    if not self._expired_and_renewable(e, cycle):
                        raise
                    cycle.last = str(e)
                if cycle.attempts >= self.config.attempts + self.config.progress_retries:
                    break  # the hard cap, however the attempts went
                if pos > before and cycle.resumed < self.config.progress_retries:
                    # The transfer moves: resume at once from the first missing byte.
                    # Such retries do not use up the attempts, but they are counted too.
                    cycle.failures = 0
                    cycle.resumed += 1
                    self.stats.retries += 1
                    log.info("resuming %s at byte %d: %s", cycle.what, pos, cycle.last)
                    continue
                why = await self._failed_attempt(cycle)
                if why is not None:
                    break
        raise self._give_up(cycle, why or "attempts")

    def _expired_and_renewable(self, err: AccessError, cycle: _Cycle) -> bool:
        """Whether *err* says the temporary credentials the attempt was signed with
        have expired, and the source set them aside so the next attempt gets new
        ones. The service's clock decides: a key may be refused a moment before
        our clock reaches its expiration, or when the clocks differ."""
        if err.code not in EXPIRED_CODES or self.credentials is None:
            return False
        signed = cycle.signed_with
        return signed is not None and self.credentials.refused(signed)

    async def _failed_attempt(self, cycle: _Cycle) -> str | None:
        """Count an attempt that failed; why the cycle ends now, or None to try again."""
        cycle.failures += 1
        if cycle.failures >= self.config.attempts:
            return "attempts"
        if not await self._backoff(cycle):
            return "deadline"
        return None

    async def _get_once(
        self,
        bucket: str,
        key: str,
        start: int,
        end: int,
        etag: str | None,
        sink: Sink,
        resource: str,
        cycle: _Cycle,
    ) -> tuple[int, int | None]:
        """One GET of ``[start, end)``: the position reached and the CRC-64 the answer
        carried (of the whole object, x-oss-hash-crc64ecma), if any."""
        traffic = self.config.rate_limit * 8 if self.config.rate_limit else None
        req = proto.build_get(
            await self._signing_endpoint(cycle),
            bucket,
            key,
            start=start,
            end=end,
            etag=etag,
            now=self._clock(),
            traffic_limit=traffic,
        )
        pos = start

        async def deliver(data: memoryview) -> None:
            nonlocal pos
            if pos + len(data) > end:
                # Not read any further: such a body may never end.
                raise _Retryable("server sent more bytes than asked", received=pos - start)
            with cycle.paused():
                if self._limiter is not None:
                    await self._limiter.consume(len(data))
                result = sink(pos, data)
                if result is not None:
                    await result
            pos += len(data)
            self.stats.bytes_received += len(data)
            cycle.earn(len(data))

        if self._pool is not None:
            crc = await self._get_wire(req, start, end, resource, deliver, lambda: pos - start)
        else:
            crc = await self._get_httpx(
                req, start, end, resource, deliver, lambda: pos - start, cycle
            )
        if pos < end:
            raise _Retryable(
                f"body ended after {pos - start} of {end - start} bytes", received=pos - start
            )
        return pos, crc

    def _check_answer(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes | None,
        start: int,
        end: int,
        resource: str,
    ) -> int | None:
        """Raise for anything but a 206 covering exactly ``[start, end)``; return the
        object's CRC-64 when the answer carries it.

        *body* is the error document, read only when `_reads_error_body` says so.
        """
        request_id = headers.get("x-oss-request-id") or headers.get("x-amz-request-id")
        if status != 206:
            if status == 200:
                raise ServiceError(
                    200,
                    "RangeIgnored",
                    "the server answered 200 with the whole object to a ranged GET",
                    request_id,
                    resource=resource,
                )
            err = proto.error_from_response(status, headers, body or b"", resource=resource)
            if status in _RETRY_STATUS:
                raise _Retryable(str(err))
            self.stats.errors += 1
            raise err
        problem = proto.check_content_range(headers, start, end)
        length = headers.get("content-length")
        if problem is None and length is not None and length.strip() != str(end - start):
            problem = (
                f"Content-Length {length[:40]!r} does not match the requested {end - start} bytes"
            )
        if problem:
            self.stats.errors += 1
            raise ServiceError(206, "BadContentRange", problem, request_id, resource=resource)
        crc = headers.get("x-oss-hash-crc64ecma")
        return int(crc) if crc and crc.isdigit() else None

    async def _get_wire(
        self,
        req: proto.HttpRequest,
        start: int,
        end: int,
        resource: str,
        deliver: Callable[[memoryview], Awaitable[None]],
        received: Callable[[], int],
    ) -> int | None:
        """`_get_once` over the own HTTP/1.1 pool; the answer's CRC-64, if any."""
        parts = urlsplit(req.url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = list(req.headers.items())
        if not any(k.lower() == "host" for k, _ in headers):  # S3 signing sets it already
            headers.insert(0, ("Host", parts.netloc))
        headers += [("User-Agent", _USER_AGENT), ("Accept-Encoding", "identity")]
        host = parts.hostname or ""
        try:
            try:
                return await self._exchange(
                    host, req.method, target, headers, start, end, resource, deliver, stale_ok=True
                )
            except _StaleConnection:
                # The server had closed an idle connection: not a failure; once more.
                return await self._exchange(
                    host, req.method, target, headers, start, end, resource, deliver, stale_ok=False
                )
        except wire.WireError as e:
            if e.fatal:
                self.stats.errors += 1
                raise TransferError(f"GET {resource}: {e.reason}") from None
            raise _Retryable(e.reason, received=received()) from e

    async def _exchange(
        self,
        host: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        start: int,
        end: int,
        resource: str,
        deliver: Callable[[memoryview], Awaitable[None]],
        *,
        stale_ok: bool,
    ) -> int | None:
        """One request and its answer on one connection of the pool.

        *stale_ok*: a pooled connection that fails before the answer's head raises
        `_StaleConnection` (the server closed it while it was idle).
        """
        assert self._pool is not None
        async with self._pool.connection(host) as conn:
            try:
                await conn.send(method, target, headers)
                head = await conn.read_head()
            except wire.WireError:
                if conn.from_pool and stale_ok:
                    conn.reusable = False
                    raise _StaleConnection() from None
                raise
            self._count(head.status)
            if not head.keep_alive:
                conn.reusable = False
            body = (
                await conn.read_all(head, limit=_ERROR_BODY_LIMIT)
                if _reads_error_body(head.status)
                else None
            )
            # Raising leaves any body unread, and the pool closes the connection.
            crc = self._check_answer(head.status, head.headers, body, start, end, resource)
            await conn.read_body(head, lambda _done, data: deliver(data))
            return crc

    async def _get_httpx(
        self,
        req: proto.HttpRequest,
        start: int,
        end: int,
        resource: str,
        deliver: Callable[[memoryview], Awaitable[None]],
        received: Callable[[], int],
        cycle: _Cycle,
    ) -> int | None:
        """`_get_once` through httpx (behind a proxy); the answer's CRC-64, if any."""
        try:
            async with self._http.stream(req.method, req.url, headers=req.headers) as resp:
                self._count(resp.status_code)
                body = None
                if _reads_error_body(resp.status_code):
                    body, _ = await _read_capped(resp, _ERROR_BODY_LIMIT, cycle)
                crc = self._check_answer(resp.status_code, resp.headers, body, start, end, resource)
                async for chunk in resp.aiter_raw():
                    await deliver(memoryview(chunk))
                return crc
        except _NETWORK_ERRORS as e:
            raise _Retryable(_describe_network_error(e), received=received()) from e


def _reads_error_body(status: int) -> bool:
    """Whether the body of an answer to a ranged GET is read before it is judged: only
    an error's (capped), never the 206 that carries the range (it is the data) nor a
    200 that carries the whole object (never read, it may be endless)."""
    return status not in (200, 206)


async def _read_capped(resp: httpx.Response, limit: int, cycle: _Cycle) -> tuple[bytes, bool]:
    """At most *limit* bytes of a streamed body, and whether that was all of it."""
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_bytes():
        cycle.earn(len(chunk))
        take = min(len(chunk), limit - size)
        parts.append(chunk[:take])
        size += take
        if take < len(chunk):
            return b"".join(parts), False  # the rest is left unread; the connection closes
    return b"".join(parts), True


def _request_id(headers: Mapping[str, str]) -> str | None:
    return headers.get("x-oss-request-id") or headers.get("x-amz-request-id")


@contextmanager
def _counted_out(stats: ClientStats) -> Iterator[None]:
    """Take one off ``gets_in_flight`` when the block ends, however it ends."""
    try:
        yield
    finally:
        stats.gets_in_flight -= 1


class _StaleConnection(Exception):
    """A pooled connection turned out to be closed by the server."""


def _tls_context() -> ssl.SSLContext:
    """Verify servers against SSL_CERT_FILE / SSL_CERT_DIR when set, else the system store."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    return ssl.create_default_context(cafile=cafile, capath=capath)


def _proxied(url: str) -> bool:
    """Whether the environment routes *url* through a proxy (then httpx carries GETs)."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


def _describe_network_error(e: BaseException) -> str:
    if isinstance(e, httpx.ReadTimeout):
        return "stalled: no data within the stall timeout"
    if isinstance(e, httpx.ConnectTimeout):
        return "connect timed out"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect: {e}" if str(e) else "cannot connect"
    if isinstance(e, httpx.RemoteProtocolError):
        return f"connection broken: {e}" if str(e) else "connection broken"
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if not isinstance(e, httpx.HTTPError) else text
