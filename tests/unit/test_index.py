"""The part index: a journal that survives torn writes, corruption and concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from ossfs.cache.index import (
    MAGIC,
    VERSION,
    IndexCorrupt,
    IndexFile,
    PartRecord,
    StoreIdentity,
    _line,
    format_add,
    format_header,
    parse_index,
)

IDENT = StoreIdentity(bucket="b", key="k", etag="E", size=1000, part_size=100, start=0, length=1000)


def test_roundtrip_and_drop(tmp_path: Path) -> None:
    path = str(tmp_path / "index")
    idx = IndexFile.create(path, IDENT)
    idx.add(0, PartRecord(100, 11))
    idx.add(9, PartRecord(100, 99))
    idx.drop([0])
    idx.close()
    again = IndexFile.load(path)
    assert again is not None
    assert again.state.identity == IDENT
    assert again.state.parts == {9: PartRecord(100, 99)}
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_torn_record_is_skipped_and_next_append_survives(tmp_path: Path) -> None:
    path = str(tmp_path / "index")
    idx = IndexFile.create(path, IDENT)
    idx.add(1, PartRecord(100, 1))
    idx.close()
    with open(path, "ab") as f:  # a crash in the middle of a record
        f.write(format_add(2, PartRecord(100, 2))[:7])
    idx = IndexFile.load(path)
    assert idx is not None and set(idx.state.parts) == {1}
    idx.add(3, PartRecord(100, 3))
    idx.close()
    idx = IndexFile.load(path)
    assert idx is not None and set(idx.state.parts) == {1, 3}
    assert idx.state.bad_lines == 1


def test_damaged_lines_and_impossible_records_are_ignored() -> None:
    data = bytearray(
        format_header(IDENT) + format_add(0, PartRecord(100, 5)) + format_add(1, PartRecord(100, 6))
    )
    data[-5] ^= 0x01  # flip a bit in the checksum of part 1's line
    state = parse_index(bytes(data))
    assert set(state.parts) == {0} and state.bad_lines == 1
    wrong_len = parse_index(format_header(IDENT) + format_add(0, PartRecord(50, 5)))
    assert wrong_len.parts == {} and wrong_len.bad_lines == 1
    out_of_range = parse_index(format_header(IDENT) + format_add(10, PartRecord(100, 5)))
    assert out_of_range.parts == {}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage\n",
        b"ossfs-index 1 {} 00000000\n",
        format_header(IDENT)[:-3] + b"zz\n",
        format_header(IDENT).replace(b"ossfs-index 1", b"ossfs-index 9"),
    ],
)
def test_unusable_header(data: bytes) -> None:
    with pytest.raises(IndexCorrupt):
        parse_index(data)


def test_compaction_is_followed_by_other_readers(tmp_path: Path) -> None:
    path = str(tmp_path / "index")
    writer = IndexFile.create(path, IDENT)
    reader = IndexFile.load(path)
    assert reader is not None
    for _ in range(50):
        for p in range(10):
            writer.add(p, PartRecord(100, p))
        writer.drop(list(range(10)))
    writer.add(4, PartRecord(100, 44))
    before = os.stat(path).st_ino
    assert writer.compact_if_worthwhile()
    assert os.stat(path).st_ino != before
    assert os.path.getsize(path) < 200
    writer.add(5, PartRecord(100, 55))
    reader.refresh()
    assert reader.state.parts == {4: PartRecord(100, 44), 5: PartRecord(100, 55)}
    # The reader appends after the rename: its record lands in the new file.
    reader.add(6, PartRecord(100, 66))
    fresh = IndexFile.load(path)
    assert fresh is not None and set(fresh.state.parts) == {4, 5, 6}


def _append_many(path: str, parts: list[int]) -> None:
    idx = IndexFile.load(path)
    assert idx is not None
    for p in parts:
        idx.add(p, PartRecord(100 if p < 9 else 100, p))
    idx.close()


def test_concurrent_processes_append(tmp_path: Path) -> None:
    ident = StoreIdentity(
        bucket="b", key="k", etag="E", size=400_000, part_size=100, start=0, length=400_000
    )
    path = str(tmp_path / "index")
    IndexFile.create(path, ident).close()
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_append_many, args=(path, list(range(i, 4000, 4)))) for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    idx = IndexFile.load(path)
    assert idx is not None
    assert set(idx.state.parts) == set(range(4000)) and idx.state.bad_lines == 0


def test_create_without_replace_keeps_a_concurrent_index(tmp_path: Path) -> None:
    path = str(tmp_path / "index")
    first = IndexFile.create(path, IDENT)
    first.add(2, PartRecord(100, 2))
    second = IndexFile.create(path, IDENT, replace=False)
    assert set(second.state.parts) == {2}


def test_an_append_takes_in_what_others_appended_first(tmp_path: Path) -> None:
    """An append applies the records another writer added before it (and its own),
    so that the in-memory state is the file's, with or without a torn line."""
    path = str(tmp_path / "index")
    a = IndexFile.create(path, IDENT)
    b = IndexFile.load(path)
    assert b is not None
    a.add(1, PartRecord(100, 1))
    b.add(2, PartRecord(100, 2))
    a.add(3, PartRecord(100, 3))
    assert set(a.state.parts) == {1, 2, 3}
    assert a.state.consumed == os.path.getsize(path)
    with open(path, "ab") as f:  # a writer that died in the middle of a record
        f.write(format_add(4, PartRecord(100, 4))[:7])
    b.drop([1])
    assert set(b.state.parts) == {2, 3}
    assert b.state.consumed == os.path.getsize(path) and b.state.bad_lines == 1
    a.add(5, PartRecord(100, 5))
    assert set(a.state.parts) == {2, 3, 5} and a.state.consumed == os.path.getsize(path)
    fresh = IndexFile.load(path)
    assert fresh is not None and fresh.state.parts == a.state.parts


def test_a_record_torn_just_before_its_newline_stays_torn(tmp_path: Path) -> None:
    """A write cut off after all of a record but its newline (a full disk, a crash):
    the next append must not complete the line and bring the record back."""
    path = str(tmp_path / "index")
    idx = IndexFile.create(path, IDENT)
    idx.add(1, PartRecord(100, 1))
    idx.close()
    with open(path, "ab") as f:
        f.write(format_add(2, PartRecord(100, 2))[:-1])
    other = IndexFile.load(path)
    assert other is not None
    other.add(3, PartRecord(100, 3))
    assert set(other.state.parts) == {1, 3}
    fresh = IndexFile.load(path)
    assert fresh is not None and set(fresh.state.parts) == {1, 3}


@pytest.mark.parametrize(
    "change", [{"part_size": None}, {"size": "10"}, {"start": True}, {"key": 5}]
)
def test_a_header_with_a_right_checksum_and_wrong_types_is_corrupt(
    tmp_path: Path, change: dict[str, object]
) -> None:
    # (written by hand, or by another program: no traceback, a clear refusal)
    fields = {
        "bucket": "b",
        "key": "k",
        "etag": "e",
        "size": 10,
        "part_size": 4,
        "start": 0,
        "length": 10,
    }
    fields.update(change)
    path = tmp_path / "index"
    path.write_bytes(_line(f"{MAGIC} {VERSION} " + json.dumps(fields)))
    with pytest.raises(IndexCorrupt, match="wrong type|unreadable"):
        IndexFile.load(str(path))
