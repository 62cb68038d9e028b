"""Fault injection for the OSS-dialect test server.

`Faults` holds what the server should do wrong, and can be changed from any
thread while the server runs:

- steady conditions: ``latency`` (seconds before the first byte of every
  answer), ``bandwidth`` (bytes per second per connection for bodies, None for
  no cap), ``error_rate`` with ``error_status`` (random errors drawn from an
  RNG seeded at construction, so a run is repeatable);
- scripted one-shot faults: ``faults.add(Fault(kind, ...), times=N)``. Each
  request takes at most one scripted fault: the first pending one, in the
  order they were added, whose filters (``method``, ``op``, ``bucket``,
  ``key``, ``when``) match. ``times`` counts how many requests it hits
  (``None``: every matching request until `Faults.clear`).

Fault kinds:

``status``
    Answer ``status`` with the OSS error ``code`` (default derived from the
    status: 503 ServiceUnavailable, 500 InternalError, 403 AccessDenied ...)
    instead of serving the request. Matched when the request arrives.
``reset``
    Send the headers and ``after_bytes`` of the body, then abort the TCP
    connection with an RST.
``truncate``
    Declare the full Content-Length, send ``after_bytes``, close cleanly (FIN).
``stall``
    Send ``after_bytes``, go silent for ``seconds``, then ``then``:
    ``continue`` the body, ``close`` cleanly, ``reset``, or ``trickle`` the
    rest one byte every ``interval`` seconds (each byte resets a client's
    stall timer; only a total deadline ends such an answer).
``replace``
    After ``after_bytes`` of the body are sent, replace the stored object with
    ``data`` (default: the old content with every byte inverted) and a newer
    mtime, so the next request sees a new ETag. The answer in flight finishes
    with the old content, as a real store serves a consistent version.
``corrupt``
    Invert ``length`` bytes starting at body offset ``offset`` while keeping
    every header, so the CRC-64 of the body no longer matches.
``endless``
    Answer ``answer`` (default 200) with a body that never ends (no
    Content-Length, close-delimited): a 200 sends the object's bytes over and
    over (a ranged GET answered with the whole object, and more), a 206 the
    right Content-Range and then more bytes than asked, an error status an
    error document whose message never ends, a listing an XML document whose
    entries never end. It goes on until the client hangs up or the server
    stops.

Listing kinds (matched only by listings; the answer is well formed):

``token_loop``
    The page says it is truncated and its ``NextContinuationToken`` is the
    token the request sent (the first page: a token that leads back to the
    first page), so a client that follows tokens loops for ever.
``keys_repeat``
    Every page is the first page again, marked truncated, with a new token
    each time: the keys do not increase and the listing never ends.
``endless_listing``
    Pages of made-up objects (``PREFIX`` + ``endless-000000000001`` ...)
    that always say truncated: keys increase and tokens are new, but the
    listing never ends.

The body kinds are matched only by answers that carry a body: a GET of an
object (200 or 206) or a listing (``replace`` only objects, the listing kinds
only listings). Offsets (``after_bytes``, ``offset``) count bytes of the body,
not of the object.

Must not import: trio, httpx, http.server (this module only decides; the
server carries the faults out).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Literal

from ossfs.protocol.ops import STATUS_CODES

__all__ = [
    "FaultKind",
    "Op",
    "RequestInfo",
    "Fault",
    "Faults",
    "BODY_KINDS",
    "LISTING_KINDS",
    "default_error_code",
]

FaultKind = Literal[
    "status",
    "reset",
    "truncate",
    "stall",
    "replace",
    "corrupt",
    "endless",
    "token_loop",
    "keys_repeat",
    "endless_listing",
]
# What a request asks for: object HEAD, object GET, bucket listing, or anything
# else (PUT, GET of the service root, ...).
Op = Literal["head", "get", "list", "other"]

LISTING_KINDS: frozenset[str] = frozenset({"token_loop", "keys_repeat", "endless_listing"})
BODY_KINDS: frozenset[str] = (
    frozenset({"reset", "truncate", "stall", "replace", "corrupt", "endless"}) | LISTING_KINDS
)
_KINDS: frozenset[str] = BODY_KINDS | {"status"}

# OSS answers a bad parameter with InvalidArgument rather than the generic code.
_DEFAULT_CODES: dict[int, str] = {**STATUS_CODES, 400: "InvalidArgument"}


def default_error_code(status: int) -> str:
    """The OSS error code a store would most likely send with *status*."""
    if status in _DEFAULT_CODES:
        return _DEFAULT_CODES[status]
    return "InternalError" if status >= 500 else "InvalidRequest"


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What fault filters see of a request.

    :method: ``GET``, ``HEAD`` ...
    :op: ``head``, ``get``, ``list`` or ``other``.
    :bucket: the bucket, None for the service root.
    :key: the decoded key, None for bucket requests.
    :query: decoded query parameters in URL order (``None`` for a bare name).
    :headers: request headers with lower-case names.
    """

    method: str
    op: Op
    bucket: str | None
    key: str | None
    query: tuple[tuple[str, str | None], ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted fault; see the module docstring for the kinds.

    Filters (None matches anything): ``method``, ``op``, ``bucket``, ``key``
    and ``when``, a predicate on `RequestInfo`.
    """

    kind: FaultKind
    _: KW_ONLY
    method: str | None = None
    op: Op | None = None
    bucket: str | None = None
    key: str | None = None
    when: Callable[[RequestInfo], bool] | None = None
    # status
    status: int = 503
    code: str | None = None
    message: str | None = None
    # reset, truncate, stall, replace
    after_bytes: int = 0
    # stall
    seconds: float = 0.0
    then: Literal["continue", "close", "reset", "trickle"] = "continue"
    interval: float = 0.1  # stall with then="trickle": seconds between bytes
    # endless
    answer: int = 200
    # replace
    data: bytes | None = None
    # corrupt
    offset: int = 0
    length: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {sorted(_KINDS)}")
        if self.kind == "status" and not 400 <= self.status <= 599:
            raise ValueError(f"a status fault needs an error status, not {self.status}")
        if self.after_bytes < 0 or self.offset < 0 or self.length < 1 or self.seconds < 0:
            raise ValueError("after_bytes, offset and seconds must be >= 0, length >= 1")
        if self.then not in ("continue", "close", "reset", "trickle"):
            raise ValueError(f"then must be continue, close, reset or trickle, not {self.then!r}")
        if self.interval <= 0:
            raise ValueError("interval must be > 0")
        if not 200 <= self.answer <= 599 or 300 <= self.answer < 400:
            raise ValueError(f"an endless answer needs a 2xx, 4xx or 5xx status, not {self.answer}")

    @property
    def error_code(self) -> str:
        return self.code or default_error_code(self.status)

    def matches(self, info: RequestInfo) -> bool:
        if self.method is not None and self.method.upper() != info.method:
            return False
        if self.op is not None and self.op != info.op:
            return False
        if self.bucket is not None and self.bucket != info.bucket:
            return False
        if self.key is not None and self.key != info.key:
            return False
        return self.when is None or self.when(info)


class _Pending:
    __slots__ = ("fault", "left")

    def __init__(self, fault: Fault, left: int | None) -> None:
        self.fault = fault
        self.left = left


class Faults:
    """Thread-safe fault settings of one server.

    The steady settings are plain attributes (a float or int store is atomic),
    read afresh by every request and every body chunk, so changing
    ``bandwidth`` takes effect within one chunk of an answer in flight.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        bandwidth: float | None = None,
        error_rate: float = 0.0,
        error_status: int = 503,
        error_ops: frozenset[str] = frozenset({"head", "get", "list"}),
        seed: int = 0,
    ) -> None:
        self.latency = latency
        self.bandwidth = bandwidth
        self.error_rate = error_rate
        self.error_status = error_status
        # Which ops random errors hit; by default everything a client reads.
        self.error_ops = error_ops
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._pending: list[_Pending] = []
        self._fired: list[tuple[Fault, RequestInfo]] = []

    # ----------------------------------------------------------------- tests' side

    def add(self, fault: Fault, *, times: int | None = 1) -> Fault:
        """Schedule *fault* for the next *times* matching requests (None: all)."""
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        with self._lock:
            self._pending.append(_Pending(fault, times))
        return fault

    def clear(self) -> None:
        """Drop every scripted fault that has not fired yet."""
        with self._lock:
            self._pending.clear()

    def reset(self) -> None:
        """Back to no faults at all: steady settings too, and the history."""
        with self._lock:
            self._pending.clear()
            self._fired.clear()
        self.latency = 0.0
        self.bandwidth = None
        self.error_rate = 0.0
        self.error_status = 503

    def seed(self, seed: int) -> None:
        """Restart the random-error RNG."""
        with self._lock:
            self._rng.seed(seed)

    def pending(self) -> list[tuple[Fault, int | None]]:
        """Scripted faults not used up yet, with how many hits each has left."""
        with self._lock:
            return [(p.fault, p.left) for p in self._pending]

    def fired(self) -> list[tuple[Fault, RequestInfo]]:
        """Every scripted fault that fired, with the request it hit, in order."""
        with self._lock:
            return list(self._fired)

    # ---------------------------------------------------------------- server's side

    def take(self, info: RequestInfo, *, body: bool) -> Fault | None:
        """The scripted fault for this request, consuming one of its hits.

        ``body=False`` looks for ``status`` faults (when the request arrives),
        ``body=True`` for the body kinds (when an answer with a body is about
        to be sent).
        """
        with self._lock:
            for i, p in enumerate(self._pending):
                f = p.fault
                if (f.kind in BODY_KINDS) != body:
                    continue
                if f.kind == "replace" and info.op != "get":
                    continue
                if f.kind in LISTING_KINDS and info.op != "list":
                    continue
                if not f.matches(info):
                    continue
                if p.left is not None:
                    p.left -= 1
                    if p.left <= 0:
                        del self._pending[i]
                self._fired.append((f, info))
                return f
        return None

    def random_error(self, info: RequestInfo) -> int | None:
        """The status of a random error for this request, or None."""
        rate = self.error_rate
        if rate <= 0 or info.op not in self.error_ops:
            return None
        with self._lock:
            hit = self._rng.random() < rate
        return self.error_status if hit else None
