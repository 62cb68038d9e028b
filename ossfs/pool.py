"""A pool of workers over a channel: what ``download`` and ``materialize`` both run.

A producer sends items into a bounded memory channel (so it runs ahead of the
workers by at most *buffer* items); *workers* tasks take them in order and
work on them. The first error cancels the producer and the other workers and
reaches the caller alone (see `ossfs.errors.unwrap_groups`).

Must not import: httpx, pyfuse3.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from ossfs.errors import unwrap_groups

__all__ = ["run_pool"]

T = TypeVar("T")


async def run_pool(
    workers: int,
    produce: Callable[[trio.MemorySendChannel[T]], Awaitable[None]],
    work: Callable[[T], Awaitable[None]],
    *,
    buffer: int,
) -> None:
    """Run *work* on every item *produce* sends, *workers* items at a time.

    Returns when *produce* has returned and every item it sent was worked on.
    """
    send, receive = trio.open_memory_channel[T](buffer)

    async def worker() -> None:
        async for item in receive:
            await work(item)

    async def feed() -> None:
        async with send:
            await produce(send)

    with unwrap_groups():
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker)
            nursery.start_soon(feed)
