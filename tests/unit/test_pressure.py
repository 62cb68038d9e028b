"""When a mount considers its cache disk behind (ossfs.pressure): the kernel's free-run
ceiling computed from /proc/meminfo and vm.dirty_*, and the on/off hysteresis."""

from __future__ import annotations

from pathlib import Path

from ossfs.pressure import DirtyPressure, free_run_ceiling, read_meminfo

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
