"""When a mount considers its cache disk behind (ossfs.pressure): the kernel's free-run
ceilings computed from /proc/meminfo and vm.dirty_*, the machine's and a memory
cgroup's (v2), and the on/off hysteresis."""

from __future__ import annotations

from pathlib import Path

import pytest

from ossfs import mount
from ossfs.pressure import (
    CgroupMemory,
    DirtyPressure,
    cgroup_free_run_ceiling,
    find_cgroup,
    free_run_ceiling,
    read_cgroup,
    read_meminfo,
)

MiB = 1 << 20
GiB = 1 << 30

RATIOS = {
    "dirty_bytes": 0,
    "dirty_ratio": 20,
    "dirty_background_bytes": 0,
    "dirty_background_ratio": 10,
}
BYTES = {
    "dirty_bytes": 512 * MiB,
    "dirty_ratio": 20,
    "dirty_background_bytes": 256 * MiB,
    "dirty_background_ratio": 10,
}


def _meminfo(dirty: int = 0, writeback: int = 0) -> dict[str, int]:
    return {
        "MemFree": 8 * GiB,
        "Active(file)": 1 * GiB,
        "Inactive(file)": 1 * GiB,
        "Dirty": dirty,
        "Writeback": writeback,
    }


def test_the_ceiling_is_half_way_between_the_two_limits() -> None:
    # 10 GiB can hold file pages: 20% is 2 GiB, 10% is 1 GiB.
    assert free_run_ceiling(_meminfo(), RATIOS) == 1536 * MiB
    assert free_run_ceiling(_meminfo(), BYTES) == 384 * MiB
    # A background limit at or above the limit counts as half of it (as the kernel does).
    odd = {**BYTES, "dirty_bytes": 100 * MiB, "dirty_background_bytes": 200 * MiB}
    assert free_run_ceiling(_meminfo(), odd) == 75 * MiB


def test_pressure_comes_near_the_ceiling_and_goes_well_below_it() -> None:
    now = [0.0]
    info = [_meminfo()]
    p = DirtyPressure(meminfo=lambda: info[0], vm=lambda: BYTES, clock=lambda: now[0])
    seen = []
    for dirty in (250, 300, 200, 150, 290):  # MiB; ceiling 384: on at 288, off below 192
        info[0] = _meminfo(dirty=(dirty - 10) * MiB, writeback=10 * MiB)
        now[0] += 1
        seen.append(p())
    assert seen == [False, True, True, False, True]
    # Asked again within INTERVAL, the files are not read again.
    info[0] = _meminfo()
    assert p() is True
    now[0] += 1
    assert p() is False


def test_without_the_files_there_is_never_pressure(tmp_path: Path) -> None:
    p = DirtyPressure(meminfo=lambda: read_meminfo(str(tmp_path / "none")), vm=lambda: BYTES)
    assert p() is False
    assert p.available is False


def test_proc_meminfo_is_read_in_bytes() -> None:
    info = read_meminfo()
    assert info["MemTotal"] > 64 * MiB
    assert {"MemFree", "Active(file)", "Inactive(file)", "Dirty", "Writeback"} <= set(info)
    assert DirtyPressure()() in (True, False)


# A pod limited to 2 GiB, 1.5 GiB of it used (1 GiB of file pages), on the machine of
# _meminfo (10 GiB can hold file pages).
POD = CgroupMemory(file=1 * GiB, dirty=0, headroom=512 * MiB)


def test_a_cgroup_s_ceiling_is_its_share_of_what_it_may_still_use() -> None:
    # Its dirtyable memory: 1 GiB of file pages + 512 MiB of headroom = 1.5 GiB.
    # Ratios: 20% and 10% of it, half way between: 15%.
    assert (
        cgroup_free_run_ceiling(POD, _meminfo(), RATIOS)
        == (1536 * MiB * 20 // 100 + 1536 * MiB * 10 // 100) // 2
    )
    # Byte settings become the ratio they are of the machine: 512 MiB and 256 MiB of
    # 10 GiB are 5% and 2.5%.
    assert (
        cgroup_free_run_ceiling(POD, _meminfo(), BYTES)
        == (1536 * MiB * 512 // 10240 + 1536 * MiB * 256 // 10240) // 2
    )
    # Far below the machine's: 230 MiB against 1.5 GiB with the ratios.
    assert (
        cgroup_free_run_ceiling(POD, _meminfo(), RATIOS) < free_run_ceiling(_meminfo(), RATIOS) / 6
    )


def test_a_cgroup_s_headroom_is_capped_by_the_clean_memory_of_the_rest_of_the_machine() -> None:
    # 5 GiB of headroom, but of the machine's 10 GiB dirtyable 4.5 GiB are dirty:
    # 5.5 GiB clean, 1 GiB of it the cgroup's own, so only 4.5 GiB more to take.
    # Its dirtyable memory: 1 + 4.5 = 5.5 GiB.
    cg = CgroupMemory(file=1 * GiB, dirty=0, headroom=5 * GiB)
    info = _meminfo(dirty=4 * GiB + 512 * MiB)
    assert (
        cgroup_free_run_ceiling(cg, info, RATIOS)
        == (5632 * MiB * 20 // 100 + 5632 * MiB * 10 // 100) // 2
    )


def test_dirty_pages_are_not_clean_memory_a_cgroup_could_take() -> None:
    # The machine: 10 GiB dirtyable, 3 GiB dirty and 1 GiB under writeback: 6 GiB clean.
    # The cgroup: 2 GiB of file pages, 512 MiB dirty and 512 MiB under writeback, so
    # 1 GiB of them clean; the rest of the machine has 5 GiB clean, below its 8 GiB of
    # headroom. Its dirtyable memory: 2 + 5 = 7 GiB.
    cg = CgroupMemory(file=2 * GiB, dirty=1 * GiB, headroom=8 * GiB)
    info = _meminfo(dirty=3 * GiB, writeback=1 * GiB)
    assert (
        cgroup_free_run_ceiling(cg, info, RATIOS)
        == (7 * GiB * 20 // 100 + 7 * GiB * 10 // 100) // 2
    )


def test_a_cgroup_without_a_limit_holding_every_file_page_has_the_machine_s_ceiling() -> None:
    cg = CgroupMemory(file=2 * GiB, dirty=0, headroom=None)
    for vm in (RATIOS, BYTES):
        assert cgroup_free_run_ceiling(cg, _meminfo(), vm) == free_run_ceiling(_meminfo(), vm)


def test_pressure_comes_from_the_cgroup_while_the_machine_is_far_from_its_ceiling() -> None:
    now = [0.0]
    cg = [POD]
    p = DirtyPressure(
        meminfo=_meminfo, vm=lambda: RATIOS, cgroup=lambda: cg[0], clock=lambda: now[0]
    )
    seen = []
    # The pod's ceiling is 230.4 MiB: on at 172.8, off below 115.2. The machine's is
    # 1.5 GiB, and the machine's dirty pages are left at 0 here.
    for dirty in (150, 180, 120, 110, 200):
        cg[0] = CgroupMemory(file=POD.file, dirty=dirty * MiB, headroom=POD.headroom)
        now[0] += 1
        seen.append(p())
    assert seen == [False, True, True, False, True]


def test_a_cgroup_that_cannot_be_read_leaves_the_machine_s_ceiling(tmp_path: Path) -> None:
    now = [0.0]
    info = [_meminfo()]
    p = DirtyPressure(
        meminfo=lambda: info[0],
        vm=lambda: BYTES,
        cgroup=lambda: read_cgroup([str(tmp_path / "gone")]),
        clock=lambda: now[0],
    )
    assert p() is False
    assert p.cgroup_available is False and p.available is True
    info[0] = _meminfo(dirty=300 * MiB)
    now[0] += 1
    assert p() is True


def _cgroup_tree(
    tmp_path: Path,
    path: str,
    limits: dict[str, tuple[str, str, int]],
    *,
    top_name: str = "cg",
    root: str = "/",
    controllers: str = "cpuset cpu io memory pids",
    cache_fs: str = "ext4",
) -> tuple[str, str, Path]:
    """A cgroup2 mount at tmp_path/*top_name* (showing the hierarchy from *root*) with
    this process in *path*, and a cache directory on a *cache_fs* mount; *limits*: per
    cgroup below the mount, (memory.max, memory.high, memory.current). The files /proc
    would hold (mountinfo, cgroup) and the cache directory."""
    top = tmp_path / top_name
    top.mkdir()
    (top / "cgroup.controllers").write_text(controllers + "\n")
    (top / "memory.stat").write_text("anon 1\nfile 2\n")  # the root: no limits
    for name, (mmax, high, current) in limits.items():
        d = top / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.max").write_text(mmax + "\n")
        (d / "memory.high").write_text(high + "\n")
        (d / "memory.current").write_text(f"{current}\n")
        (d / "memory.stat").write_text(
            "anon 5\nfile 300\nactive_file 100\ninactive_file 200\n"
            "file_dirty 30\nfile_writeback 20\nfile_mapped 7\n"
        )
    cache = tmp_path / "cache"
    cache.mkdir()
    escaped = str(top).replace(" ", "\\040")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_bytes(
        b"1 0 8:1 / / rw,relatime - ext4 /dev/vda rw\n"
        + f"30 1 0:26 / {cache} rw - {cache_fs} none rw\n".encode()
        + b"31 1 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        + b"32 1 0:28 / /mnt/\xff\xfe rw - tmpfs tmpfs rw\n"  # (not UTF-8)
        + f"33 1 0:29 {root} {escaped} rw,nsdelegate - cgroup2 cgroup2 rw\n".encode()
    )
    proc = tmp_path / "cgroup"
    proc.write_text(f"4:memory:/v1/path\n0::{path}\n")
    return str(mountinfo), str(proc), cache


POD_TREE = {
    "kubepods": ("max", "max", 10 * GiB),
    "kubepods/pod1": (str(2 * GiB), "max", 1536 * MiB),  # 512 MiB left
    "kubepods/pod1/ctr": ("max", str(3 * GiB), 1024 * MiB),  # 2 GiB left
}


def test_the_daemon_s_cgroup_and_the_tightest_headroom_of_it_and_its_ancestors(
    tmp_path: Path,
) -> None:
    mountinfo, proc, cache = _cgroup_tree(tmp_path, "/kubepods/pod1/ctr", POD_TREE)
    dirs = find_cgroup(str(cache), proc=proc, mountinfo=mountinfo)
    top = tmp_path / "cg"
    assert dirs == [
        str(top / "kubepods/pod1/ctr"),
        str(top / "kubepods/pod1"),
        str(top / "kubepods"),
    ]
    assert read_cgroup(dirs) == CgroupMemory(file=300, dirty=50, headroom=512 * MiB)
    # memory.high counts as a limit too: 1.25 GiB high, 1 GiB used.
    (top / "kubepods/pod1/ctr/memory.high").write_text(f"{1280 * MiB}\n")
    assert read_cgroup(dirs).headroom == 256 * MiB


def test_a_container_s_own_view_of_its_cgroup_and_a_mount_path_with_a_space(
    tmp_path: Path,
) -> None:
    # In a cgroup namespace /proc/self/cgroup says "0::/" and the mount is the
    # container's own cgroup, which has limits.
    mountinfo, proc, _cache = _cgroup_tree(
        tmp_path, "/", {".": (str(GiB), "max", 256 * MiB)}, top_name="cg root"
    )
    top = str(tmp_path / "cg root")
    assert find_cgroup(proc=proc, mountinfo=mountinfo) == [top]
    assert read_cgroup([top]).headroom == 768 * MiB


def test_a_mount_of_part_of_the_hierarchy(tmp_path: Path) -> None:
    # The v2 hierarchy's /kubepods/pod1 mounted at tmp_path/cg: its root field says so.
    mountinfo, proc, cache = _cgroup_tree(
        tmp_path,
        "/kubepods/pod1/ctr",
        {".": (str(2 * GiB), "max", GiB), "ctr": ("max", "max", GiB)},
        root="/kubepods/pod1",
    )
    top = tmp_path / "cg"
    assert find_cgroup(str(cache), proc=proc, mountinfo=mountinfo) == [
        str(top / "ctr"),
        str(top),
    ]
    # A process elsewhere in the hierarchy is not in what that mount shows.
    Path(proc).write_text("0::/system.slice/other\n")
    assert find_cgroup(str(cache), proc=proc, mountinfo=mountinfo) is None


@pytest.mark.parametrize(
    ("path", "options"),
    [
        ("/", {}),  # the root cgroup: no limits
        ("/system.slice/nomemory", {}),  # no memory controller on the way
        ("/kubepods/pod1/ctr", {"controllers": "cpu memory pids"}),  # no cgroup writeback
        ("/kubepods/pod1/ctr", {"cache_fs": "tmpfs"}),  # a cache without cgroup writeback
        ("/kubepods/pod1/ctr", {"cache_fs": "fuse.sshfs"}),
        ("/../../kubepods/pod1/ctr", {}),  # outside this namespace's view
    ],
)
def test_no_dirty_ceiling_of_its_own(tmp_path: Path, path: str, options: dict[str, str]) -> None:
    tree = POD_TREE if path.endswith("ctr") else {}
    mountinfo, proc, cache = _cgroup_tree(tmp_path, path, tree, **options)
    assert find_cgroup(str(cache), proc=proc, mountinfo=mountinfo) is None


def test_no_cgroup_v2_means_the_machine_s_ceiling_only(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("31 1 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/a\n0::/\n")
    assert find_cgroup(proc=str(proc), mountinfo=str(mountinfo)) is None
    assert find_cgroup(proc=str(tmp_path / "none"), mountinfo=str(mountinfo)) is None


def test_a_cgroup_the_daemon_cannot_make_sense_of_never_stops_a_mount(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_bytes(b"\xff garbage\n33 1 0:29 / /x - cgroup2 cgroup2 rw\n")
    proc = tmp_path / "cgroup"
    proc.write_bytes(b"0::/\xff\n")
    assert find_cgroup(proc=str(proc), mountinfo=str(mountinfo)) is None  # (no /x)
    assert DirtyPressure(meminfo=_meminfo, vm=lambda: RATIOS)() is False


def test_a_mount_reads_the_cgroup_it_is_pointed_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon's own wiring (ossfs.mount): a pod's dirty pages near its ceiling turn
    # the pressure on while the machine's meminfo shows none.
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal: 16777216 kB\nMemFree: 8388608 kB\nActive(file): 1048576 kB\n"
        "Inactive(file): 1048576 kB\nDirty: 0 kB\nWriteback: 0 kB\n"
    )
    pod = tmp_path / "pod"
    pod.mkdir()
    (pod / "memory.max").write_text(f"{2 * GiB}\n")
    (pod / "memory.high").write_text("max\n")
    (pod / "memory.current").write_text(f"{2 * GiB}\n")  # at its limit: no headroom

    def stat(dirty: int) -> None:
        (pod / "memory.stat").write_text(
            f"active_file {512 * MiB}\ninactive_file {512 * MiB}\n"
            f"file_dirty {dirty}\nfile_writeback 0\n"
        )

    monkeypatch.setenv("OSSFS_MEMINFO", str(meminfo))
    monkeypatch.setenv("OSSFS_CGROUP", str(pod))
    # Whatever this machine's vm.dirty_* (the real ones are read here): with no
    # headroom the pod's dirtyable memory is its 1 GiB of file pages, and no ceiling
    # is above all of it; none dirty is below any.
    stat(0)
    assert mount._dirty_pressure(str(tmp_path))() is False
    stat(1 * GiB)
    assert mount._dirty_pressure(str(tmp_path))() is True
