"""Parts held in memory instead of the cache file, while the cache disk is behind.

Writing a part into the cache puts it in the page cache first; the kernel writes
it to disk later. When the disk is slower than the network for longer than the
kernel's allowance of dirty pages, the kernel starts to pause every writer
(``balance_dirty_pages``), and a mount that writes what it fetches would read
at the speed of the disk, its event loop paused with it. So while the dirty
pages are near that point (`ossfs.pressure`), the parts a mount's readers and
their read-ahead fetch go to memory instead: one anonymous memory file
(``memfd``) per store, read the same way the cache file is.

- Such a part is never recorded in the index: the checkpoint holds only parts
  whose bytes are on disk with their CRC. It is not cached; reading it again
  after it is released fetches it again.
- A part is released once a reader has read it to its end, or a stream has
  moved past it (the kernel's page cache holds what was read), or, least
  recently kept first, when the budget needs room and no reader holds it (a
  pin, as for eviction). Read-ahead makes room only from parts that were read:
  one guess never pushes out another that nobody has read yet.
- `MemoryBudget` bounds the bytes held, parts being fetched included. Read-ahead
  that does not fit is not started; a reader's own part always is, so the
  budget can be exceeded by at most the parts of the reads in progress.
- ``materialize`` never uses it: what it fetches lands in the cache.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from ossfs.fsutil import punch_hole

if TYPE_CHECKING:
    from ossfs.cache.store import PartStore

__all__ = ["MemoryBudget", "MemoryParts", "DEFAULT_MEMORY_BUDGET"]

# The bytes of object data a mount may hold in memory for its readers (--memory-budget).
DEFAULT_MEMORY_BUDGET = 256 << 20


class MemoryBudget:
    """The bytes of parts all stores of a mount hold in memory, and their order."""

    def __init__(self, limit: int, *, pinned: Callable[[PartStore, int], bool]) -> None:
        """*pinned*: whether a reader holds a part (`CacheDir.is_pinned`)."""
        self.limit = limit
        self._pinned = pinned
        self.held = 0  # parts kept plus parts being fetched
        self.peak = 0
        self.fetched_bytes = 0  # fetched into memory (so not cached)
        self._kept: OrderedDict[tuple[int, int], MemoryParts] = OrderedDict()

    def reserve(self, store: PartStore, part: int, *, must: bool) -> bool:
        """Take room for *part* of *store*, releasing kept parts nobody holds, oldest
        first; False when it does not fit (only when not *must*)."""
        nbytes = store.layout.part_length(part)
        if self.held + nbytes > self.limit:
            for key, mem in list(self._kept.items()):
                if self.held + nbytes <= self.limit:
                    break
                if not self._pinned(mem.store, key[1]) and (must or key[1] not in mem.unread):
                    mem.release(key[1])
        if self.held + nbytes > self.limit and not must:
            return False
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        return True

    def _kept_part(self, mem: MemoryParts, part: int, nbytes: int) -> None:
        self._kept[(id(mem), part)] = mem
        self.fetched_bytes += nbytes

    def _released(self, mem: MemoryParts, part: int, nbytes: int) -> None:
        self._kept.pop((id(mem), part), None)
        self.held -= nbytes


class MemoryParts:
    """The parts of one store held in memory: an anonymous file the size of the store."""

    def __init__(self, store: PartStore, budget: MemoryBudget) -> None:
        self.store = store
        self.budget = budget
        self.kept: set[int] = set()
        self.unread: set[int] = set()  # kept parts no reader has read yet
        self.flying: set[int] = set()  # being fetched into memory (room reserved)
        # Fetches that failed part-way while a reader held the part: what arrived stays
        # readable for that reader (as in the cache file), until the part is fetched
        # again or released.
        self.partial: set[int] = set()
        self.fd = os.memfd_create("ossfs-parts", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, store.identity.length)
        except BaseException:
            os.close(self.fd)
            raise

    def holds(self, part: int) -> bool:
        """Whether *part*'s bytes are read from memory (kept, being fetched, or what a
        failed fetch left for a reader)."""
        return part in self.kept or part in self.flying or part in self.partial

    def take_over(self, part: int) -> bool:
        """A new fetch of a part a failed one left (its room is still reserved)."""
        if part not in self.partial:
            return False
        self.partial.discard(part)
        self.flying.add(part)
        self.budget._kept.pop((id(self), part), None)
        return True

    def write(self, offset: int, data: memoryview) -> None:
        pos = offset - self.store.identity.start
        while data:
            n = os.pwrite(self.fd, data, pos)
            data = data[n:]
            pos += n

    def read_into(self, offset: int, view: memoryview) -> int:
        return os.preadv(self.fd, [view], offset - self.store.identity.start)

    def keep(self, part: int) -> None:
        """A part fetched into memory is complete."""
        # Kept before no longer flying: a worker thread reading the part (a read that
        # also needs the disk) must never find it in neither.
        self.kept.add(part)
        self.unread.add(part)
        self.flying.discard(part)
        self.budget._kept_part(self, part, self.store.layout.part_length(part))

    def end_flight(self, part: int) -> None:
        """A fetch into memory ended without completing the part: give its room back,
        unless a reader holds the part (it may be reading what arrived)."""
        if part not in self.flying:
            return
        if self.budget._pinned(self.store, part):
            self.partial.add(part)
            self.flying.discard(part)
            self.budget._kept[(id(self), part)] = self  # released once let go
        else:
            self.flying.discard(part)
            self._free(part)

    def release(self, part: int) -> None:
        """Forget a kept (or partial) part and give its memory back."""
        if part in self.kept or part in self.partial:
            self.kept.discard(part)
            self.unread.discard(part)
            self.partial.discard(part)
            self._free(part)

    def _free(self, part: int) -> None:
        first, end = self.store.layout.bounds(part)
        start = self.store.identity.start
        punch_hole(self.fd, first - start, end - first)
        self.budget._released(self, part, end - first)

    def close(self) -> None:
        """Release everything (the store closes; no fetch into it is running)."""
        for part in list(self.kept | self.partial):
            self.release(part)
        for part in list(self.flying):
            self.flying.discard(part)
            self._free(part)
        os.close(self.fd)
