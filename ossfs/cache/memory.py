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
- A part is released once readers have read as many bytes as it holds (the
  kernel's page cache holds what was read; its requests arrive in any order)
  and none holds it, or, least recently kept first, when the budget needs room
  and no reader holds it (a pin, as for eviction). Read-ahead makes room only
  from parts that were read: one guess never pushes out another nobody has read.
- `MemoryBudget` bounds the bytes held, parts being fetched included. Read-ahead
  that does not fit is not started; a reader's own part always is, so the
  budget can be exceeded by at most the parts of the reads in progress.
- The CRC-64 of what arrived for a part is kept by the store after the part is
  released (`PartStore.note_served`): the whole-object check covers parts served
  from here. When it fails, no kept part is read again (`MemoryParts.distrust`).
- ``materialize`` never uses it: what it fetches lands in the cache.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING

from ossfs.fsutil import punch_hole, pwrite_all

if TYPE_CHECKING:
    from ossfs.cache.store import PartStore

__all__ = ["MemoryBudget", "MemoryParts", "DEFAULT_MEMORY_BUDGET", "FLYING", "KEPT", "PARTIAL"]

# The bytes of object data a mount may hold in memory for its readers (--memory-budget).
DEFAULT_MEMORY_BUDGET = 256 << 20


class MemoryBudget:
    """The bytes of parts all stores of a mount hold in memory, and their order."""

    def __init__(
        self,
        limit: int,
        *,
        pinned: Callable[[PartStore, int], bool],
        left_over: Callable[[PartStore, int], bool] = lambda store, part: False,
    ) -> None:
        """*pinned*: whether a reader holds a part (`CacheDir.is_pinned`); *left_over*:
        whether a reader may be reading what a failed fetch left of a part in the cache
        file (`CacheDir.left_over`; such a part is fetched into the cache file again)."""
        self.limit = limit
        self._pinned = pinned
        self.left_over = left_over
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


# What a part held in memory is (`MemoryParts.state`).
FLYING = 1  # being fetched into memory (room reserved)
KEPT = 2  # complete
PARTIAL = 3  # a fetch failed part-way while a reader held the part: what arrived stays
# readable for that reader (as in the cache file), until fetched again or released


class MemoryParts:
    """The parts of one store held in memory: an anonymous file the size of the store.

    A part's state is one entry of one dict, changed in one step: a worker thread
    reading a part a reader holds (`PartStore.read_into`) sees it in memory all along.
    """

    def __init__(self, store: PartStore, budget: MemoryBudget) -> None:
        self.store = store
        self.budget = budget
        self.state: dict[int, int] = {}
        self.unread: set[int] = set()  # kept parts no reader has read yet
        self.read_bytes: dict[int, int] = {}  # bytes of kept parts readers have read
        self.fd = os.memfd_create("ossfs-parts", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, store.identity.length)
        except BaseException:
            os.close(self.fd)
            raise

    def holds(self, part: int) -> bool:
        """Whether *part*'s bytes are read from memory (one lookup: thread-safe)."""
        return part in self.state

    def is_kept(self, part: int) -> bool:
        return self.state.get(part) == KEPT

    def parts_in(self, state: int) -> set[int]:
        return {p for p, s in self.state.items() if s == state}

    def fly(self, part: int) -> None:
        """A fetch into memory starts (its room reserved)."""
        self.state[part] = FLYING

    def take_over(self, part: int) -> bool:
        """A new fetch of a part a failed one left (its room is still reserved)."""
        if self.state.get(part) != PARTIAL:
            return False
        self.state[part] = FLYING
        self.read_bytes.pop(part, None)  # (what was read of the old bytes: not of these)
        self.budget._kept.pop((id(self), part), None)
        return True

    def write(self, offset: int, data: memoryview) -> None:
        pwrite_all(self.fd, data, offset - self.store.identity.start)

    def read_into(self, offset: int, view: memoryview) -> int:
        return os.preadv(self.fd, [view], offset - self.store.identity.start)

    def keep(self, part: int) -> None:
        """A part fetched into memory is complete (readers may have read it already,
        while it arrived)."""
        self.state[part] = KEPT
        self.budget._kept_part(self, part, self.store.layout.part_length(part))
        if not self.read_bytes.get(part):
            self.unread.add(part)
        else:
            self.let_go(part)

    def note_read(self, part: int, nbytes: int) -> None:
        """A reader read *nbytes* of a part being fetched or kept."""
        if self.state.get(part) in (FLYING, KEPT):
            self.unread.discard(part)
            self.read_bytes[part] = self.read_bytes.get(part, 0) + nbytes

    def read_through(self, part: int) -> bool:
        """Whether readers have read as many bytes as the part holds (its every byte,
        as far as can be told: the kernel's requests arrive in any order)."""
        return self.read_bytes.get(part, 0) >= self.store.layout.part_length(part)

    def let_go(self, part: int) -> None:
        """Release *part* if nobody needs it any more: read through, or what a failed
        fetch left, and no reader holds it."""
        state = self.state.get(part)
        if (state == PARTIAL or (state == KEPT and self.read_through(part))) and not (
            self.budget._pinned(self.store, part)
        ):
            self._free(part)

    def end_flight(self, part: int) -> None:
        """A fetch into memory ended without completing the part: give its room back,
        unless a reader holds the part (it may be reading what arrived)."""
        if self.state.get(part) != FLYING:
            return
        if self.budget._pinned(self.store, part):
            self.state[part] = PARTIAL
            self.budget._kept[(id(self), part)] = self  # released once let go
        else:
            self._free(part)

    def distrust(self) -> None:
        """The whole-object check failed: no kept part is read again (`retire`)."""
        for part, state in list(self.state.items()):
            if state == KEPT:
                self.retire(part)

    def retire(self, part: int) -> None:
        """No new read reads kept *part* from memory: its CRC no longer counts (the
        whole-object check failed, or a record in the index speaks for the part, and
        once that record is dropped the copy here would be covered by no CRC). One a
        reader holds stays readable for it, as what a failed fetch left (PARTIAL: a
        new read fetches it again); otherwise it is released."""
        if self.state.get(part) != KEPT:
            return
        if self.budget._pinned(self.store, part):
            self.state[part] = PARTIAL
            self.unread.discard(part)
            self.read_bytes.pop(part, None)
        else:
            self._free(part)

    def release(self, part: int) -> None:
        """Forget a kept (or partial) part and give its memory back."""
        if self.state.get(part) in (KEPT, PARTIAL):
            self._free(part)

    def _free(self, part: int) -> None:
        del self.state[part]
        self.unread.discard(part)
        self.read_bytes.pop(part, None)
        first, end = self.store.layout.bounds(part)
        self.budget._released(self, part, end - first)
        with suppress(OSError):  # (the pages then stay until the store closes)
            punch_hole(self.fd, first - self.store.identity.start, end - first)

    def close(self) -> None:
        """Release everything (the store closes; no fetch into it is running)."""
        for part in list(self.state):
            self._free(part)
        os.close(self.fd)
