"""Sibling read-ahead: fetch the next small files of a directory that is being walked.

``grep -r``, ``tar``, ``cp -r`` and data loaders open the files of a directory
one after another in listing order. Each small file is one GET, and one at a
time they are bound by round-trip latency, not bandwidth. When a file is
opened right after its predecessor in the listing, the files after it are
fetched in the background: a window that starts at 4 and doubles with every
further file opened in order, up to 64 files, and stops at once when the
walk stops (a file opened out of order resets it). Only objects of at most
one part qualify, so a walk never starts a large transfer by guessing.

All fetches are read-ahead flights: they share the fetcher's read-ahead
connection budget and the cache's limits like any other read-ahead.

Must not import: pyfuse3, httpx.
"""

from __future__ import annotations

from dataclasses import dataclass

from ossfs.cache.cachedir import CacheDir, object_identity
from ossfs.fetcher import Fetcher
from ossfs.model import ObjectMeta, one_part_limit
from ossfs.namespace import Namespace, Node

__all__ = ["SiblingPrefetch"]


_FIRST_WINDOW = 4
_MAX_WINDOW = 64


@dataclass(slots=True)
class _Walk:
    last: int  # listing position of the last file opened
    window: int
    fetched_to: int  # listing position up to which prefetches were started


class SiblingPrefetch:
    """Watches opens per directory and prefetches ahead of an in-order walk."""

    def __init__(
        self, namespace: Namespace, cache: CacheDir, fetcher: Fetcher, part_size: int
    ) -> None:
        self.ns = namespace
        self.cache = cache
        self.fetcher = fetcher
        self.part_size = part_size
        self.small = one_part_limit(part_size)  # only objects kept as one part
        self._walks: dict[str, _Walk] = {}
        self.started = 0

    def on_open(self, node: Node) -> None:
        """Called when a file is opened; may start background fetches of its siblings."""
        if node.meta is None or node.meta.size > self.small:
            return
        parent, _, name = node.path.rpartition("/")
        listed = self.ns.listed_files(parent)
        if listed is None:
            return
        siblings, positions = listed
        index = positions.get(name)
        if index is None:
            return
        walk = self._walks.get(parent)
        if walk is None or index != walk.last + 1:
            # Not (yet) a walk: remember where we are and wait for the next open.
            self._walks[parent] = _Walk(last=index, window=0, fetched_to=index)
            if len(self._walks) > 1024:
                self._walks.pop(next(iter(self._walks)))
            return
        walk.last = index
        walk.window = min(_MAX_WINDOW, max(_FIRST_WINDOW, walk.window * 2))
        end = min(len(siblings), index + 1 + walk.window)
        start = max(walk.fetched_to + 1, index + 1)
        for pos in range(start, end):
            self._prefetch(parent, siblings[pos])
        walk.fetched_to = max(walk.fetched_to, end - 1)

    def _prefetch(self, parent: str, name: str) -> None:
        meta = self.ns.listed_meta(parent, name)
        if meta is None or meta.size == 0 or meta.size > self.small:
            return
        self.started += 1
        self.fetcher.spawn(self._fetch_one, meta)

    async def _fetch_one(self, meta: ObjectMeta) -> None:
        identity = object_identity(self.ns.bucket, meta.key, meta.etag, meta.size, self.part_size)
        store = await self.fetcher.open_store(self.cache, identity)
        try:
            flight = self.fetcher.start(store, 0, readahead=True)
            if flight is not None:
                await flight.done.wait()
        finally:
            self.cache.release(store)
