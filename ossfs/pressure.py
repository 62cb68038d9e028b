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
The kernel applies the cgroup's ceiling only with cgroup writeback (the io
controller on v2, and a cache on a file system that supports it, such as ext4 or
XFS); version 1 memory cgroups have none. Elsewhere only the machine's is read.
Nothing here can stop a mount: files that cannot be read or parsed mean no
pressure from them.

The check reads a few small files at most every `INTERVAL` seconds.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

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


# File systems whose writeback the kernel charges to memory cgroups (SB_I_CGROUPWB):
# a cache elsewhere (tmpfs, NFS, a FUSE file system) meets the machine's ceiling only.
CGROUP_WRITEBACK_FS = frozenset({"ext2", "ext4", "xfs", "btrfs", "f2fs"})


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _mounts(mountinfo: str) -> list[tuple[str, str, str]]:
    """(root within the file system, mount point, type) of each mount."""
    out = []
    with open(mountinfo, "rb") as f:
        for raw in f:
            left, sep, right = raw.decode("utf-8", "surrogateescape").partition(" - ")
            a, b = left.split(), right.split()
            if sep and len(a) >= 5 and b:
                out.append((_unescape(a[3]), _unescape(a[4]), b[0]))
    return out


def _fs_type(path: str, mounts: list[tuple[str, str, str]]) -> str | None:
    """The type of the file system *path* is on (the innermost mount holding it)."""
    holding = [
        (len(point), fstype)
        for _root, point, fstype in mounts
        if path == point or path.startswith(point.rstrip("/") + "/")
    ]
    # (the last of the longest: a later mount on the same point hides an earlier one)
    return max(reversed(holding), key=lambda m: m[0])[1] if holding else None


def find_cgroup(
    cache_dir: str | None = None,
    *,
    proc: str = "/proc/self/cgroup",
    mountinfo: str = "/proc/self/mountinfo",
) -> list[str] | None:
    """The directories of this process's memory cgroup (v2) and its ancestors that have
    limits, innermost first; None when the kernel gives it no dirty ceiling of its own:
    cgroup v1, the root cgroup, no io controller on v2 (no cgroup writeback), or a
    cache directory (*cache_dir*) on a file system without cgroup writeback."""
    try:
        mounts = _mounts(mountinfo)
        with open(proc, "rb") as f:
            paths = [
                line.decode("utf-8", "surrogateescape").rstrip("\n")[3:]
                for line in f
                if line.startswith(b"0::")
            ]
        if not paths or ".." in paths[0].split("/"):
            return None  # (a cgroup outside this namespace's view)
        cache_fs = _fs_type(os.path.realpath(cache_dir), mounts) if cache_dir else None
        if cache_dir and cache_fs not in CGROUP_WRITEBACK_FS:
            return None
        path = paths[0].rstrip("/") or "/"
        for root, top, fstype in mounts:
            if fstype != "cgroup2":
                continue
            root = root.rstrip("/")
            if path != (root or "/") and not path.startswith(root + "/"):
                continue  # a bind mount of another part of the hierarchy
            with open(os.path.join(top, "cgroup.controllers")) as f:
                if "io" not in f.read().split():
                    return None
            walk = [os.path.normpath(top + "/" + path[len(root) :])]
            while walk[-1] != top and walk[-1].startswith(top.rstrip("/") + "/"):
                walk.append(os.path.dirname(walk[-1]))
            # The root cgroup has no limits (no memory.max) and ends the walk; a cgroup
            # without the memory controller is charged to the nearest one with it.
            dirs = [d for d in walk if os.path.exists(os.path.join(d, "memory.max"))]
            if dirs and os.path.exists(os.path.join(dirs[0], "memory.stat")):
                return dirs
            return None
    except (OSError, ValueError):
        return None
    return None


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
        cache_dir: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """*cgroup*: the daemon's memory cgroup now (None: not in one), read from the
        directory *cgroup_dir*; by default the one `find_cgroup` finds for a cache in
        *cache_dir*."""
        if cgroup is None:
            try:
                dirs = find_cgroup(cache_dir)
            except Exception as e:  # never a reason not to mount
                log.debug("pressure: no memory cgroup looked at: %r", e)
                dirs = None
            cgroup = (lambda: read_cgroup(dirs)) if dirs else (lambda: None)
            cgroup_dir = dirs[0] if dirs else None
        self.cgroup_dir = cgroup_dir  # shown by `ossfs status` (None once unreadable)
        self._meminfo = meminfo
        self._vm = vm
        self._cgroup = cgroup
        self._clock = clock
        self._next = 0.0
        self.on = False
        self.available = True  # False once the files could not be read (never pressure)
        self.cgroup_available = True  # False once the cgroup's could not (machine only)

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
            except (OSError, KeyError, ValueError) as e:
                # (moved to another cgroup, or its own was removed)
                log.info(
                    "pressure: the memory cgroup %s can no longer be read (%s); "
                    "only the machine's dirty pages are watched",
                    self.cgroup_dir,
                    e,
                )
                self.cgroup_available = False
                self.cgroup_dir = None
        self.on = level >= (LEAVE if self.on else ENTER)
        return self.on
