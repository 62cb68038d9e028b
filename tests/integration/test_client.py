"""The object client against real servers: the OSS test server (V4 and V1) and moto (S3).

What this proves:

- HEAD, ranged GET and ListObjectsV2 give the same answers in both dialects
  and both OSS signature versions: sizes, ETags, mtimes, CRC-64, exact bytes
  for any range, listings past 1000 keys in order with each key once, prefix
  and delimiter roll-ups, and keys that need URL encoding.
- Under faults injected by the OSS server (503s, connection resets, bodies
  cut short, stalls) a GET completes with the exact bytes, and a transfer
  that broke half way resumes from the first missing byte (the server's GET
  records show what each retry asked for).
- Errors that retrying cannot fix surface after one request, with their
  service code and request id; retryable ones give up after exactly
  ``attempts`` requests.
- ``rate_limit`` caps the throughput.
- The ``ls`` and ``stat`` commands show what the client reads, and fail
  with one line and the right exit code.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from ossfs.client import ClientConfig, GetResult, HttpObjectClient
from ossfs.errors import (
    AccessError,
    ArchivedObjectError,
    NotFoundError,
    ObjectChangedError,
    ServiceError,
    TransferError,
)
from ossfs.protocol.ops import Endpoint
from ossfs.protocol.signing import Credentials
from ossfs.testing import Fault, OssTestServer
from tests.conftest import AWS_ENV
from tests.helpers import run_ossfs
from tests.integration.conftest import settled_stats

KiB = 1024
MiB = 1024 * KiB

# Quick retries: the tests count requests, they do not need real backoff.
FAST = ClientConfig(backoff_base=0.01, backoff_max=0.05)

ENCODED_KEYS = [
    "enc/with space.txt",
    "enc/plus+sign.txt",
    "enc/per%25cent%.txt",
    "enc/caf\u00e9/\u4e2d\u6587.txt",
    "enc/double//slash.txt",
    "enc/tilde~name.txt",
    "enc/q?mark&amp=1#frag.txt",
]


def pattern(size: int, seed: int = 0) -> bytes:
    """Reproducible incompressible bytes."""
    return random.Random(seed).randbytes(size)


@dataclass
class Backend:
    """One server and how to fill it: the same tests run against each."""

    name: str
    endpoint: Endpoint
    bucket: str
    put: Callable[[str, bytes], None]
    put_many: Callable[[list[str]], None]
    # (size, etag, mtime) as the server itself records them.
    truth: Callable[[str], tuple[int, str, float]]
    server: OssTestServer | None = None

    def client(self, config: ClientConfig = FAST) -> HttpObjectClient:
        """A client of this server (close it with ``async with``)."""
        return HttpObjectClient(self.endpoint, config)


def _oss_backend(server: OssTestServer, signature_version: str) -> Backend:
    """The OSS test server, signing with *signature_version*."""
    bucket = "bkt"
    server.create_bucket(bucket)

    def put(key: str, data: bytes) -> None:
        server.put(bucket, key, data)

    def put_many(keys: list[str]) -> None:
        for k in keys:
            server.put(bucket, k, b"x")

    def truth(key: str) -> tuple[int, str, float]:
        meta = server.head(bucket, key)
        assert meta is not None
        return meta.size, meta.etag, meta.mtime

    sv: Any = signature_version
    return Backend(
        f"oss-{signature_version}",
        server.endpoint(signature_version=sv),
        bucket,
        put,
        put_many,
        truth,
        server,
    )


def _s3_backend(moto_endpoint: str, s3: Any, bucket: str) -> Backend:
    """moto's S3 server, signing with AWS SigV4."""

    def put(key: str, data: bytes) -> None:
        s3.put_object(Bucket=bucket, Key=key, Body=data)

    def put_many(keys: list[str]) -> None:
        # Thousands of PUTs through moto's HTTP front take many seconds; its
        # backend lives in this process, so fill it directly when possible.
        try:
            from moto.core import DEFAULT_ACCOUNT_ID  # type: ignore[attr-defined]
            from moto.s3.models import s3_backends

            backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
            for k in keys:
                backend.put_object(bucket, k, b"x")
        except (ImportError, AttributeError, KeyError, TypeError):
            for k in keys:
                put(k, b"x")

    def truth(key: str) -> tuple[int, str, float]:
        head = s3.head_object(Bucket=bucket, Key=key)
        return head["ContentLength"], head["ETag"].strip('"'), head["LastModified"].timestamp()

    creds = Credentials(AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"])
    endpoint = Endpoint(moto_endpoint, dialect="s3", region="us-east-1", credentials=creds)
    return Backend("s3", endpoint, bucket, put, put_many, truth)


@pytest.fixture(params=["oss-v4", "oss-v1", "s3"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The OSS test server with either signature version, or moto's S3."""
    if request.param == "s3":
        yield _s3_backend(
            request.getfixturevalue("moto_endpoint"),
            request.getfixturevalue("s3"),
            request.getfixturevalue("s3_bucket"),
        )
        return
    server = request.getfixturevalue("oss_server")
    yield _oss_backend(server, request.param.removeprefix("oss-"))


@pytest.fixture
def oss(oss_server: OssTestServer) -> OssTestServer:
    """The OSS test server with a few objects for the fault tests."""
    oss_server.put("bkt", "obj", pattern(1 * MiB, seed=1))
    oss_server.put("bkt", "small", b"0123456789")
    return oss_server


class Collector:
    """A sink that checks offsets arrive in order, without gaps or repeats."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.data = bytearray()

    async def __call__(self, offset: int, chunk: bytes | memoryview) -> None:
        assert offset == self.start + len(self.data), "bytes out of order or repeated"
        self.data.extend(chunk)


async def get_bytes(
    client: HttpObjectClient, bucket: str, key: str, start: int, end: int, etag: str | None = None
) -> tuple[bytes, GetResult]:
    """Object bytes ``[start, end)`` through the client's streaming sink."""
    sink = Collector(start)
    result = await client.get_range(bucket, key, start, end, etag, sink)
    return bytes(sink.data), result


async def one_request(client: HttpObjectClient, op: str) -> None:
    """One request of kind *op* (``get``, ``head`` or ``list``) for bkt/obj."""
    if op == "get":
        await get_bytes(client, "bkt", "obj", 0, 100)
    elif op == "head":
        await client.head("bkt", "obj")
    else:
        await client.list_page("bkt")


async def list_all(
    client: HttpObjectClient, bucket: str, prefix: str = "", delimiter: str = ""
) -> tuple[list[str], list[str], int]:
    """Every key and common prefix under *prefix*, following continuation tokens."""
    keys: list[str] = []
    prefixes: list[str] = []
    pages = 0
    token: str | None = None
    while True:
        page = await client.list_page(
            bucket, prefix=prefix, delimiter=delimiter, continuation_token=token
        )
        pages += 1
        assert len(page.objects) + len(page.prefixes) <= 1000
        keys.extend(o.key for o in page.objects)
        prefixes.extend(page.prefixes)
        token = page.next_token
        if token is None:
            return keys, prefixes, pages


def get_records(server: OssTestServer, key: str) -> list[Any]:
    """The finished GETs of *key*, in the order they ended."""
    return list(settled_stats(server).gets_by_key.get(key, []))


# ---------------------------------------------------------------------- HEAD


async def test_head(backend: Backend) -> None:
    data = pattern(300 * KiB + 7)
    backend.put("dir/object.bin", data)
    backend.put("dir/check.txt", b"123456789")
    async with backend.client() as client:
        meta = await client.head(backend.bucket, "dir/object.bin")
        check = await client.head(backend.bucket, "dir/check.txt")
    size, etag, mtime = backend.truth("dir/object.bin")
    assert meta.key == "dir/object.bin"
    assert meta.size == size == len(data)
    assert meta.etag.lower() == etag.lower() == hashlib.md5(data).hexdigest()
    assert meta.mtime == mtime
    if backend.name.startswith("oss"):
        # The CRC-64/XZ catalogue check value.
        assert check.crc64 == 0x995DC9BBDF1939FA
        assert meta.crc64 is not None
        assert meta.object_type == "Normal"
        assert meta.storage_class == "Standard"
    else:
        assert meta.crc64 is None


async def test_head_of_empty_object(backend: Backend) -> None:
    backend.put("empty", b"")
    async with backend.client() as client:
        meta = await client.head(backend.bucket, "empty")
    assert meta.size == 0
    assert meta.etag.lower() == hashlib.md5(b"").hexdigest()
    if backend.name.startswith("oss"):
        assert meta.crc64 == 0


# ---------------------------------------------------------------------- ranged GET

RANGES = {
    "first byte": (0, 1),
    "first 64 KiB": (0, 64 * KiB),
    "middle": (100_003, 200_017),
    "one byte in the middle": (150_000, 150_001),
    "last byte": (300 * KiB + 6, 300 * KiB + 7),
    "tail": (250_000, 300 * KiB + 7),
    "whole": (0, 300 * KiB + 7),
}


@pytest.mark.parametrize("span", list(RANGES.values()), ids=list(RANGES))
async def test_ranged_get(backend: Backend, span: tuple[int, int]) -> None:
    data = pattern(300 * KiB + 7, seed=2)
    backend.put("r/object.bin", data)
    start, end = span
    async with backend.client() as client:
        meta = await client.head(backend.bucket, "r/object.bin")
        got, result = await get_bytes(client, backend.bucket, "r/object.bin", start, end, meta.etag)
    assert got == data[start:end]
    assert result.nbytes == end - start
    if backend.name.startswith("oss"):
        # OSS sends the whole object's CRC-64 on ranged answers too.
        assert result.object_crc64 == meta.crc64
    if backend.server is not None:
        (record,) = get_records(backend.server, "r/object.bin")
        assert (record.req_start, record.req_end) == (start, end - 1)
        assert record.status == 206


# ---------------------------------------------------------------------- listing


async def test_list_paginates_past_1000_keys(backend: Backend) -> None:
    keys = [f"many/k{i:05d}" for i in range(2500)]
    backend.put_many(keys)
    backend.put("many0", b"outside the prefix")
    backend.put("man", b"outside the prefix")
    async with backend.client() as client:
        listed, prefixes, pages = await list_all(client, backend.bucket, prefix="many/")
    assert pages >= 3
    assert prefixes == []
    assert listed == keys  # every key once, in order


async def test_list_objects_carry_metadata(backend: Backend) -> None:
    data = pattern(4321, seed=3)
    backend.put("meta/a.bin", data)
    async with backend.client() as client:
        page = await client.list_page(backend.bucket, prefix="meta/")
    (obj,) = page.objects
    size, etag, mtime = backend.truth("meta/a.bin")
    assert (obj.key, obj.size, obj.etag.lower(), obj.mtime) == (
        "meta/a.bin",
        size,
        etag.lower(),
        mtime,
    )
    assert page.next_token is None


async def test_list_prefix_and_delimiter(backend: Backend) -> None:
    for key in ["p/a.txt", "p/b/c.txt", "p/b/d.txt", "p/e/f/g.txt", "p/z.txt", "pq/x.txt", "q.txt"]:
        backend.put(key, key.encode())
    async with backend.client() as client:
        keys, prefixes, _ = await list_all(client, backend.bucket, prefix="p/", delimiter="/")
        assert keys == ["p/a.txt", "p/z.txt"]
        assert prefixes == ["p/b/", "p/e/"]
        keys, prefixes, _ = await list_all(client, backend.bucket, prefix="p", delimiter="/")
        assert (keys, prefixes) == ([], ["p/", "pq/"])
        keys, prefixes, _ = await list_all(client, backend.bucket, delimiter="/")
        assert (keys, prefixes) == (["q.txt"], ["p/", "pq/"])
        keys, prefixes, _ = await list_all(client, backend.bucket, prefix="p/b/")
        assert (keys, prefixes) == (["p/b/c.txt", "p/b/d.txt"], [])
        keys, prefixes, _ = await list_all(client, backend.bucket, prefix="nothing/")
        assert (keys, prefixes) == ([], [])


async def test_list_pagination_with_delimiter(backend: Backend) -> None:
    """Roll-ups count towards a page, and a page may end on one."""
    keys = [f"d/{i:04d}/x" for i in range(1200)] + ["d/zz"]
    backend.put_many(keys)
    async with backend.client() as client:
        listed, prefixes, pages = await list_all(client, backend.bucket, prefix="d/", delimiter="/")
    assert pages >= 2
    assert prefixes == [f"d/{i:04d}/" for i in range(1200)]
    assert listed == ["d/zz"]


# ---------------------------------------------------------------------- key encoding


async def test_keys_that_need_encoding(backend: Backend) -> None:
    contents = {key: f"content of {key}".encode() for key in ENCODED_KEYS}
    for key, body in contents.items():
        backend.put(key, body)
    async with backend.client() as client:
        for key, body in contents.items():
            meta = await client.head(backend.bucket, key)
            assert meta.size == len(body), key
            got, _ = await get_bytes(client, backend.bucket, key, 0, len(body), meta.etag)
            assert got == body, key
        listed, _, _ = await list_all(client, backend.bucket, prefix="enc/")
        assert listed == sorted(ENCODED_KEYS, key=lambda k: k.encode())
        # Encoded keys in a prefix and in roll-ups come back decoded too.
        keys, prefixes, _ = await list_all(client, backend.bucket, prefix="enc/", delimiter="/")
        assert prefixes == ["enc/caf\u00e9/", "enc/double/"]
        assert keys == sorted(
            (k for k in ENCODED_KEYS if k.count("/") == 1), key=lambda k: k.encode()
        )
        keys, _, _ = await list_all(client, backend.bucket, prefix="enc/with sp")
        assert keys == ["enc/with space.txt"]
        keys, _, _ = await list_all(client, backend.bucket, prefix="enc/plus+")
        assert keys == ["enc/plus+sign.txt"]
        keys, _, _ = await list_all(client, backend.bucket, prefix="enc/per%25")
        assert keys == ["enc/per%25cent%.txt"]
        keys, _, _ = await list_all(client, backend.bucket, prefix="enc/double//")
        assert keys == ["enc/double//slash.txt"]


# ---------------------------------------------------------------------- retries (OSS)


async def test_503_twice_then_success(oss: OssTestServer) -> None:
    data = oss.get("bkt", "obj")
    oss.faults.add(Fault("status", status=503, op="get", key="obj"), times=2)
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        got, result = await get_bytes(client, "bkt", "obj", 0, len(data))
        assert client.stats.retries == 2
        assert client.stats.by_status == {503: 2, 206: 1}
    assert got == data and result.nbytes == len(data)
    assert [r.status for r in get_records(oss, "obj")] == [503, 503, 206]


@pytest.mark.parametrize("op", ["head", "list"])
async def test_503_twice_then_success_head_and_list(oss: OssTestServer, op: str) -> None:
    oss.faults.add(Fault("status", status=503, op=op), times=2)  # type: ignore[arg-type]
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        if op == "head":
            meta = await client.head("bkt", "small")
            assert meta.size == 10
        else:
            page = await client.list_page("bkt")
            assert [o.key for o in page.objects] == ["obj", "small"]
        assert client.stats.retries == 2
    assert oss.stats.count(op=op) == 3


@pytest.mark.parametrize("start", [0, 12_345])
async def test_reset_mid_body_resumes_from_missing_byte(oss: OssTestServer, start: int) -> None:
    data = oss.get("bkt", "obj")
    end = len(data) - 100
    oss.faults.add(Fault("reset", op="get", key="obj", after_bytes=400 * KiB))
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        got, result = await get_bytes(client, "bkt", "obj", start, end)
    assert got == data[start:end] and result.nbytes == end - start
    first, retry = get_records(oss, "obj")
    assert (first.fault, first.req_start, first.req_end) == ("reset", start, end - 1)
    # An RST may discard what was still in flight, so the client got some prefix
    # of what was sent (the sink saw every offset once, in order); the retry must
    # ask for exactly the rest of the range.
    assert start <= retry.req_start <= start + 400 * KiB
    assert retry.req_end == end - 1
    assert retry.bytes_sent == end - retry.req_start


async def test_reset_after_delivered_bytes_resumes_after_them(oss: OssTestServer) -> None:
    """Bytes that reached the client before the RST are kept: the retry starts after them."""
    data = oss.get("bkt", "obj")
    # The pause gives the client ample time to read what was sent before the RST.
    oss.faults.add(
        Fault("stall", op="get", key="obj", after_bytes=400 * KiB, seconds=1.0, then="reset")
    )
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        got, _ = await get_bytes(client, "bkt", "obj", 5, len(data))
    assert got == data[5:]
    first, retry = get_records(oss, "obj")
    assert (first.req_start, first.fault, first.bytes_sent) == (5, "stall", 400 * KiB)
    assert (retry.req_start, retry.req_end) == (5 + 400 * KiB, len(data) - 1)
    assert retry.bytes_sent == len(data) - 5 - 400 * KiB


async def test_truncated_body_resumes_from_missing_byte(oss: OssTestServer) -> None:
    data = oss.get("bkt", "obj")
    oss.faults.add(Fault("truncate", op="get", key="obj", after_bytes=300_000))
    oss.faults.add(Fault("truncate", op="get", key="obj", after_bytes=200_000))
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        got, _ = await get_bytes(client, "bkt", "obj", 1000, len(data))
    assert got == data[1000:]
    records = get_records(oss, "obj")
    # A clean close delivers everything sent before it: each retry starts exactly there.
    assert [(r.req_start, r.req_end, r.fault) for r in records] == [
        (1000, len(data) - 1, "truncate"),
        (301_000, len(data) - 1, "truncate"),
        (501_000, len(data) - 1, None),
    ]


async def test_transfer_that_keeps_moving_is_not_cut_off_by_attempts(oss: OssTestServer) -> None:
    """Only attempts that deliver nothing use up the budget."""
    data = oss.get("bkt", "obj")
    oss.faults.add(Fault("truncate", op="get", key="obj", after_bytes=100 * KiB), times=None)
    config = ClientConfig(attempts=2, backoff_base=0.01)
    async with HttpObjectClient(oss.endpoint(), config) as client:
        got, _ = await get_bytes(client, "bkt", "obj", 0, len(data))
    assert got == data
    starts = [r.req_start for r in get_records(oss, "obj")]
    assert starts == list(range(0, len(data), 100 * KiB))


async def test_stall_longer_than_stall_timeout_resumes(oss: OssTestServer) -> None:
    data = oss.get("bkt", "obj")
    # The stalled answer would go on after 2 s; a client that waited for it would
    # need no second GET.
    oss.faults.add(
        Fault("stall", op="get", key="obj", after_bytes=250_000, seconds=2.0, then="continue")
    )
    config = ClientConfig(backoff_base=0.01, stall_timeout=0.5)
    async with HttpObjectClient(oss.endpoint(), config) as client:
        got, _ = await get_bytes(client, "bkt", "obj", 0, len(data))
    assert got == data
    records = sorted(get_records(oss, "obj"), key=lambda r: r.req_start)
    assert [(r.req_start, r.fault) for r in records] == [(0, "stall"), (250_000, None)]
    assert records[1].bytes_sent == len(data) - 250_000


async def test_stall_before_first_byte_is_retried(oss: OssTestServer) -> None:
    oss.faults.add(Fault("stall", op="get", key="small", seconds=1.5, then="continue"))
    config = ClientConfig(backoff_base=0.01, stall_timeout=0.4)
    async with HttpObjectClient(oss.endpoint(), config) as client:
        got, _ = await get_bytes(client, "bkt", "small", 2, 8)
    assert got == b"234567"
    records = get_records(oss, "small")
    assert sorted((r.req_start, r.fault or "") for r in records) == [(2, ""), (2, "stall")]


# ---------------------------------------------------------------------- errors (OSS)


@pytest.mark.parametrize("status", [400, 403, 404, 405])
async def test_non_retryable_status_makes_one_request(oss: OssTestServer, status: int) -> None:
    oss.faults.add(Fault("status", status=status, op="get"), times=None)
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        with pytest.raises(ServiceError) as info:
            await get_bytes(client, "bkt", "obj", 0, 100)
    assert info.value.status == status
    assert len(get_records(oss, "obj")) == 1
    if status == 403:
        assert isinstance(info.value, AccessError)
    if status == 404:
        assert isinstance(info.value, NotFoundError)


async def test_missing_key_makes_one_request(oss: OssTestServer) -> None:
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        with pytest.raises(NotFoundError) as get_info:
            await get_bytes(client, "bkt", "no/such/key", 0, 10)
        with pytest.raises(NotFoundError) as head_info:
            await client.head("bkt", "no/such/key")
    assert oss.stats.count(op="get") == 1
    assert oss.stats.count(op="head") == 1
    for err in (get_info.value, head_info.value):
        assert err.code == "NoSuchKey"
        assert err.status == 404
        assert err.resource == "oss://bkt/no/such/key"
        assert err.request_id is not None and len(err.request_id) == 24
        assert err.request_id in str(err)
    # The HEAD answer has no body: its details came from the x-oss-err header.
    assert head_info.value.message == "The specified key does not exist."
    assert head_info.value.ec == "0026-00000001"


async def test_head_error_is_decoded_from_x_oss_err(oss: OssTestServer) -> None:
    """A code no status implies can only come from the base64 document in x-oss-err."""
    oss.faults.add(
        Fault(
            "status",
            op="head",
            status=403,
            code="InvalidObjectState",
            message="The operation is not valid for the object's state",
        )
    )
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        with pytest.raises(ArchivedObjectError) as info:
            await client.head("bkt", "obj")
    err = info.value
    assert err.code == "InvalidObjectState"
    assert err.message == "The operation is not valid for the object's state"
    assert err.request_id is not None and len(err.request_id) == 24
    assert oss.stats.count(op="head") == 1


async def test_missing_bucket(oss: OssTestServer) -> None:
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        with pytest.raises(NotFoundError) as head_info:
            await client.head("no-such-bucket", "k")
        with pytest.raises(NotFoundError) as get_info:
            await get_bytes(client, "no-such-bucket", "k", 0, 1)
        with pytest.raises(NotFoundError) as list_info:
            await client.list_page("no-such-bucket")
    for err in (head_info.value, get_info.value, list_info.value):
        assert err.code == "NoSuchBucket"
        assert err.request_id
    assert oss.stats.count() == 3


@pytest.mark.parametrize("signature_version", ["v4", "v1"])
async def test_bad_secret(oss: OssTestServer, signature_version: str) -> None:
    sv: Any = signature_version
    good = oss.endpoint(signature_version=sv)
    assert good.credentials is not None
    bad = Endpoint(
        good.url,
        dialect="oss",
        region=good.region,
        signature_version=sv,
        path_style=True,
        credentials=Credentials(good.credentials.access_key_id, "wrong-secret"),
    )
    async with HttpObjectClient(bad, FAST) as client:
        with pytest.raises(AccessError) as head_info:
            await client.head("bkt", "obj")
        with pytest.raises(AccessError) as get_info:
            await get_bytes(client, "bkt", "obj", 0, 10)
        with pytest.raises(AccessError) as list_info:
            await client.list_page("bkt")
    for err in (head_info.value, get_info.value, list_info.value):
        assert err.code == "SignatureDoesNotMatch"
        assert err.status == 403
        assert err.request_id
        assert "wrong-secret" not in str(err)
    assert oss.stats.count() == 3  # none of them was retried


async def test_unknown_access_key(oss: OssTestServer) -> None:
    ep = Endpoint(
        oss.url, dialect="oss", path_style=True, credentials=Credentials("nobody", "whatever")
    )
    async with HttpObjectClient(ep, FAST) as client:
        with pytest.raises(AccessError) as info:
            await get_bytes(client, "bkt", "obj", 0, 10)
    assert info.value.code == "InvalidAccessKeyId"


async def test_anonymous_request_is_refused(oss: OssTestServer) -> None:
    ep = Endpoint(oss.url, dialect="oss", path_style=True, credentials=None)
    async with HttpObjectClient(ep, FAST) as client:
        with pytest.raises(AccessError) as info:
            await client.list_page("bkt")
    assert info.value.code == "AccessDenied"


@pytest.mark.parametrize("op", ["get", "head", "list"])
async def test_attempts_are_bounded(oss: OssTestServer, op: str) -> None:
    oss.faults.add(Fault("status", status=503, op=op), times=None)  # type: ignore[arg-type]
    config = ClientConfig(attempts=3, backoff_base=0.01, backoff_max=0.02)
    async with HttpObjectClient(oss.endpoint(), config) as client:
        with pytest.raises(TransferError) as info:
            await one_request(client, op)
        assert client.stats.requests == 3
    assert oss.stats.count(op=op) == 3
    message = str(info.value)
    assert "3 attempts" in message
    assert "ServiceUnavailable" in message and "request id" in message


async def test_attempts_bounded_when_connections_reset_before_any_byte(oss: OssTestServer) -> None:
    oss.faults.add(Fault("reset", op="get", key="obj", after_bytes=0), times=None)
    config = ClientConfig(attempts=3, backoff_base=0.01, backoff_max=0.02)
    async with HttpObjectClient(oss.endpoint(), config) as client:
        with pytest.raises(TransferError):
            await get_bytes(client, "bkt", "obj", 0, 1000)
    assert len(get_records(oss, "obj")) == 3


async def test_if_match_mismatch_is_object_changed(oss: OssTestServer) -> None:
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        meta = await client.head("bkt", "small")
        got, _ = await get_bytes(client, "bkt", "small", 0, 10, meta.etag)
        assert got == b"0123456789"
        oss.put("bkt", "small", b"9876543210")
        with pytest.raises(ObjectChangedError) as info:
            await get_bytes(client, "bkt", "small", 0, 10, meta.etag)
    assert info.value.code == "PreconditionFailed"
    assert info.value.status == 412
    records = get_records(oss, "small")
    assert [r.status for r in records] == [206, 412]  # not retried


async def test_range_past_the_end_is_an_error(oss: OssTestServer) -> None:
    async with HttpObjectClient(oss.endpoint(), FAST) as client:
        with pytest.raises(ServiceError) as info:
            await get_bytes(client, "bkt", "small", 10, 20)
    assert info.value.code == "InvalidRange"
    assert len(get_records(oss, "small")) == 1


# ---------------------------------------------------------------------- rate limit


# Under trio's autojump clock the limiter's sleeps take no real time and are measured
# exactly; the client's own timeouts are pushed out of reach, since the clock also
# jumps while a task waits on the network.
_NO_TIMEOUTS = {"stall_timeout": math.inf, "connect_timeout": math.inf, "timeout": math.inf}


async def test_rate_limit_caps_throughput(
    oss: OssTestServer, autojump_clock: trio.testing.MockClock
) -> None:
    data = pattern(2 * MiB, seed=9)
    oss.put("bkt", "two-mib", data)
    rate = 1 * MiB
    config = ClientConfig(rate_limit=rate, backoff_base=0.01, **_NO_TIMEOUTS)
    async with HttpObjectClient(oss.endpoint(), config) as client:
        began = trio.current_time()
        got, _ = await get_bytes(client, "bkt", "two-mib", 0, len(data))
        elapsed = trio.current_time() - began
    assert got == data
    # All but the first burst (a quarter second's worth) waits for the bucket, exactly.
    assert elapsed == pytest.approx((len(data) - rate / 4) / rate)
    (record,) = get_records(oss, "two-mib")
    assert record.status == 206


async def test_rate_limit_is_shared_by_concurrent_transfers(
    oss: OssTestServer, autojump_clock: trio.testing.MockClock
) -> None:
    data = pattern(1 * MiB, seed=10)
    oss.put("bkt", "a", data)
    oss.put("bkt", "b", data)
    rate = 1 * MiB
    config = ClientConfig(rate_limit=rate, **_NO_TIMEOUTS)
    async with HttpObjectClient(oss.endpoint(), config) as client:
        results: dict[str, bytes] = {}

        async def fetch(key: str) -> None:
            results[key], _ = await get_bytes(client, "bkt", key, 0, len(data))

        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, "a")
            nursery.start_soon(fetch, "b")
        elapsed = trio.current_time() - began
    assert results == {"a": data, "b": data}
    # One bucket for both: two MiB at one MiB/s, less the first burst.
    assert elapsed == pytest.approx((2 * len(data) - rate / 4) / rate)


# ---------------------------------------------------------------------- ls and stat


def _cli(server: OssTestServer, env: dict[str, str], *args: str) -> Any:
    """Run an ``ossfs`` command against *server*."""
    return run_ossfs(*args, "--endpoint", server.url, env=env)


def test_ls_and_stat_commands(oss_server: OssTestServer, oss_env: dict[str, str]) -> None:
    for i in range(1205):
        oss_server.put("bkt", f"many/k{i:05d}", b"x")
    for key in ENCODED_KEYS:
        oss_server.put("bkt", key, b"hello")
    oss_server.put("bkt", "top.txt", b"top")
    result = _cli(oss_server, oss_env, "ls", "-r", "oss://bkt/many/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"many/k{i:05d}" for i in range(1205)]
    result = _cli(oss_server, oss_env, "ls", "oss://bkt/")
    assert result.stdout.splitlines() == ["enc/", "many/", "top.txt"]
    result = _cli(oss_server, oss_env, "ls", "oss://bkt/enc/")
    assert result.stdout.splitlines() == ["enc/caf\u00e9/", "enc/double/"] + sorted(
        (k for k in ENCODED_KEYS if k.count("/") == 1), key=lambda k: k.encode()
    )

    key = "enc/with space.txt"
    result = _cli(oss_server, oss_env, "stat", f"oss://bkt/{key}")
    assert result.returncode == 0, result.stderr
    meta = oss_server.head("bkt", key)
    assert meta is not None
    shown = json.loads(result.stdout)
    assert shown["url"] == f"oss://bkt/{key}"
    assert (shown["size"], shown["etag"], shown["crc64ecma"]) == (5, meta.etag, str(meta.crc64))
    assert shown["last_modified"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(meta.mtime))


@pytest.mark.parametrize(
    ("args", "status", "expected"),
    [
        (["stat", "oss://bkt/no/such/key"], 1, "NoSuchKey"),
        (["stat", "oss://no-such-bucket/k"], 1, "NoSuchBucket"),
        (["ls", "oss://no-such-bucket/"], 1, "NoSuchBucket"),
        (["stat", "oss://bkt/"], 2, "needs an object key"),
        (["ls", "ftp://bkt/"], 2, "not an object URL"),
    ],
)
def test_ls_and_stat_errors(
    oss_server: OssTestServer, oss_env: dict[str, str], args: list[str], status: int, expected: str
) -> None:
    oss_server.create_bucket("bkt")
    result = _cli(oss_server, oss_env, *args)
    assert result.returncode == status
    assert "Traceback" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("ossfs: error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_stat_with_bad_secret(oss_server: OssTestServer, oss_env: dict[str, str]) -> None:
    oss_server.put("bkt", "k", b"v")
    env = dict(oss_env, OSS_ACCESS_KEY_SECRET="not-the-secret")
    result = _cli(oss_server, env, "stat", "oss://bkt/k")
    assert result.returncode == 1
    assert "SignatureDoesNotMatch" in result.stderr
    assert "not-the-secret" not in result.stderr
