"""An OSS-dialect object server for tests and benchmarks, with fault injection.

`OssTestServer` serves path-style requests (``/BUCKET/KEY``) on 127.0.0.1 from
the standard library's threading HTTP server, HTTP/1.1 with keep-alive, one
thread per connection:

- ``HEAD``/``GET`` of objects, with single ranges (``bytes=a-b``, ``a-``,
  ``-n``; of several ranges only the first) in both OSS range behaviours
  (``x-oss-range-behavior: standard``: clamp the end, 416 past the end;
  without it: a range that does not fit is ignored and the whole object
  comes back with 200), ``If-Match``, ``If-None-Match``,
  ``If-(Un)Modified-Since``;
- ListObjectsV2 (``list-type=2``) and ListObjects V1 on ``/BUCKET/``;
- OSS error documents, and for HEAD (no body) the base64 ``x-oss-err``
  header; every answer has a unique ``x-oss-request-id``;
- OSS V1 and V4 header signatures checked with
  `ossfs.protocol.signing.check_oss_signature` when credentials are given;
  temporary keys (`add_key` with a session token and an expiration) also
  need the matching ``x-oss-security-token`` and are refused once expired;
- PUT, POST, DELETE ... answer 405: the server is read-only on the wire and
  filled through its Python API (``put``, ``add_directory_bucket``).

Buckets live in memory or are directories on disk (see `ossfs.testing.objects`);
faults are set on ``server.faults`` (see `ossfs.testing.faults`) and counters
read from ``server.stats`` (see `ossfs.testing.stats`).

Bodies go out with ``os.sendfile`` (directory buckets) or large ``send``
slices of the stored bytes (memory buckets). A bandwidth cap paces each body
in chunks of about 20 ms worth of bytes, sleeping until the moment the chunk
would have finished at that rate, so the long-run rate is exact whatever the
chunk size and there is no syscall per few kilobytes.

Must not import: trio, httpx (tests use httpx against it from outside;
nothing here may depend on the client stack under test).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import logging
import os
import re
import secrets
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, cast
from urllib.parse import unquote, unquote_plus, urlsplit
from xml.sax.saxutils import escape

from ossfs.model import ObjectMeta
from ossfs.protocol.ops import Endpoint
from ossfs.protocol.signing import Credentials, SignatureError, check_oss_signature
from ossfs.protocol.xml import format_iso8601, render_error, render_list_objects
from ossfs.testing.faults import (
    LISTING_KINDS,
    Fault,
    Faults,
    Op,
    RequestInfo,
    default_error_code,
)
from ossfs.testing.objects import (
    INVERT,
    Bucket,
    CrcCache,
    DirectoryBucket,
    FileSource,
    ListResult,
    MemoryBucket,
    MemorySource,
    http_date,
)
from ossfs.testing.stats import GetRecord, Stats, StatsSnapshot

__all__ = [
    "OssTestServer",
    "OssError",
    "SERVER_NAME",
    "parse_range",
    "resolve_range",
]

log = logging.getLogger(__name__)

SERVER_NAME = "ossfs-testing"
DEFAULT_MAX_KEYS = 100
MAX_MAX_KEYS = 1000

# Body sending. Unthrottled, one sendfile/send call may move this much.
_BIG_CHUNK = 64 * 1024 * 1024
# Throttled: chunks of this many seconds' worth of bytes, within bounds.
_PACE_INTERVAL = 0.02
_MIN_PACED_CHUNK = 16 * 1024
_MAX_PACED_CHUNK = 4 * 1024 * 1024
# A body this small goes out in the same write as the headers.
_SMALL_BODY = 64 * 1024
# Request bodies up to this size are read and dropped; bigger ones end the connection.
_MAX_DISCARD = 8 * 1024 * 1024

# Plausible OSS EC values per error code (clients must not rely on them).
_EC: dict[str, str] = {
    "NoSuchKey": "0026-00000001",
    "NoSuchBucket": "0015-00000101",
    "AccessDenied": "0003-00000001",
    "SignatureDoesNotMatch": "0002-00000040",
    "InvalidAccessKeyId": "0002-00000901",
    "RequestTimeTooSkewed": "0002-00000504",
    "InvalidArgument": "0017-00000001",
    "InvalidRange": "0026-00000005",
    "PreconditionFailed": "0026-00000006",
    "MethodNotAllowed": "0031-00000001",
    "InternalError": "0000-00000001",
    "ServiceUnavailable": "0000-00000003",
}

_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*(?:,.*)?", re.IGNORECASE | re.DOTALL)


class OssError(Exception):
    """An error answer: status, OSS code and message (and extra headers)."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class _BodyCut(Exception):
    """The body cannot be finished (the file shrank under us)."""


class _Answered(Exception):
    """The answer is already sent (a 304); stop handling the request."""


# ----------------------------------------------------------------------- pure helpers


def parse_range(header: str | None) -> tuple[int | None, int | None] | None:
    """The first range of a Range header as written, or None if absent or malformed.

    ``bytes=a-b`` -> (a, b); ``bytes=a-`` -> (a, None); ``bytes=-n`` -> (None, n).
    """
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header)
    if not m or not (m.group(1) or m.group(2)):
        return None
    first = int(m.group(1)) if m.group(1) else None
    last = int(m.group(2)) if m.group(2) else None
    if first is not None and last is not None and last < first:
        return None
    return first, last


def resolve_range(
    spec: tuple[int | None, int | None] | None, size: int, *, standard: bool
) -> tuple[int, int, bool] | None:
    """What to answer: ``(start, end_exclusive, partial)``, or None for 416.

    *standard* is OSS's ``x-oss-range-behavior: standard``: the end is clamped
    and a range that starts past the end (or any range of an empty object) is
    unsatisfiable. Without it OSS ignores every range that does not fit
    entirely and sends the whole object with 200.
    """
    if spec is None:
        return 0, size, False
    first, last = spec
    if first is None:
        n = last or 0
        if standard:
            if n == 0 or size == 0:
                return None
            return max(0, size - n), size, True
        if 0 < n <= size:
            return size - n, size, True
        return 0, size, False
    if standard:
        if first >= size:
            return None
        return first, size if last is None else min(last + 1, size), True
    if first >= size or (last is not None and last >= size):
        return 0, size, False
    return first, size if last is None else last + 1, True


def _etag_matches(header: str, etag: str) -> bool:
    for item in header.split(","):
        item = item.strip()
        if item == "*":
            return True
        if item.startswith("W/"):
            item = item[2:]
        if item.strip('"') == etag:
            return True
    return False


def _parse_http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _precondition(headers: Mapping[str, str], meta: ObjectMeta) -> int | None:
    """412, 304 or None, in the order RFC 9110 section 13.2.2 evaluates them."""
    if_match = headers.get("if-match")
    if if_match is not None:
        if not _etag_matches(if_match, meta.etag):
            return 412
    else:
        since = _parse_http_date(headers.get("if-unmodified-since", ""))
        if since is not None and meta.mtime > since:
            return 412
    if_none = headers.get("if-none-match")
    if if_none is not None:
        if _etag_matches(if_none, meta.etag):
            return 304
    else:
        since = _parse_http_date(headers.get("if-modified-since", ""))
        if since is not None and meta.mtime <= since:
            return 304
    return None


def _parse_query(qs: str) -> list[tuple[str, str | None]]:
    """Decoded query in URL order; a bare ``name`` (no ``=``) has value None."""
    out: list[tuple[str, str | None]] = []
    for part in qs.split("&"):
        if not part:
            continue
        name, eq, value = part.partition("=")
        out.append((unquote_plus(name), unquote_plus(value) if eq else None))
    return out


def _split_path(path: str) -> tuple[str | None, str | None]:
    """``/b/k`` -> (b, k); ``/b`` and ``/b/`` -> (b, None); ``/`` -> (None, None)."""
    bucket, _, key = path[1:].partition("/")
    return (bucket or None), (key or None) if bucket else None


def _classify(method: str, bucket: str | None, key: str | None) -> Op:
    if bucket is not None and key is not None and method in ("GET", "HEAD"):
        return "get" if method == "GET" else "head"
    if bucket is not None and key is None and method == "GET":
        return "list"
    return "other"


def _encode_token(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    try:
        padded = token + "=" * (-len(token) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise OssError(
            400, "InvalidArgument", "The continuation token provided is incorrect."
        ) from e


_ENDLESS_MTIME = 1_700_000_000.0


def _endless_page(prefix: str, after: str | None, max_keys: int) -> ListResult:
    """A page of the made-up listing that never ends (the ``endless_listing`` fault)."""
    base = prefix + "endless-"
    first = 1
    if after and after.startswith(base) and after[len(base) :].isdigit():
        first = int(after[len(base) :]) + 1
    keys = [f"{base}{n:012d}" for n in range(first, first + max(1, max_keys))]
    objects = tuple(ObjectMeta(k, 1, "0" * 32, _ENDLESS_MTIME) for k in keys)
    return ListResult(objects, (), keys[-1])


def _object_headers(meta: ObjectMeta) -> list[tuple[str, str]]:
    headers = [
        ("ETag", f'"{meta.etag}"'),
        ("Last-Modified", http_date(meta.mtime)),
        ("Accept-Ranges", "bytes"),
        ("Content-Type", "application/octet-stream"),
        ("x-oss-object-type", meta.object_type or "Normal"),
        ("x-oss-storage-class", meta.storage_class or "Standard"),
    ]
    if meta.crc64 is not None:
        headers.append(("x-oss-hash-crc64ecma", str(meta.crc64)))
    return headers


class _Pacer:
    """Paces one body to ``faults.bandwidth`` and counts what was sent."""

    def __init__(self, faults: Faults, stopping: threading.Event) -> None:
        self._faults = faults
        self._stopping = stopping
        self.sent = 0
        self._rate: float | None = None
        self._t0 = 0.0
        self._base = 0

    def chunk(self) -> int:
        rate = self._faults.bandwidth
        if not rate or rate <= 0:
            return _BIG_CHUNK
        return int(min(max(rate * _PACE_INTERVAL, _MIN_PACED_CHUNK), _MAX_PACED_CHUNK))

    def wait(self, n: int) -> None:
        """Sleep until *n* more bytes may be sent."""
        rate = self._faults.bandwidth
        if not rate or rate <= 0:
            self._rate = None
            return
        now = time.monotonic()
        if rate != self._rate:
            # A new (or changed) cap starts its own schedule from here.
            self._rate, self._t0, self._base = rate, now, self.sent
        # Aim at the moment these bytes would have *finished* at the capped
        # rate: the long-run rate is then exact, not one chunk ahead.
        delay = self._t0 + (self.sent + n - self._base) / rate - now
        if delay > 0:
            self._stopping.wait(delay)


# ---------------------------------------------------------------------------- handler


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Sixteen clients connecting at once must not overflow the accept queue
    # (a dropped SYN costs a one-second retransmit).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: OssTestServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.owner.tls is not None:
            # The handshake happens on the first read, in the connection's own thread.
            sock = self.owner.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can
        # wait on DNS; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("connection from %s ended: %s", client_address, exc)
        else:
            log.error("error serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; Nagle would hold the
    # second one back for an ACK.
    disable_nagle_algorithm = True

    # Per-request state, set by _serve.
    _rid = ""
    _status = 0
    _pacer: _Pacer | None = None
    _record: dict[str, Any] | None = None

    # --------------------------------------------------------------- plumbing

    @property
    def _owner(self) -> OssTestServer:
        return cast(_HttpServer, self.server).owner

    def setup(self) -> None:
        super().setup()
        self._owner._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._owner._untrack(self.connection)

    def version_string(self) -> str:
        return SERVER_NAME

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_GET
    do_PUT = do_GET
    do_POST = do_GET
    do_DELETE = do_GET
    do_PATCH = do_GET
    do_OPTIONS = do_GET

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        """Status line and headers, as bytes to send."""
        self._status = status
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        lines = [
            f"{self.protocol_version} {status} {reason}",
            f"Server: {SERVER_NAME}",
            f"Date: {self.date_time_string()}",
            f"x-oss-request-id: {self._rid}",
        ]
        lines.extend(f"{k}: {v}" for k, v in headers)
        if self.close_connection:
            lines.append("Connection: close")
        self.log_request(status)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    # ------------------------------------------------------------ the request

    def _serve(self) -> None:
        owner = self._owner
        method = self.command
        self._rid = owner._next_request_id()
        self._status = 0
        self._pacer = None
        split = urlsplit(self.path)
        bucket, key = _split_path(unquote(split.path))
        query = _parse_query(split.query)
        headers = {k.lower(): v for k, v in self.headers.items()}
        op = _classify(method, bucket, key)
        info = RequestInfo(method, op, bucket, key, tuple(query), headers)
        owner._stats.request(method, op)
        self._record = None
        if op == "get":
            spec = parse_range(headers.get("range"))
            self._record = {
                "bucket": bucket,
                "key": key,
                "range": headers.get("range"),
                "req_start": spec[0] if spec else None,
                "req_end": spec[1] if spec else None,
                "start": 0,
                "end": 0,
                "fault": None,
            }
        try:
            self._discard_body(headers)
            latency = owner.faults.latency
            if latency > 0:
                owner._stopping.wait(latency)
            try:
                self._dispatch(info, query)
            except OssError as e:
                self._send_error(e)
            except _Answered:
                pass
        except (OSError, _BodyCut) as e:
            log.debug("%s %s: answer cut short: %s", method, self.path, e)
            self.close_connection = True
        finally:
            if self._record is not None:
                sent = self._pacer.sent if self._pacer is not None else 0
                owner._stats.get(GetRecord(status=self._status, bytes_sent=sent, **self._record))

    def _discard_body(self, headers: Mapping[str, str]) -> None:
        """Read away a request body (nothing here uses one).

        Closing a socket with unread input makes the kernel send RST, which
        can destroy the answer before the client reads it; so a small body is
        read and dropped, and only a big or chunked one ends the connection.
        """
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if "transfer-encoding" in headers or not 0 <= length <= _MAX_DISCARD:
            self.close_connection = True
        elif length:
            self.rfile.read(length)

    def _dispatch(self, info: RequestInfo, query: list[tuple[str, str | None]]) -> None:
        owner = self._owner
        if info.method not in ("GET", "HEAD"):
            raise OssError(
                405,
                "MethodNotAllowed",
                "The specified method is not allowed "
                "against this resource (the test server is read-only).",
            )
        owner._authorize(info, query)
        status = owner.faults.random_error(info)
        if status is not None:
            raise OssError(status, default_error_code(status), "Injected random error.")
        fault = owner.faults.take(info, body=False)
        if fault is not None:
            raise OssError(
                fault.status, fault.error_code, fault.message or f"Injected {fault.status} fault."
            )
        if info.bucket is None:
            self._list_buckets()
        elif info.key is None:
            self._bucket_request(info, query)
        else:
            self._object_request(info)

    def _send_error(self, e: OssError) -> None:
        ec = _EC.get(e.code, "0000-00000000")
        body = render_error(
            code=e.code,
            message=e.message,
            request_id=self._rid,
            host=self.headers.get("host", "127.0.0.1"),
            ec=ec,
        )
        headers = [("Content-Type", "application/xml"), ("x-oss-ec", ec), *e.headers]
        if self.command == "HEAD":
            # A HEAD answer has no body: OSS puts the error document, base64,
            # in a header instead.
            headers += [("x-oss-err", base64.b64encode(body).decode()), ("Content-Length", "0")]
            self.connection.sendall(self._head(e.status, headers))
        else:
            headers.append(("Content-Length", str(len(body))))
            self.connection.sendall(self._head(e.status, headers) + body)

    # ---------------------------------------------------------------- objects

    def _object_request(self, info: RequestInfo) -> None:
        assert info.bucket is not None and info.key is not None
        bucket = self._owner._bucket(info.bucket)
        key = info.key
        no_key = OssError(404, "NoSuchKey", "The specified key does not exist.")
        if info.method == "HEAD":
            meta = bucket.head(key)
            if meta is None:
                raise no_key
            self._check_preconditions(info, meta)
            headers = [*_object_headers(meta), ("Content-Length", str(meta.size))]
            self.connection.sendall(self._head(200, headers))
            return
        obj = bucket.open(key)
        if obj is None:
            raise no_key
        try:
            meta = obj.meta
            self._check_preconditions(info, meta)
            standard = info.headers.get("x-oss-range-behavior", "").lower() == "standard"
            spec = parse_range(info.range)
            answer = resolve_range(spec, meta.size, standard=standard)
            if answer is None:
                raise OssError(
                    416,
                    "InvalidRange",
                    "The requested range cannot be satisfied.",
                    headers=(("Content-Range", f"bytes */{meta.size}"),),
                )
            start, end, partial = answer
            headers = [*_object_headers(meta), ("Content-Length", str(end - start))]
            if partial:
                headers.append(("Content-Range", f"bytes {start}-{end - 1}/{meta.size}"))
            if self._record is not None:
                self._record.update(start=start, end=end)
            fault = self._owner.faults.take(info, body=True)
            if fault is not None and self._record is not None:
                self._record["fault"] = fault.kind
            if fault is not None and fault.kind == "endless":
                self._send_endless(fault, _object_headers(meta), start, end, meta.size, obj.source)
                return

            def replace() -> None:
                new = bucket.replace(key, fault.data if fault is not None else None)
                log.debug("replaced %s/%s: %s", bucket.name, key, new)

            head = self._head(206 if partial else 200, headers)
            self._send_body(head, obj.source, start, end, fault, replace)
        finally:
            obj.close()

    def _check_preconditions(self, info: RequestInfo, meta: ObjectMeta) -> None:
        outcome = _precondition(info.headers, meta)
        if outcome == 412:
            raise OssError(
                412,
                "PreconditionFailed",
                "At least one of the pre-conditions you specified did not hold.",
            )
        if outcome == 304:
            headers = [("ETag", f'"{meta.etag}"'), ("Last-Modified", http_date(meta.mtime))]
            self.connection.sendall(self._head(304, headers))
            raise _Answered

    # ------------------------------------------------------------------ bodies

    def _send_body(
        self,
        head: bytes,
        source: MemorySource | FileSource,
        start: int,
        end: int,
        fault: Fault | None,
        on_replace: Callable[[], None] | None = None,
    ) -> None:
        """Send *head*, then object bytes [start, end) of *source*, applying *fault*."""
        owner = self._owner
        sock = self.connection
        pacer = self._pacer = _Pacer(owner.faults, owner._stopping)
        length = end - start
        if fault is None and length <= _SMALL_BODY and not owner.faults.bandwidth:
            sock.sendall(head + source.read(start, end))
            pacer.sent = length
            return
        sock.sendall(head)

        def send_to(offset: int) -> None:
            """Send the body up to body offset *offset*."""
            self._send_span(source, start + pacer.sent, start + min(offset, length), pacer)

        if fault is None:
            send_to(length)
            return
        after = min(fault.after_bytes, length)
        if fault.kind == "corrupt":
            first = min(fault.offset, length)
            stop = min(first + fault.length, length)
            send_to(first)
            bad = source.read(start + first, start + stop).translate(INVERT)
            pacer.wait(len(bad))
            sock.sendall(bad)
            pacer.sent += len(bad)
            send_to(length)
        elif fault.kind == "replace":
            send_to(after)
            if on_replace is not None:
                on_replace()
            send_to(length)
        elif fault.kind == "stall":
            send_to(after)
            owner._stopping.wait(fault.seconds)
            if fault.then == "continue":
                send_to(length)
            elif fault.then == "trickle":
                self._trickle(source, start + pacer.sent, end, fault.interval, pacer)
            else:
                self._abort(reset=fault.then == "reset")
        else:  # reset, truncate
            send_to(after)
            self._abort(reset=fault.kind == "reset")

    def _send_span(
        self, source: MemorySource | FileSource, pos: int, stop: int, pacer: _Pacer
    ) -> None:
        sock = self.connection
        out = sock.fileno()
        view = memoryview(source.data) if isinstance(source, MemorySource) else None
        fd = source.file.fileno() if isinstance(source, FileSource) else -1
        tls = isinstance(sock, ssl.SSLSocket)  # TLS bytes cannot go through sendfile
        while pos < stop:
            n = min(stop - pos, pacer.chunk())
            pacer.wait(n)
            if view is not None:
                sent = sock.send(view[pos : pos + n])
            elif tls:
                chunk = os.pread(fd, n, pos)
                if not chunk:
                    raise _BodyCut("the file is shorter than when the answer started")
                sock.sendall(chunk)
                sent = len(chunk)
            else:
                sent = os.sendfile(out, fd, pos, n)
                if sent == 0:
                    raise _BodyCut("the file is shorter than when the answer started")
            pos += sent
            pacer.sent += sent

    def _trickle(
        self, source: MemorySource | FileSource, pos: int, stop: int, interval: float, pacer: _Pacer
    ) -> None:
        """Send object bytes [pos, stop) one at a time, *interval* seconds apart."""
        sock = self.connection
        stopping = self._owner._stopping
        while pos < stop and not stopping.wait(interval):
            sock.sendall(source.read(pos, pos + 1))
            pos += 1
            pacer.sent += 1
        if pos < stop:
            self._abort(reset=False)  # the server is stopping

    def _send_endless(
        self,
        fault: Fault,
        headers: list[tuple[str, str]],
        start: int,
        end: int,
        size: int,
        source: MemorySource | FileSource | None,
    ) -> None:
        """Answer ``fault.answer`` with a body that never ends (see `Faults`)."""
        status = fault.answer
        self.close_connection = True  # a close-delimited body ends only with the connection
        pacer = self._pacer = _Pacer(self._owner.faults, self._owner._stopping)
        if status >= 400:
            code = default_error_code(status)
            head = self._head(status, [("Content-Type", "application/xml")])
            prefix = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>'
            ).encode()
            filler = b"endless " * 8192
        elif source is None:  # a listing
            head = self._head(status, [("Content-Type", "application/xml")])
            prefix = (
                b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult>'
                b"<IsTruncated>true</IsTruncated>"
            )
            filler = (
                b"<Contents><Key>endless</Key><Size>1</Size><ETag>&quot;0&quot;</ETag>"
                b"<LastModified>2024-01-01T00:00:00.000Z</LastModified></Contents>"
            ) * 512
        else:
            if status == 206:
                headers = [*headers, ("Content-Range", f"bytes {start}-{end - 1}/{size}")]
                first = start
            else:
                first = 0
            head = self._head(status, headers)
            prefix = b""
            data = source.read(0, min(size, 1 << 20))
            data = data or b"\0"
            piece = data[first % len(data) :] + data[: first % len(data)]
            filler = piece * max(1, (64 * 1024) // len(piece))
        sock = self.connection
        sock.sendall(head + prefix)
        stopping = self._owner._stopping
        while not stopping.is_set():
            pacer.wait(len(filler))
            sock.sendall(filler)
            pacer.sent += len(filler)
        self._abort(reset=False)

    def _abort(self, *, reset: bool) -> None:
        """End the connection now: with an RST (*reset*) or a clean close."""
        self.close_connection = True
        if reset:
            sock = self.connection
            # Linger on with a zero timeout: close() then discards the send
            # queue and sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._owner._untrack(sock)
            # rfile holds a reference to the socket; the descriptor is only
            # closed (and the RST sent) when both are closed.
            self.rfile.close()
            sock.close()

    # ---------------------------------------------------------------- buckets

    def _bucket_request(self, info: RequestInfo, query: list[tuple[str, str | None]]) -> None:
        assert info.bucket is not None
        bucket = self._owner._bucket(info.bucket)
        if info.method == "HEAD":
            self.connection.sendall(self._head(200, [("Content-Length", "0")]))
            return
        params: dict[str, str] = {}
        for name, value in query:
            params.setdefault(name, value or "")
        list_type = params.get("list-type")
        if list_type not in (None, "2"):
            raise OssError(400, "InvalidArgument", f"list-type {list_type!r} is not supported.")
        v2 = list_type == "2"
        raw_max = params.get("max-keys", "")
        if raw_max == "":
            max_keys = DEFAULT_MAX_KEYS
        elif raw_max.isdigit():
            max_keys = min(int(raw_max), MAX_MAX_KEYS)
        else:
            raise OssError(
                400, "InvalidArgument", "Argument max-keys must be an integer between 0 and 1000."
            )
        encoding = params.get("encoding-type") or None
        if encoding not in (None, "url"):
            raise OssError(400, "InvalidArgument", "The encoding-type must be url.")
        prefix = params.get("prefix", "")
        delimiter = params.get("delimiter", "")
        token = params.get("continuation-token") or None
        start_after = params.get("start-after") or None
        marker = params.get("marker") or None
        # V2 resumes after the token (which wins) or start-after; V1 after the marker.
        after = (_decode_token(token) if token else start_after) if v2 else marker
        fault = self._owner.faults.take(info, body=True)
        if fault is not None and fault.kind == "endless":
            self._send_endless(fault, [], 0, 0, 0, None)
            return
        if fault is not None and fault.kind == "keys_repeat":
            after = start_after if v2 else None
        if fault is not None and fault.kind == "endless_listing":
            result = _endless_page(prefix, after, max_keys)
        else:
            result = bucket.list(prefix=prefix, delimiter=delimiter, after=after, max_keys=max_keys)
        next_token = None
        if result.next_after:
            next_token = _encode_token(result.next_after) if v2 else result.next_after
        if fault is not None and fault.kind == "token_loop":
            # Back to where this page started: the same page, for ever. A key
            # is never "\0", so the first page comes again after it.
            next_token = token or (_encode_token("\0") if v2 else "\0")
        elif fault is not None and fault.kind == "keys_repeat":
            # The first page again, under a token never sent before.
            seen = len(_decode_token(token)) if token and v2 else 0
            next_token = _encode_token("\0" * (seen + 1)) if v2 else "\0" * (seen + 1)
        body = render_list_objects(
            bucket=bucket.name,
            prefix=prefix,
            delimiter=delimiter,
            max_keys=max_keys,
            objects=result.objects,
            prefixes=result.prefixes,
            next_token=next_token,
            continuation_token=token,
            start_after=start_after,
            encoding_url=encoding == "url",
            v2=v2,
            marker=marker,
        )
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        if fault is not None and fault.kind in LISTING_KINDS:
            fault = None  # carried out above: the answer itself is well formed
        self._send_body(self._head(200, headers), MemorySource(body), 0, len(body), fault)

    def _list_buckets(self) -> None:
        owner = self._owner
        items = "".join(
            f"<Bucket><Name>{escape(name)}</Name>"
            f"<CreationDate>{format_iso8601(owner._started)}</CreationDate>"
            "<Location>oss-cn-hangzhou</Location><StorageClass>Standard</StorageClass>"
            "</Bucket>"
            for name in owner.buckets()
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<ListAllMyBucketsResult>'
            f"<Owner><ID>{SERVER_NAME}</ID><DisplayName>{SERVER_NAME}</DisplayName></Owner>"
            f"<Buckets>{items}</Buckets></ListAllMyBucketsResult>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        self.connection.sendall(self._head(200, headers) + body)


# ----------------------------------------------------------------------------- server


class OssTestServer:
    """An OSS-dialect server on 127.0.0.1, in a background thread.

    :host, port: where to listen; port 0 picks a free one (see `port`).
    :credentials: access key id -> secret. When given, every signed request
        is verified (OSS V1 or V4 header signatures) and refused with 403
        and the service's code on a mismatch. None: no checks at all.
    :allow_anonymous: with credentials, also serve requests that carry no
        Authorization header (otherwise 403 AccessDenied).
    :crc: send ``x-oss-hash-crc64ecma`` for directory buckets (computed on
        first use and cached); memory objects always have it.
    :faults: the `Faults` to use (default: a new one seeded with *seed*).
    :tls: serve HTTPS with this server-side context (tests of the TLS paths).

    Use as a context manager, or `start` and `stop`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        credentials: Mapping[str, str] | None = None,
        allow_anonymous: bool = False,
        crc: bool = True,
        faults: Faults | None = None,
        seed: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._address = (host, port)
        self.tls = tls
        self.credentials = dict(credentials) if credentials is not None else None
        # access key id -> the session token its requests must carry (temporary keys).
        self.session_tokens: dict[str, str] = {}
        # access key id -> when it stops working (seconds since the epoch).
        self.key_expiry: dict[str, float] = {}
        # access key id -> requests that passed the signature check with it.
        self.keys_used: dict[str, int] = {}
        # The error code of every request refused by the credential check, in order.
        self.refused: list[str] = []
        self.allow_anonymous = allow_anonymous
        self.crc = crc
        self.faults = faults if faults is not None else Faults(seed=seed)
        self._buckets: dict[str, Bucket] = {}
        self._buckets_lock = threading.Lock()
        self._crc_cache = CrcCache()
        self._stats = Stats()
        self._stopping = threading.Event()
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._rid_prefix = secrets.token_hex(4).upper()
        self._rid_counter = itertools.count(1)
        self._started = time.time()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> OssTestServer:
        """Bind and serve in a background thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("the server is already started")
        self._stopping.clear()
        self._httpd = _HttpServer(self._address, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ossfs-testing:{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("OSS test server listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, cut every open connection and wait for the threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._conns_lock:
            conns = dict(self._conns)
        for sock in conns:
            # Wakes threads blocked reading an idle keep-alive connection or
            # writing to a client that stopped reading.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        for thread in conns.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> OssTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return self._address[0]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https://`` when serving TLS)."""
        return f"{'https' if self.tls is not None else 'http'}://{self.host}:{self.port}"

    def endpoint(
        self,
        *,
        signature_version: Literal["v1", "v4"] = "v4",
        region: str = "cn-hangzhou",
        access_key_id: str | None = None,
    ) -> Endpoint:
        """An `Endpoint` for this server (path style), signed with its first key."""
        creds = None
        if self.credentials:
            ak = access_key_id or next(iter(self.credentials))
            creds = Credentials(ak, self.credentials[ak])
        return Endpoint(
            self.url,
            dialect="oss",
            region=region,
            signature_version=signature_version,
            path_style=True,
            credentials=creds,
        )

    # ------------------------------------------------------------------- buckets

    def create_bucket(self, bucket: str) -> None:
        """An empty in-memory bucket (nothing happens if it exists)."""
        with self._buckets_lock:
            self._buckets.setdefault(bucket, MemoryBucket(bucket))

    def add_directory_bucket(
        self, bucket: str, path: str | os.PathLike[str], *, crc: bool | None = None
    ) -> None:
        """Serve the files under *path* as *bucket* (*crc* overrides the server's)."""
        b = DirectoryBucket(
            bucket, os.fspath(path), crc=self.crc if crc is None else crc, crc_cache=self._crc_cache
        )
        with self._buckets_lock:
            if bucket in self._buckets:
                raise ValueError(f"bucket {bucket!r} exists")
            self._buckets[bucket] = b

    def delete_bucket(self, bucket: str) -> None:
        with self._buckets_lock:
            self._buckets.pop(bucket, None)

    def buckets(self) -> list[str]:
        with self._buckets_lock:
            return sorted(self._buckets)

    def rescan(self, bucket: str) -> None:
        """Walk a directory bucket again (listings also do it when a directory changed)."""
        b = self._bucket(bucket)
        if isinstance(b, DirectoryBucket):
            b.rescan()

    def put(
        self,
        bucket: str,
        key: str,
        data: bytes,
        *,
        etag: str | None = None,
        mtime: float | None = None,
    ) -> ObjectMeta:
        """Store an object (creating a memory bucket if needed); returns its metadata.

        In a directory bucket this writes the file; its ETag then comes from
        the file, so *etag* must be None.
        """
        with self._buckets_lock:
            b = self._buckets.setdefault(bucket, MemoryBucket(bucket))
        return b.put(key, data, etag=etag, mtime=mtime)

    def delete(self, bucket: str, key: str) -> bool:
        """Remove an object; False if it did not exist."""
        return self._bucket(bucket).delete(key)

    def head(self, bucket: str, key: str) -> ObjectMeta | None:
        """An object's metadata as HEAD would give it, or None."""
        return self._bucket(bucket).head(key)

    def get(self, bucket: str, key: str) -> bytes:
        """An object's content (KeyError if missing)."""
        obj = self._bucket(bucket).open(key)
        if obj is None:
            raise KeyError(key)
        try:
            return obj.read(0, obj.meta.size)
        finally:
            obj.close()

    def keys(self, bucket: str) -> list[str]:
        return list(self._bucket(bucket).keys())

    # --------------------------------------------------------------------- stats

    @property
    def stats(self) -> StatsSnapshot:
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()

    # ------------------------------------------------------------------ internal

    def add_key(
        self,
        access_key_id: str,
        secret: str,
        session_token: str | None = None,
        *,
        expires: float | None = None,
    ) -> None:
        """Accept requests signed with this key from now on; with a session token, only
        those that carry it (an STS key); with *expires* (seconds since the epoch), only
        until then (403 SecurityTokenExpired after). Safe to call while the server runs."""
        if session_token is not None:
            self.session_tokens[access_key_id] = session_token
        if expires is not None:
            self.key_expiry[access_key_id] = expires
        if self.credentials is None:
            self.credentials = {}
        self.credentials[access_key_id] = secret

    def remove_key(self, access_key_id: str) -> None:
        """Refuse this key from now on (InvalidAccessKeyId), as OSS does once an STS
        key has expired."""
        if self.credentials is not None:
            self.credentials.pop(access_key_id, None)
        self.session_tokens.pop(access_key_id, None)
        self.key_expiry.pop(access_key_id, None)

    def _bucket(self, name: str) -> Bucket:
        with self._buckets_lock:
            b = self._buckets.get(name)
        if b is None:
            raise OssError(404, "NoSuchBucket", "The specified bucket does not exist.")
        return b

    def _next_request_id(self) -> str:
        return f"{self._rid_prefix}{next(self._rid_counter):016X}"

    def _authorize(self, info: RequestInfo, query: list[tuple[str, str | None]]) -> None:
        try:
            self._check_credentials(info, query)
        except OssError as e:
            self.refused.append(e.code)
            raise

    def _check_credentials(self, info: RequestInfo, query: list[tuple[str, str | None]]) -> None:
        if self.credentials is None:
            return
        if "authorization" not in info.headers:
            if self.allow_anonymous:
                return
            raise OssError(
                403,
                "AccessDenied",
                "You have no right to access this object because of bucket acl.",
            )
        try:
            ak = check_oss_signature(
                method=info.method,
                bucket=info.bucket,
                key=info.key,
                query=query,
                headers=info.headers,
                secret_for=dict(self.credentials),
                now=time.time(),
            )
        except SignatureError as e:
            raise OssError(403, e.code, e.message) from e
        token = self.session_tokens.get(ak)
        if token is not None and info.headers.get("x-oss-security-token") != token:
            raise OssError(
                403, "InvalidSecurityToken", "The security token you provided is invalid."
            )
        expires = self.key_expiry.get(ak)
        if expires is not None and time.time() >= expires:
            raise OssError(
                403, "SecurityTokenExpired", "The security token you provided has expired."
            )
        self.keys_used[ak] = self.keys_used.get(ak, 0) + 1

    def _track(self, sock: socket.socket) -> None:
        with self._conns_lock:
            self._conns[sock] = threading.current_thread()

    def _untrack(self, sock: socket.socket) -> None:
        with self._conns_lock:
            self._conns.pop(sock, None)
