"""An in-memory object client, for tests of the read path without a network or a kernel.

`MemoryClient` implements the `ossfs.client.ObjectClient` protocol over a dict
of objects. It keeps the service's rules that matter to the layers above
(ranged GETs with ``If-Match``, ListObjectsV2 with a delimiter and pages, the
whole object's CRC-64 on every GET as OSS sends it) and counts what a test
wants to assert: requests, bytes sent per object, GETs in flight at once.

Faults are simple knobs: a latency per request (``trio.sleep``, so trio's
autojump clock makes it free), a bandwidth cap per GET, a failure on every
n-th GET, and `replace` to change an object between or during reads.

Must not import: httpx, pyfuse3.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import trio

from ossfs.client import ClientStats, GetResult, Sink
from ossfs.crc import crc64
from ossfs.errors import NotFoundError, ObjectChangedError, TransferError
from ossfs.model import ListPage, ObjectMeta

__all__ = ["MemoryClient", "MemoryObject"]

# Bytes handed to the sink at once: like a network read, smaller than a part.
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class MemoryObject:
    data: bytes
    etag: str
    mtime: float
    crc64: int


@dataclass(slots=True)
class MemoryClient:
    """See the module docstring. ``objects`` maps (bucket, key) to an object."""

    latency: float = 0.0
    bandwidth: int | None = None  # bytes per second per GET, None: unlimited
    fail_every: int = 0  # every n-th GET fails half way (TransferError); 0: never
    objects: dict[tuple[str, str], MemoryObject] = field(default_factory=dict)
    stats: ClientStats = field(default_factory=ClientStats)
    bytes_sent: Counter[str] = field(default_factory=Counter)
    gets: int = 0
    heads: int = 0
    lists: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    _versions: int = 0

    def put(self, bucket: str, key: str, data: bytes, mtime: float = 1.7e9) -> ObjectMeta:
        """Store (or replace) an object; returns its metadata."""
        self._versions += 1
        digest = hashlib.md5(data + self._versions.to_bytes(8, "big")).hexdigest()
        obj = MemoryObject(bytes(data), digest, mtime, crc64(data))
        self.objects[(bucket, key)] = obj
        return self._meta(key, obj)

    replace = put

    @staticmethod
    def _meta(key: str, obj: MemoryObject) -> ObjectMeta:
        return ObjectMeta(
            key=key, size=len(obj.data), etag=obj.etag, mtime=obj.mtime, crc64=obj.crc64
        )

    def _get(self, bucket: str, key: str) -> MemoryObject:
        obj = self.objects.get((bucket, key))
        if obj is None:
            raise NotFoundError(404, "NoSuchKey", resource=f"{bucket}/{key}")
        return obj

    async def head(self, bucket: str, key: str) -> ObjectMeta:
        self.heads += 1
        self.stats.requests += 1
        await trio.sleep(self.latency)
        return self._meta(key, self._get(bucket, key))

    async def get_range(
        self, bucket: str, key: str, start: int, end: int, etag: str | None, sink: Sink
    ) -> GetResult:
        self.gets += 1
        self.stats.requests += 1
        number = self.gets
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(self.latency)
            obj = self._get(bucket, key)
            if etag is not None and etag != obj.etag:
                raise ObjectChangedError(412, "PreconditionFailed", resource=f"{bucket}/{key}")
            end = min(end, len(obj.data))
            fail_at = (
                (start + end) // 2 if self.fail_every and number % self.fail_every == 0 else None
            )
            pos = start
            while pos < end:
                current = self.objects.get((bucket, key))
                if current is None or current.etag != obj.etag:
                    # Replaced while being read: the service would cut the answer.
                    raise TransferError(f"{bucket}/{key}: connection reset")
                n = min(_CHUNK, end - pos)
                if fail_at is not None and pos + n > fail_at:
                    raise TransferError(f"{bucket}/{key}: injected failure at {pos}")
                if self.bandwidth:
                    await trio.sleep(n / self.bandwidth)
                chunk = memoryview(obj.data)[pos : pos + n]
                self.bytes_sent[key] += n
                self.stats.bytes_received += n
                result = sink(pos, chunk)
                if result is not None:
                    await result
                pos += n
                await trio.lowlevel.checkpoint()
            return GetResult(end - start, obj.crc64)
        finally:
            self.in_flight -= 1

    async def list_page(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        continuation_token: str | None = None,
        max_keys: int = 1000,
    ) -> ListPage:
        self.lists += 1
        self.stats.requests += 1
        await trio.sleep(self.latency)
        keys = sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix))
        objects: list[ObjectMeta] = []
        prefixes: list[str] = []
        after = continuation_token or ""
        last = ""
        for key in keys:
            if key <= after:
                continue
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter, 1)[0] + delimiter
                if common <= after or (prefixes and prefixes[-1] == common):
                    continue
                if len(objects) + len(prefixes) >= max_keys:
                    return ListPage(tuple(objects), tuple(prefixes), last)
                prefixes.append(common)
                # Skip every key under this prefix: the token moves past them.
                last = common + "\U0010ffff"
                continue
            if len(objects) + len(prefixes) >= max_keys:
                return ListPage(tuple(objects), tuple(prefixes), last)
            objects.append(self._meta(key, self.objects[(bucket, key)]))
            last = key
        return ListPage(tuple(objects), tuple(prefixes), None)

    async def aclose(self) -> None:
        return None
