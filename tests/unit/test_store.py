"""Part stores: what is reused, what is discarded and why, and what verification catches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ossfs.cache.index import IndexFile, StoreIdentity
from ossfs.cache.store import Discarded, PartStore
from ossfs.crc import crc64
from ossfs.errors import IntegrityError

DATA = bytes(range(256)) * 40  # 10240 bytes


def ident(**kw: object) -> StoreIdentity:
    base: dict[str, object] = dict(
        bucket="b", key="k", etag="E1", size=len(DATA), part_size=1024, start=0, length=len(DATA)
    )
    base.update(kw)
    return StoreIdentity(**base)  # type: ignore[arg-type]


def fill(store: PartStore, parts: list[int]) -> None:
    for p in parts:
        first, end = store.layout.bounds(p)
        store.write(first, DATA[first:end])
        store.commit(p, crc64(DATA[first:end]))


def open_store(
    tmp_path: Path, identity: StoreIdentity, seen: list[Discarded] | None = None
) -> PartStore:
    return PartStore.open(
        identity,
        str(tmp_path / "data"),
        str(tmp_path / "ckpt"),
        on_discard=(seen.append if seen is not None else None),
    )


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


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"etag": "E2"}, "the object changed"),
        ({"size": len(DATA) + 1, "length": len(DATA) + 1}, "the object changed"),
        ({"key": "other"}, "another object"),
        ({"part_size": 2048}, "part size 1024"),
        ({"start": 10, "length": 100}, "covers bytes"),
    ],
)
def test_mismatched_checkpoint_is_discarded_whole(
    tmp_path: Path, change: dict[str, object], reason: str
) -> None:
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


# ------------------------------------------------------- opening: when is data kept?
# PartStore.open keeps the data file's bytes only when a usable index records them, or in
# a shared cache with no index yet; every other way in empties it. One test per way.


def _data_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "data").write_bytes(content)


def test_usable_index_keeps_data_and_fixes_the_length(tmp_path: Path) -> None:
    s = open_store(tmp_path, ident())
    fill(s, [2])
    s.close()
    with open(tmp_path / "data", "ab") as f:  # longer than the object: cut back
        f.write(b"x" * 5000)
    s = open_store(tmp_path, ident())
    assert sorted(s.parts) == [2] and s.verify(2)
    assert os.path.getsize(tmp_path / "data") == len(DATA)


def test_corrupt_index_empties_the_data(tmp_path: Path) -> None:
    s = open_store(tmp_path, ident())
    fill(s, [0])
    s.close()
    (tmp_path / "ckpt").write_bytes(b"\x00garbage")
    s = open_store(tmp_path, ident())
    assert s.parts == {} and s.read(0, 16) == b"\0" * 16
    assert os.path.getsize(tmp_path / "data") == len(DATA)


def test_index_whose_data_file_is_gone_is_discarded(tmp_path: Path) -> None:
    s = open_store(tmp_path, ident())
    fill(s, [0, 1])
    s.close()
    os.unlink(tmp_path / "data")
    seen: list[Discarded] = []
    s = open_store(tmp_path, ident(), seen)
    assert len(seen) == 1 and "data file" in seen[0].reason and "missing" in seen[0].reason
    assert s.parts == {}
    s.close()
    # The discarded index was replaced by an empty one: reopening finds no parts.
    assert open_store(tmp_path, ident()).parts == {}


def test_empty_index_whose_data_file_is_gone_is_replaced_silently(tmp_path: Path) -> None:
    open_store(tmp_path, ident()).close()  # an index with no parts
    os.unlink(tmp_path / "data")
    seen: list[Discarded] = []
    s = open_store(tmp_path, ident(), seen)
    assert seen == [] and s.parts == {}  # nothing recorded, nothing lost: no message
    assert os.path.getsize(tmp_path / "data") == len(DATA)


def test_no_index_empties_a_private_data_file(tmp_path: Path) -> None:
    # A download whose checkpoint is gone: the temp file's bytes are not trusted.
    _data_file(tmp_path, DATA)
    s = open_store(tmp_path, ident())
    assert s.parts == {} and s.read(0, 16) == b"\0" * 16
    assert (tmp_path / "ckpt").exists()


def test_no_checkpoint_empties_the_data_file(tmp_path: Path) -> None:
    _data_file(tmp_path, DATA)
    s = PartStore.open(ident(), str(tmp_path / "data"), None)
    assert s.index_path is None and s.parts == {}
    assert s.read(0, 16) == b"\0" * 16 and os.path.getsize(tmp_path / "data") == len(DATA)


def test_shared_store_without_index_keeps_the_data(tmp_path: Path) -> None:
    # In a shared cache another process may have created the data file and be about to
    # create its index: its bytes are left alone (no part is trusted without a record).
    _data_file(tmp_path, DATA[:3000])
    s = PartStore.open(ident(), str(tmp_path / "data"), str(tmp_path / "ckpt"), shared=True)
    assert s.parts == {}
    assert s.read(0, 3000) == DATA[:3000]
    assert os.path.getsize(tmp_path / "data") == len(DATA)


def test_shared_store_keeps_an_index_created_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process creates the index (and records a part) between our look for it
    # and our create: its index is kept, not replaced by an empty one.
    other = PartStore.open(ident(), str(tmp_path / "data"), str(tmp_path / "ckpt"), shared=True)
    fill(other, [4])
    real_load = IndexFile.load
    looks: list[str] = []

    def not_there_yet(path: str) -> IndexFile | None:
        looks.append(path)
        return None if len(looks) == 1 else real_load(path)

    monkeypatch.setattr(IndexFile, "load", staticmethod(not_there_yet))
    s = PartStore.open(ident(), str(tmp_path / "data"), str(tmp_path / "ckpt"), shared=True)
    assert len(looks) == 2  # the look that missed it, then the create that found it
    assert sorted(s.parts) == [4] and s.verify(4)
    other.close()


def test_shared_store_still_discards_a_stale_index(tmp_path: Path) -> None:
    s = PartStore.open(ident(), str(tmp_path / "data"), str(tmp_path / "ckpt"), shared=True)
    fill(s, [0])
    s.close()
    seen: list[Discarded] = []
    s = PartStore.open(
        ident(etag="E2"),
        str(tmp_path / "data"),
        str(tmp_path / "ckpt"),
        shared=True,
        on_discard=seen.append,
    )
    assert len(seen) == 1 and s.parts == {} and s.read(0, 16) == b"\0" * 16


def test_refused_index_is_removed_before_the_data_is_emptied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stopped after emptying the data file but before the new index exists (here: the
    # create fails), no index may be left that records parts of the emptied file.
    s = open_store(tmp_path, ident())
    fill(s, [0, 1])
    s.close()

    def full_disk(*_args: object, **_kw: object) -> IndexFile:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(IndexFile, "create", staticmethod(full_disk))
    with pytest.raises(OSError):
        open_store(tmp_path, ident(etag="E2"))
    assert not (tmp_path / "ckpt").exists()


def test_a_whole_crc_mismatch_drops_every_part_even_when_one_is_damaged_on_disk(
    tmp_path: Path,
) -> None:
    """Part 6 arrived with a byte flipped (its record is the CRC of those bytes), and
    part 3 was damaged on disk since. The whole does not match because of part 6: a
    part damaged on disk does not change the records' combined CRC, so it cannot be
    the one to blame, and dropping only it would keep part 6's wrong bytes."""
    s = open_store(tmp_path, ident())
    fill(s, [p for p in range(10) if p != 6])
    first, end = s.layout.bounds(6)
    wrong = bytearray(DATA[first:end])
    wrong[5] ^= 1
    s.write(first, bytes(wrong))
    s.commit(6, crc64(bytes(wrong)))
    os.pwrite(s.fileno(), b"\x00", 3 * 1024 + 7)
    s.server_crc64 = crc64(DATA)
    actual = s.whole_crc_mismatch()
    assert actual is not None and not s.crc_checked
    with pytest.raises(IntegrityError, match="dropped 10 part"):
        s.drop_mismatched(actual)
    assert s.parts == {} and s.verified == set()
