"""`SingleFlight`: one run of a piece of work per key, however many tasks ask at once.

Used where the work makes something that callers then look up (a part store opened,
a cached part checked): the first caller runs it, the others wait for that run to end
and look again. The fetcher's part flights are not this: they publish how far their
bytes have come, carry their error to the waiters, and hold a budget reservation.

Imports only trio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar, TypeVarTuple

import trio

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class SingleFlight(Generic[K]):
    """The runs under way, by key."""

    def __init__(self) -> None:
        self._running: dict[K, trio.Event] = {}

    def running(self, key: K) -> bool:
        """Whether a run for *key* is under way."""
        return key in self._running

    async def run(self, key: K, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T | None:
        """``await fn(*args)`` unless a run for *key* is under way.

        Returns what *fn* returned (it must not return None), or None when another
        task's run was under way: that run has ended by then, with a result, an error
        or cancelled, and the caller looks again for what it made (and, if it made
        nothing, calls again: the next caller runs *fn*). An error of *fn* goes to the
        task that ran it only.
        """
        running = self._running.get(key)
        if running is not None:
            await running.wait()
            return None
        done = self._running[key] = trio.Event()
        try:
            return await fn(*args)
        finally:
            del self._running[key]
            done.set()
