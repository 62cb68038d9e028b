"""Part arithmetic, sizes and ranges."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ossfs.errors import UsageError
from ossfs.model import (
    MiB,
    PartLayout,
    format_size,
    parse_range,
    parse_size,
    resolve_range,
    store_part_size,
    validate_part_size,
)


def test_layout_edges() -> None:
    assert PartLayout(0, 0, 8).count == 0
    assert list(PartLayout(0, 0, 8).parts_for(0, 10)) == []
    one = PartLayout(0, 1, 8)
    assert one.count == 1 and one.bounds(0) == (0, 1)
    exact = PartLayout(0, 16, 8)
    assert exact.count == 2 and exact.bounds(1) == (8, 16)
    plus = PartLayout(0, 17, 8)
    assert plus.count == 3 and plus.bounds(2) == (16, 17) and plus.part_length(2) == 1
    ranged = PartLayout(100, 20, 8)
    assert ranged.bounds(0) == (100, 108) and ranged.bounds(2) == (116, 120)
    assert list(ranged.parts_for(0, 101)) == [0]
    assert list(ranged.parts_for(107, 2)) == [0, 1]
    assert list(ranged.parts_for(120, 5)) == []
    with pytest.raises(IndexError):
        plus.bounds(3)


@given(
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.integers(1, 999),
    st.integers(0, 12_000),
    st.integers(1, 3000),
)
def test_layout_covers_exactly(start: int, length: int, part: int, off: int, size: int) -> None:
    lay = PartLayout(start, length, part)
    covered = [lay.bounds(i) for i in range(lay.count)]
    assert sum(e - s for s, e in covered) == length
    for (_, e1), (s2, _) in zip(covered, covered[1:], strict=False):
        assert e1 == s2
    hit = set(lay.parts_for(off, size))
    for i, (s, e) in enumerate(covered):
        assert (i in hit) == (s < off + size and off < e)


def test_parse_size() -> None:
    assert parse_size("8MiB") == 8 * MiB
    assert parse_size("64M") == 64 * MiB
    assert parse_size("100k") == 100 * 1024
    assert parse_size("1.5G") == 3 * 512 * MiB
    assert parse_size("4096") == 4096
    for bad in ("", "abc", "-1", "1.3", "5X", "9" * 400, "9" * 400 + "G"):
        with pytest.raises(ValueError):
            parse_size(bad)
    # Exact at sizes a float cannot hold (2**53 + 1).
    assert parse_size("9007199254740993") == 9007199254740993
    assert parse_size("0.5K") == 512
    assert format_size(1536) == "1.5 KiB"


def test_parse_range() -> None:
    assert parse_range("0-9") == (0, 9)
    assert parse_range(" 90 - ") == (90, None)
    for bad in ("9-1", "x-1", "-5", "1-2-3", ""):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_resolve_range() -> None:
    assert resolve_range(0, 9, 100) == (0, 10)
    assert resolve_range(90, None, 100) == (90, 10)
    assert resolve_range(90, 500, 100) == (90, 10)  # clamped, as HTTP does
    for start, end in ((100, None), (9, 1), (0, -1), (-1, 5)):
        with pytest.raises(ValueError):
            resolve_range(start, end, 100)


def test_part_size_bounds() -> None:
    validate_part_size(100 * 1024)
    validate_part_size(5 * 1024 * MiB)
    for bad in (100 * 1024 - 1, 5 * 1024 * MiB + 1):
        with pytest.raises(UsageError, match="out of range"):
            validate_part_size(bad)


def test_small_objects_are_one_part_at_the_default_part_size() -> None:
    """At 1 MiB parts (the default) and above, an object of up to 8 MiB is one part,
    with the identity 8 MiB parts gave it before the default changed; a smaller part
    size cuts every object."""
    assert store_part_size(5 * MiB, MiB) == 8 * MiB
    assert store_part_size(8 * MiB, MiB) == 8 * MiB
    assert store_part_size(8 * MiB + 1, MiB) == MiB
    assert store_part_size(5 * MiB, 2 * MiB) == 8 * MiB
    assert store_part_size(20 * MiB, 16 * MiB) == 16 * MiB
    assert store_part_size(12 * MiB, 16 * MiB) == 16 * MiB
    assert store_part_size(5 * MiB, 256 * 1024) == 256 * 1024
    assert store_part_size(0, MiB) == 8 * MiB


def test_spans_merge_consecutive_parts() -> None:
    layout = PartLayout(0, 10 * 100 + 7, 100)
    assert layout.spans([]) == []
    assert layout.spans([3, 1, 2, 2, 7, 10]) == [(100, 400), (700, 800), (1000, 1007)]
