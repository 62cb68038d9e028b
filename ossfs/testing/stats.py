"""Counters of the OSS-dialect test server, for tests that count requests and bytes.

`Stats` is updated by the request threads under a lock; tests read a frozen
`StatsSnapshot` (``server.stats``) and clear with ``server.reset_stats()``.

Must not import: trio, httpx, http.server.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["GetRecord", "StatsSnapshot", "Stats"]


@dataclass(frozen=True, slots=True)
class GetRecord:
    """One GET of an object, whatever its outcome.

    :bucket, key: what was asked for.
    :range: the Range header as sent, or None.
    :req_start, req_end: the numbers of the header's first range as written
        (HTTP's inclusive form): ``bytes=a-b`` gives (a, b), ``bytes=a-``
        gives (a, None), the suffix form ``bytes=-n`` gives (None, n); both
        None without a Range header or with one that does not parse.
    :start, end: the object bytes ``[start, end)`` the answer's body declared;
        (0, 0) for an answer without an object body (errors, 304).
    :status: the status sent.
    :bytes_sent: body bytes actually written to the socket (less than
        ``end - start`` when a fault or the client cut the body short).
    :fault: the kind of the scripted body fault applied, if any.
    """

    bucket: str
    key: str
    range: str | None
    req_start: int | None
    req_end: int | None
    start: int
    end: int
    status: int
    bytes_sent: int
    fault: str | None = None


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Counters at one moment.

    :requests: number of requests by (method, op), op being ``head``,
        ``get`` (object GET), ``list`` or ``other``.
    :bytes_sent: object body bytes sent by all GETs (listings and error
        documents are not counted).
    :gets: every object GET in the order they finished.
    """

    requests: Mapping[tuple[str, str], int]
    bytes_sent: int
    gets: tuple[GetRecord, ...]

    def count(self, method: str | None = None, op: str | None = None) -> int:
        """Requests with this method and/or op (None: any)."""
        return sum(
            n
            for (m, o), n in self.requests.items()
            if (method is None or m == method) and (op is None or o == op)
        )

    @property
    def gets_by_key(self) -> dict[str, list[GetRecord]]:
        out: dict[str, list[GetRecord]] = {}
        for g in self.gets:
            out.setdefault(g.key, []).append(g)
        return out


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._bytes = 0
        self._gets: list[GetRecord] = []

    def request(self, method: str, op: str) -> None:
        with self._lock:
            self._requests[(method, op)] += 1

    def get(self, record: GetRecord) -> None:
        with self._lock:
            self._gets.append(record)
            self._bytes += record.bytes_sent

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(dict(self._requests), self._bytes, tuple(self._gets))

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._bytes = 0
            self._gets.clear()
