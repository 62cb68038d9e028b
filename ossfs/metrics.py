"""``--metrics ADDR:PORT``: the counters of a mount (or a materialize run) for Prometheus.

Nothing is counted twice. The numbers are the ones ``ossfs status`` shows: the
mount's status document (``ossfs.mount``), read when Prometheus scrapes, and
turned into metric families by `families`. The only state kept here is the
latency histogram of FUSE requests (`OpTimes`), which exists only with
``--metrics``: `time_operations` wraps the handlers of the mount's
`ossfs.fs.Operations` instance, so a mount without ``--metrics`` pays nothing.

The HTTP endpoint is prometheus_client's WSGI server in a thread of its own
(`MetricsServer`). The socket is bound by the command before anything else
(and before a mount forks), so a bad address or a port in use ends the command
with one line. A scrape reads the status document on the event loop's thread
(`trio.from_thread.run_sync`), in one step between two of the loop's tasks:
the counters are plain integers that only the loop changes, so a scrape sees
them consistent and no lock is needed, while the HTTP handling (slow or
stalled scrapers included) never runs on the loop that serves FUSE requests.

Must not import: pyfuse3, httpx.
"""

from __future__ import annotations

import bisect
import errno
import functools
import ipaddress
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ossfs.errors import UsageError

__all__ = [
    "parse_listen",
    "OpTimes",
    "time_operations",
    "families",
    "MetricsServer",
    "OP_BUCKETS",
    "status_reader",
]

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the FUSE latency buckets: from a cached getattr
# (tens of microseconds) to a read that waits for a retried GET (a minute).
OP_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

Status = Mapping[str, Any]


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[ADDR]:PORT`` for IPv6) -> (address, port); ValueError if not.

    The address must be given: the endpoint is bound only where the user says
    (``0.0.0.0:PORT`` for every interface). Port 0 takes any free port (the
    mount's description and ``ossfs status`` say which).
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"not ADDR:PORT: {text!r} (e.g. 127.0.0.1:9100)")
    if not host:
        raise ValueError(
            f"no address in {text!r}: give where to listen, e.g. "
            f"127.0.0.1:{port_text}, or 0.0.0.0:{port_text} for every interface"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address: {text!r}") from None
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port_text}")
    return host, int(port_text)


# ------------------------------------------------------------------ FUSE latency


class OpTimes:
    """How long FUSE requests took, by operation: a histogram of `OP_BUCKETS`."""

    def __init__(self) -> None:
        # op -> per-bucket counts (not cumulative; the last one is "more than 60 s")
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, op: str, seconds: float) -> None:
        counts = self.counts.get(op)
        if counts is None:
            counts = self.counts[op] = [0] * (len(OP_BUCKETS) + 1)
            self.sums[op] = 0.0
        counts[bisect.bisect_left(OP_BUCKETS, seconds)] += 1
        self.sums[op] += seconds

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """op -> {"buckets": cumulative counts per bound and +Inf, "sum": seconds}."""
        out: dict[str, dict[str, Any]] = {}
        for op, counts in self.counts.items():
            cumulative, total = [], 0
            for n in counts:
                total += n
                cumulative.append(total)
            out[op] = {"buckets": cumulative, "sum": self.sums[op], "count": total}
        return out


def time_operations(ops: Any, times: OpTimes, names: Iterator[str] | None = None) -> None:
    """Time every request handler of *ops* (a pyfuse3 ``Operations`` instance) into *times*.

    pyfuse3 looks each handler up on the instance, so wrapping the instance's
    attributes covers every request, whatever the handler does (also those that
    map no errors, like ``forget`` or ``release``). A wrapper does not await
    after the handler returns: a ``read`` answer in a shared buffer reaches
    pyfuse3 before any other task runs, as without it.
    """
    import pyfuse3  # only a mount calls this

    if names is None:
        names = (
            n
            for n, v in vars(pyfuse3.Operations).items()
            if callable(v) and not n.startswith("_") and n not in ("init", "stacktrace")
        )
    for name in names:
        handler = getattr(ops, name)
        setattr(ops, name, _timed(name, handler, times))


def _timed(
    name: str, handler: Callable[..., Awaitable[Any]], times: OpTimes
) -> Callable[..., Awaitable[Any]]:
    clock = time.perf_counter

    @functools.wraps(handler)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        began = clock()
        try:
            return await handler(*args, **kwargs)
        finally:
            times.observe(name, clock() - began)

    return timed


# ------------------------------------------------------------------ status -> metrics


def families(status: Status) -> list[Metric]:
    """The metric families of a status document (see `ossfs.mount`; keys may be missing)."""
    out: list[Metric] = []

    def counter(name: str, doc: str, value: Any, unit: str = "") -> None:
        if value is not None:
            out.append(CounterMetricFamily(f"ossfs_{name}", doc, value=value, unit=unit))

    def gauge(name: str, doc: str, value: Any, unit: str = "") -> None:
        if value is not None:
            out.append(GaugeMetricFamily(f"ossfs_{name}", doc, value=value, unit=unit))

    req = status.get("requests") or {}
    by_kind = req.get("by_kind")
    if by_kind is not None:
        f = CounterMetricFamily(
            "ossfs_requests",
            "Requests to the service by kind (head, "
            "get, list) and HTTP status (0: no answer, the connection "
            "failed)",
            labels=("kind", "status"),
        )
        for kind, statuses in sorted(by_kind.items()):
            for code, n in sorted(statuses.items()):
                f.add_metric((kind, code), n)
        out.append(f)
    counter(
        "request_retries",
        "Requests sent again (after an error, or to resume a broken GET)",
        req.get("retries"),
    )
    counter(
        "request_failures",
        "Requests that failed for good (retries used up, or an answer that cannot be retried)",
        req.get("errors"),
    )
    counter(
        "received",
        "Object bytes received in GET bodies (also those not cached)",
        req.get("bytes_received"),
        unit="bytes",
    )
    gauge(
        "gets_in_flight",
        "Ranged GETs running (each holds a connection or waits for one)",
        req.get("gets_in_flight"),
    )
    counter(
        "fetched", "Object bytes fetched into the cache", status.get("bytes_fetched"), unit="bytes"
    )
    counter("fetched_parts", "Cache parts fetched", status.get("parts_fetched"))
    counter(
        "cache_hit",
        "Bytes of reads whose cache part was present (page-cache hits never reach the mount)",
        status.get("cache_hit_bytes"),
        unit="bytes",
    )
    counter(
        "cache_miss",
        "Bytes of reads whose cache part had to be fetched (or was being fetched)",
        status.get("cache_miss_bytes"),
        unit="bytes",
    )
    gauge("cache_used", "Bytes the cache holds", status.get("cache_used_bytes"), unit="bytes")
    gauge(
        "cache_limit",
        "The cache's size cap (--cache-size)",
        status.get("cache_size_bytes"),
        unit="bytes",
    )
    counter(
        "cache_evicted",
        "Bytes evicted from the cache",
        status.get("cache_evicted_bytes"),
        unit="bytes",
    )
    counter(
        "cache_skipped",
        "Bytes served from the network and not cached because the cache disk was full",
        status.get("uncached_bytes"),
        unit="bytes",
    )
    counter(
        "memory_served",
        "Bytes fetched into memory and not cached because the cache disk was behind",
        status.get("memory_bytes"),
        unit="bytes",
    )
    gauge(
        "memory_held",
        "Memory held by parts fetched into memory while the cache disk was behind",
        status.get("memory_held_bytes"),
        unit="bytes",
    )
    behind = status.get("cache_disk_behind")
    gauge(
        "cache_disk_behind",
        "1 while the dirty pages of the machine or of the mount's memory cgroup are near "
        "the kernel's ceiling (readers are then served from memory), else 0",
        None if behind is None else int(behind),
    )
    gauge(
        "buffered",
        "Memory held by the receive buffers of open data connections",
        status.get("buffered_bytes"),
        unit="bytes",
    )
    counter(
        "crc_mismatches",
        "Objects whose cached bytes did not match the service's CRC-64 (dropped and fetched again)",
        status.get("crc_mismatches"),
    )
    counter(
        "parts_verified",
        "Cached parts checked against their CRC-64 before use",
        status.get("parts_verified"),
    )
    counter(
        "fuse_errors",
        "FUSE requests that failed with an error other than ENOENT",
        status.get("fs_errors"),
    )
    fs_requests = status.get("fs_requests")
    if fs_requests is not None:
        f = CounterMetricFamily(
            "ossfs_fuse_requests",
            "FUSE requests the kernel sent, by operation (as in ossfs status)",
            labels=("op",),
        )
        for op, n in sorted({**fs_requests, "read": status.get("fs_reads", 0)}.items()):
            f.add_metric((op,), n)
        out.append(f)
    op_seconds = status.get("fs_op_seconds")
    if op_seconds is not None:
        h = HistogramMetricFamily(
            "ossfs_fuse_request_duration_seconds",
            "Time the mount took to answer FUSE requests, by operation",
            labels=("op",),
        )
        bounds = [*(repr(float(b)) for b in OP_BUCKETS), "+Inf"]
        for op, times in sorted(op_seconds.items()):
            h.add_metric((op,), list(zip(bounds, times["buckets"], strict=True)), times["sum"])
        out.append(h)
    counter("objects_done", "Objects materialized (done or failed)", status.get("objects_done"))
    return out


class _StatusCollector(Collector):
    def __init__(self, read: Callable[[], Status | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        status = self._read()
        if status is not None:
            yield from families(status)


def status_reader(status: Callable[[], Status]) -> Callable[[], Status | None]:
    """For the HTTP thread: call *status* on the calling trio loop's thread.

    Must be called in the trio run. None once the run has ended.
    """
    token = trio.lowlevel.current_trio_token()

    def read() -> Status | None:
        try:
            return trio.from_thread.run_sync(status, trio_token=token)
        except trio.RunFinishedError:
            return None

    return read


# ------------------------------------------------------------------ the endpoint


class _Quiet(WSGIRequestHandler):
    timeout = 30  # a client that sends nothing does not keep its thread for ever

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """Prometheus's text format on ``http://ADDR:PORT/metrics`` (and on any other path).

    The socket is bound when this is made (UsageError when it cannot be);
    `start` serves from a daemon thread.
    """

    def __init__(self, address: str, port: int) -> None:
        self.where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        try:
            infos = socket.getaddrinfo(
                address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except (socket.gaierror, UnicodeError) as e:
            reason = e.strerror if isinstance(e, socket.gaierror) else str(e)
            raise UsageError(f"--metrics {self.where}: unknown address ({reason})") from None
        family, _, _, _, sockaddr = infos[0]

        class Server(socketserver.ThreadingMixIn, WSGIServer):
            # A thread per scrape: a stalled client does not hold up the next one.
            address_family = family
            daemon_threads = True

        self._registry = CollectorRegistry(auto_describe=False)
        self._read: Callable[[], Status | None] = lambda: None
        self._registry.register(_StatusCollector(lambda: self._read()))
        ProcessCollector(registry=self._registry)
        try:
            self._httpd = make_server(
                str(sockaddr[0]), port, make_wsgi_app(self._registry), Server, handler_class=_Quiet
            )
        except OSError as e:
            hint = " (another process listens there)" if e.errno == errno.EADDRINUSE else ""
            raise UsageError(
                f"--metrics {self.where}: cannot listen there: {e.strerror or e}{hint}"
            ) from None
        self.port = self._httpd.server_address[1]
        self.where = f"[{address}]:{self.port}" if ":" in address else f"{address}:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self, read: Callable[[], Status | None]) -> None:
        """Serve, reading the numbers with *read* at each scrape."""
        self._read = read
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="ossfs-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics on http://%s/metrics", self.where)

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
