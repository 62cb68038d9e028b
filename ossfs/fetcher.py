"""The fetcher owns concurrency: which parts are fetched, when, and how many at once.

Every byte ossfs downloads goes through `Fetcher.ensure`: a mount read, a
read-ahead guess, ``materialize`` and ``download`` alike. It guarantees:

- one GET per missing part however many tasks want it (single flight: later
  callers wait on the first one's event, then look at the store again);
- at most ``connections`` GETs at once across everything (a trio
  `CapacityLimiter`);
- a part is committed to the store's index only after all its bytes are
  written, with the CRC-64 computed as they arrived;
- a space check (the cache's ``reserve``) before bytes are written.

Rules (from trio): no ``timeout=`` parameters (callers use cancel scopes);
cancellation leaves no half-recorded part, since a part is recorded last.

Must not import: pyfuse3, httpx.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ossfs.cache.store import PartStore
from ossfs.client import ObjectClient
from ossfs.crc import crc64

__all__ = ["Fetcher", "ByteCallback", "Reserve"]

log = logging.getLogger(__name__)

ByteCallback = Callable[[int], None]
# Called before a part's bytes are written: (store, part, nbytes). May evict, may raise.
Reserve = Callable[[PartStore, int, int], Awaitable[None]]


@dataclass(slots=True)
class _Flight:
    done: trio.Event
    error: BaseException | None = None


class Fetcher:
    """Fetch parts into part stores, once each, under one connection budget."""

    def __init__(
        self,
        client: ObjectClient,
        *,
        connections: int,
        reserve: Reserve | None = None,
    ) -> None:
        self.client = client
        self.limiter = trio.CapacityLimiter(max(1, connections))
        self._reserve = reserve
        self._flights: dict[tuple[int, int], _Flight] = {}
        self.parts_fetched = 0
        self.bytes_fetched = 0

    def in_flight(self, store: PartStore, part: int) -> bool:
        return (id(store), part) in self._flights

    async def ensure(
        self,
        store: PartStore,
        part: int,
        *,
        on_bytes: ByteCallback | None = None,
    ) -> bool:
        """Make *part* present in *store*; True when this call fetched it.

        Raises what the fetch raised (also to tasks that were waiting on the
        same part); a cancelled fetch makes a waiter try on its own.
        """
        while not store.is_present(part):
            key = (id(store), part)
            flight = self._flights.get(key)
            if flight is not None:
                await flight.done.wait()
                if flight.error is not None and not isinstance(flight.error, trio.Cancelled):
                    raise flight.error
                continue
            flight = _Flight(trio.Event())
            self._flights[key] = flight
            try:
                # Another process sharing the store may have fetched it meanwhile.
                store.refresh()
                if store.is_present(part):
                    return False
                await self._fetch(store, part, on_bytes)
                return True
            except BaseException as e:
                flight.error = e
                raise
            finally:
                del self._flights[key]
                flight.done.set()
        return False

    async def _fetch(self, store: PartStore, part: int, on_bytes: ByteCallback | None) -> None:
        ident = store.identity
        first, end = store.layout.bounds(part)
        if self._reserve is not None:
            await self._reserve(store, part, end - first)
        crc = 0

        async def sink(offset: int, data: bytes) -> None:
            nonlocal crc
            store.write(offset, data)
            crc = crc64(data, crc)
            if on_bytes is not None:
                on_bytes(len(data))

        async with self.limiter:
            # The limiter is taken after the reservation so a task waiting for
            # space does not hold a connection slot.
            n = await self.client.get_range(ident.bucket, ident.key, first, end, ident.etag, sink)
        store.commit(part, crc)
        self.parts_fetched += 1
        self.bytes_fetched += n
