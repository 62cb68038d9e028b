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

A process in a memory cgroup (cgroup v2, as in a Kubernetes pod) has a second
ceiling: the kernel also throttles a cgroup's writers once *its* dirty pages pass
its share of the memory it may still use, that is its file pages plus its headroom
under ``memory.max`` / ``memory.high`` (``mdtc_calc_avail`` and
``domain_dirty_limits``). A pod limited to 2 GiB on a 64 GiB machine is paused long
before the machine's ceiling is near, so both ceilings are checked, from the
daemon's own cgroup (``memory.stat``) and its ancestors (the tightest headroom).
Version 1 memory cgroups have no dirty limit of their own; they are not read.

The check reads a few small files at most every `INTERVAL` seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "DirtyPressure",
    "CgroupMemory",
    "free_run_ceiling",
    "cgroup_free_run_ceiling",
    "find_cgroup",
    "ENTER",
    "LEAVE",
    "INTERVAL",
]

ENTER = 0.75
LEAVE = 0.5
INTERVAL = 0.05
_PAGE = 4096


def dirtyable(meminfo: dict[str, int]) -> int:
    """Bytes of the machine's memory that can hold file pages (``global_dirtyable_memory``)."""
    return meminfo["MemFree"] + meminfo["Active(file)"] + meminfo["Inactive(file)"]


def _ceiling(avail: int, vm: dict[str, int], global_avail: int | None = None) -> int:
    # The free-run ceiling of a domain whose dirtyable memory is *avail*. The byte
    # settings apply as they are to the machine; for a cgroup they become the ratio
    # they are of the machine's dirtyable memory (*global_avail*).
    def limit(name: str, ratio: str) -> int:
        set_bytes = vm[name]
        if not set_bytes:
            return avail * vm[ratio] // 100
        if global_avail is None:
            return set_bytes
        return avail * min(set_bytes, global_avail) // max(global_avail, 1)

    thresh = limit("dirty_bytes", "dirty_ratio")
    background = limit("dirty_background_bytes", "dirty_background_ratio")
    if background >= thresh:
        background = thresh // 2
    return max(_PAGE, (thresh + background) // 2)


def free_run_ceiling(meminfo: dict[str, int], vm: dict[str, int]) -> int:
    """Bytes of dirty and under-writeback pages above which the kernel pauses writers.

    *meminfo*: ``/proc/meminfo`` in bytes (MemFree, Active(file), Inactive(file));
    *vm*: ``dirty_bytes``, ``dirty_ratio``, ``dirty_background_bytes``,
    ``dirty_background_ratio``.
    """
    return _ceiling(dirtyable(meminfo), vm)


@dataclass(frozen=True)
class CgroupMemory:
    """What the kernel weighs of a memory cgroup (bytes): its file pages, its dirty
    and under-writeback pages, and the least headroom under the limits of it and its
    ancestors (None: no limit)."""

    file: int
    dirty: int
    headroom: int | None


def cgroup_free_run_ceiling(cg: CgroupMemory, meminfo: dict[str, int], vm: dict[str, int]) -> int:
    """The cgroup's own free-run ceiling: its dirtyable memory is its file pages plus
    the clean memory it could still take (its headroom, at most the machine's clean
    file and free memory that is not its own)."""
    global_avail = dirtyable(meminfo)
    global_dirty = meminfo["Dirty"] + meminfo["Writeback"]
    clean = cg.file - min(cg.file, cg.dirty)
    global_clean = global_avail - min(global_avail, global_dirty)
    other_clean = global_clean - min(global_clean, clean)
    room = other_clean if cg.headroom is None else min(cg.headroom, other_clean)
    return _ceiling(cg.file + room, vm, global_avail)


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


def find_cgroup(
    proc: str = "/proc/self/cgroup", mounts: str = "/proc/self/mounts"
) -> list[str] | None:
    """The directories of this process's cgroup v2 and its ancestors up to the
    hierarchy's mount (innermost first); None if it has no v2 memory cgroup of its own
    (version 1, no v2 mount, or the root cgroup)."""
    try:
        with open(mounts) as f:
            points = [line.split()[1] for line in f if line.split()[2:3] == ["cgroup2"]]
        with open(proc) as f:
            paths = [line.rstrip("\n")[3:] for line in f if line.startswith("0::")]
    except (OSError, IndexError):
        return None
    if not points or not paths:
        return None
    top = points[0].replace("\\040", " ")
    walk = [os.path.normpath(top + "/" + paths[0].lstrip("/"))]
    while walk[-1] != top and walk[-1].startswith(top.rstrip("/") + "/"):
        walk.append(os.path.dirname(walk[-1]))
    # The root cgroup has no limits (no memory.max) and ends the walk; a cgroup
    # without the memory controller is charged to the nearest one with it.
    dirs = [d for d in walk if os.path.exists(os.path.join(d, "memory.max"))]
    if not dirs or not os.path.exists(os.path.join(dirs[0], "memory.stat")):
        return None
    return dirs


def _limit(path: str) -> int | None:
    with open(path) as f:
        text = f.read().strip()
    return None if text == "max" else int(text)


def read_cgroup(dirs: list[str]) -> CgroupMemory:
    """*dirs*: from `find_cgroup`. The innermost one's ``memory.stat``; the headroom
    under ``memory.max`` and ``memory.high`` of each."""
    stat: dict[str, int] = {}
    with open(os.path.join(dirs[0], "memory.stat")) as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name in ("active_file", "inactive_file", "file_dirty", "file_writeback"):
                stat[name] = int(value)
    headroom: int | None = None
    for d in dirs:
        limits = [_limit(os.path.join(d, n)) for n in ("memory.max", "memory.high")]
        ceiling = min((v for v in limits if v is not None), default=None)
        if ceiling is None:
            continue
        with open(os.path.join(d, "memory.current")) as f:
            used = int(f.read())
        room = max(0, ceiling - used)
        headroom = room if headroom is None else min(headroom, room)
    return CgroupMemory(
        file=stat["active_file"] + stat["inactive_file"],
        dirty=stat["file_dirty"] + stat["file_writeback"],
        headroom=headroom,
    )


class DirtyPressure:
    """Callable: True while dirty pages are near the kernel's ceiling, the machine's
    or the daemon's memory cgroup's."""

    def __init__(
        self,
        *,
        meminfo: Callable[[], dict[str, int]] = read_meminfo,
        vm: Callable[[], dict[str, int]] = read_vm,
        cgroup: Callable[[], CgroupMemory | None] | None = None,
        cgroup_dir: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """*cgroup*: the daemon's memory cgroup now (None: not in one), read from the
        directory *cgroup_dir*; by default the one `find_cgroup` finds."""
        if cgroup is None:
            dirs = find_cgroup()
            cgroup = (lambda: read_cgroup(dirs)) if dirs else (lambda: None)
            cgroup_dir = dirs[0] if dirs else None
        self.cgroup_dir = cgroup_dir  # shown by `ossfs status`
        self._meminfo = meminfo
        self._vm = vm
        self._cgroup = cgroup
        self._clock = clock
        self._next = 0.0
        self.on = False
        self.available = True  # False once the files could not be read (never pressure)
        self.cgroup_available = True  # False once the cgroup's could not be (machine only)

    def __call__(self) -> bool:
        now = self._clock()
        if now < self._next or not self.available:
            return self.on
        self._next = now + INTERVAL
        try:
            info = self._meminfo()
            vm = self._vm()
            level = (info["Dirty"] + info["Writeback"]) / free_run_ceiling(info, vm)
        except (OSError, KeyError, ValueError):
            self.available = False
            self.on = False
            return False
        if self.cgroup_available:
            try:
                cg = self._cgroup()
                if cg is not None:
                    level = max(level, cg.dirty / cgroup_free_run_ceiling(cg, info, vm))
            except (OSError, KeyError, ValueError):
                self.cgroup_available = False
        self.on = level >= (LEAVE if self.on else ENTER)
        return self.on
