"""Part stores: what is reused, what is discarded and why, and what verification catches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ossfs.cache.index import StoreIdentity
from ossfs.cache.store import Discarded, PartStore
from ossfs.crc import crc64
from ossfs.errors import IntegrityError

DATA = bytes(range(256)) * 40  # 10240 bytes


def ident(**kw: object) -> StoreIdentity:
    base: dict[str, object] = dict(bucket="b", key="k", etag="E1", size=len(DATA),
                                   part_size=1024, start=0, length=len(DATA))
    base.update(kw)
    return StoreIdentity(**base)  # type: ignore[arg-type]


def fill(store: PartStore, parts: list[int]) -> None:
    for p in parts:
        first, end = store.layout.bounds(p)
        store.write(first, DATA[first:end])
        store.commit(p, crc64(DATA[first:end]))


def open_store(tmp_path: Path, identity: StoreIdentity,
               seen: list[Discarded] | None = None) -> PartStore:
    return PartStore.open(identity, str(tmp_path / "data"), str(tmp_path / "ckpt"),
                          on_discard=(seen.append if seen is not None else None))


def test_resume_keeps_recorded_parts(tmp_path: Path) -> None:
    s = open_store(tmp_path, ident())
    fill(s, [0, 3, 9])
    s.close()
    seen: list[Discarded] = []
    s = open_store(tmp_path, ident(), seen)
    assert seen == []
    assert sorted(s.parts) == [0, 3, 9]
    assert s.missing() == [1, 2, 4, 5, 6, 7, 8]
    assert all(s.verify(p) for p in s.parts)
    assert s.read(3 * 1024, 1024) == DATA[3072:4096]


@pytest.mark.parametrize(("change", "reason"), [
    ({"etag": "E2"}, "the object changed"),
    ({"size": len(DATA) + 1, "length": len(DATA) + 1}, "the object changed"),
    ({"key": "other"}, "another object"),
    ({"part_size": 2048}, "part size 1024"),
    ({"start": 10, "length": 100}, "covers bytes"),
])
def test_mismatched_checkpoint_is_discarded_whole(tmp_path: Path, change: dict[str, object],
                                                  reason: str) -> None:
    s = open_store(tmp_path, ident())
    fill(s, [0, 1])
    s.close()
    seen: list[Discarded] = []
    s = open_store(tmp_path, ident(**change), seen)
    assert len(seen) == 1 and reason in seen[0].reason
    assert s.parts == {}
    # Nothing of the old data is trusted: the data file was emptied.
    assert s.read(s.identity.start, 16) == b"\0" * 16


def test_corrupt_checkpoint_is_discarded(tmp_path: Path) -> None:
    s = open_store(tmp_path, ident())
    fill(s, [0])
    s.close()
    (tmp_path / "ckpt").write_bytes(b"\x00garbage")
    seen: list[Discarded] = []
    s = open_store(tmp_path, ident(), seen)
    assert "corrupt" in seen[0].reason and s.parts == {}


def test_verify_catches_lost_or_damaged_bytes(tmp_path: Path) -> None:
    s = open_store(tmp_path, ident())
    fill(s, [0, 1, 2])
    s.close()
    with open(tmp_path / "data", "r+b") as f:  # what a power loss can leave behind
        f.seek(1024 + 5)
        f.write(b"\xff")
        f.truncate(2048 + 100)
    s = open_store(tmp_path, ident())
    assert s.verify(0)
    assert not s.verify(1)
    assert not s.verify(2)


def test_whole_crc_mismatch_drops_parts(tmp_path: Path) -> None:
    s = open_store(tmp_path, ident())
    fill(s, list(range(10)))
    s.server_crc64 = crc64(DATA)
    assert s.check_crc()
    s.crc_checked = False
    s.server_crc64 = crc64(DATA) ^ 1
    with pytest.raises(IntegrityError, match="CRC-64 mismatch"):
        s.check_crc()
    assert s.parts == {}


def test_files_are_private_in_cache_mode(tmp_path: Path) -> None:
    s = PartStore.open(ident(), str(tmp_path / "data"), str(tmp_path / "index"), shared=True)
    assert os.stat(tmp_path / "data").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "index").st_mode & 0o777 == 0o600
    s.close()
