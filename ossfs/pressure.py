"""Whether writing into the page cache is about to be paused by the kernel.

The kernel lets writers dirty pages freely up to its *free-run ceiling*, half way
between the background and the foreground dirty limits (``vm.dirty_*``, of the
memory that can hold file pages); above it, every write into the page cache is
paused in proportion to how far the disk is behind (``balance_dirty_pages`` in
mm/page-writeback.c). `DirtyPressure` computes that ceiling from ``/proc/meminfo``
and ``/proc/sys/vm`` the same way and says "under pressure" once the dirty and
under-writeback pages pass `ENTER` of it, until they fall below `LEAVE` of it. A
mount then fetches its readers' parts into memory (`ossfs.cache.memory`) rather
than into the cache, so that a slow cache disk never slows a reader.

The check reads two small files at most every `INTERVAL` seconds. A memory
cgroup's own dirty limit (cgroup v2) is not seen; the machine's is.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["DirtyPressure", "free_run_ceiling", "ENTER", "LEAVE", "INTERVAL"]

ENTER = 0.75
LEAVE = 0.5
INTERVAL = 0.05
_PAGE = 4096


def free_run_ceiling(meminfo: dict[str, int], vm: dict[str, int]) -> int:
    """Bytes of dirty and under-writeback pages above which the kernel pauses writers.

    *meminfo*: ``/proc/meminfo`` in bytes (MemFree, Active(file), Inactive(file));
    *vm*: ``dirty_bytes``, ``dirty_ratio``, ``dirty_background_bytes``,
    ``dirty_background_ratio``.
    """
    dirtyable = meminfo["MemFree"] + meminfo["Active(file)"] + meminfo["Inactive(file)"]
    thresh = vm["dirty_bytes"] or dirtyable * vm["dirty_ratio"] // 100
    background = vm["dirty_background_bytes"] or dirtyable * vm["dirty_background_ratio"] // 100
    if background >= thresh:
        background = thresh // 2
    return max(_PAGE, (thresh + background) // 2)


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    out = {}
    with open(path, "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            fields = rest.split()
            if fields:
                out[name.decode()] = int(fields[0]) * 1024  # kB
    return out


def read_vm(root: str = "/proc/sys/vm") -> dict[str, int]:
    out = {}
    for name in ("dirty_bytes", "dirty_ratio", "dirty_background_bytes", "dirty_background_ratio"):
        with open(f"{root}/{name}", "rb") as f:
            out[name] = int(f.read())
    return out


class DirtyPressure:
    """Callable: True while the machine's dirty pages are near the kernel's ceiling."""

    def __init__(
        self,
        *,
        meminfo: Callable[[], dict[str, int]] = read_meminfo,
        vm: Callable[[], dict[str, int]] = read_vm,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._meminfo = meminfo
        self._vm = vm
        self._clock = clock
        self._next = 0.0
        self.on = False
        self.available = True  # False once the files could not be read (never pressure)

    def __call__(self) -> bool:
        now = self._clock()
        if now < self._next or not self.available:
            return self.on
        self._next = now + INTERVAL
        try:
            info = self._meminfo()
            ceiling = free_run_ceiling(info, self._vm())
            dirty = info["Dirty"] + info["Writeback"]
        except (OSError, KeyError, ValueError):
            self.available = False
            self.on = False
            return False
        self.on = dirty >= (LEAVE if self.on else ENTER) * ceiling
        return self.on
