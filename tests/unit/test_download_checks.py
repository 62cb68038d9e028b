"""What a finished download is checked against (`ossfs.download._check_integrity`).

An S3 object's ETag is the MD5 of its bytes only for a single-part upload that is
not encrypted with a KMS key or one of the customer's; for those the ETag is still
32 hex digits, and a check against it would fail on every run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ossfs.cache.index import StoreIdentity
from ossfs.cache.store import PartStore
from ossfs.crc import crc64
from ossfs.download import _check_integrity
from ossfs.errors import IntegrityError
from ossfs.model import ObjectMeta
from ossfs.protocol.ops import meta_from_head

DATA = os.urandom(3 * 1024 + 5)


def _downloaded(tmp_path: Path, etag: str) -> PartStore:
    ident = StoreIdentity(
        bucket="b", key="k", etag=etag, size=len(DATA), part_size=1024, start=0, length=len(DATA)
    )
    store = PartStore.open(ident, str(tmp_path / "data"), str(tmp_path / "index"))
    for p in range(store.layout.count):
        first, end = store.layout.bounds(p)
        store.write(first, DATA[first:end])
        store.commit(p, crc64(DATA[first:end]))
    return store


def _meta(etag: str, encryption: str | None) -> ObjectMeta:
    return ObjectMeta(key="k", size=len(DATA), etag=etag, mtime=0.0, encryption=encryption)


@pytest.mark.parametrize("encryption", [None, "AES256"])
def test_a_single_part_object_is_checked_against_its_md5_etag(
    tmp_path: Path, encryption: str | None
) -> None:
    md5 = hashlib.md5(DATA, usedforsecurity=False).hexdigest()
    store = _downloaded(tmp_path, md5)
    assert _check_integrity(store, _meta(md5, encryption)) == "md5"
    wrong = "0" * 32
    with pytest.raises(IntegrityError, match="MD5 mismatch"):
        _check_integrity(store, _meta(wrong, encryption))
    store.close()


@pytest.mark.parametrize("encryption", ["aws:kms", "aws:kms:dsse", "SSE-C"])
def test_an_object_encrypted_with_a_kms_or_customer_key_is_not_checked_against_its_etag(
    tmp_path: Path, encryption: str
) -> None:
    etag = "5d41402abc4b2a76b9719d911017c592"  # 32 hex digits, not this object's MD5
    store = _downloaded(tmp_path, etag)
    assert _check_integrity(store, _meta(etag, encryption)) is None
    assert len(store.parts) == store.layout.count  # nothing dropped
    store.close()


def test_the_encryption_a_head_names_is_read() -> None:
    def meta(**headers: str) -> ObjectMeta:
        return meta_from_head("k", {"Content-Length": "3", "ETag": '"e"', **headers})

    assert meta().encryption is None
    assert meta(**{"x-amz-server-side-encryption": "aws:kms"}).encryption == "aws:kms"
    assert meta(**{"X-Oss-Server-Side-Encryption": "KMS"}).encryption == "KMS"
    sse_c = {"x-amz-server-side-encryption-customer-algorithm": "AES256"}
    assert meta(**sse_c).encryption == "SSE-C"
