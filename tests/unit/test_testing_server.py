"""The OSS-dialect test server (`ossfs.testing`), seen from a real HTTP client.

Every test runs a server on 127.0.0.1 in a background thread and talks to it
with a synchronous httpx client: headers, ranges in both OSS behaviours,
conditions, listings, errors, signatures, each fault kind and the counters.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from ossfs.protocol.signing import Credentials, sign_oss_v1, sign_oss_v4
from ossfs.protocol.xml import parse_error, parse_list_objects_v2
from ossfs.testing import Fault, OssTestServer, crc64, nginx_etag

DATA = bytes(range(256)) * 4  # 1000+ bytes with distinct neighbours
DATA = DATA[:1000]
BIG = os.urandom(256 * 1024)


@pytest.fixture
def srv() -> Iterator[OssTestServer]:
    with OssTestServer() as server:
        server.put("b", "obj", DATA, mtime=1_700_000_000)
        server.put("b", "big", BIG)
        server.put("b", "empty", b"")
        yield server


@pytest.fixture
def client(srv: OssTestServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        yield c


def _key_url(bucket: str, key: str) -> str:
    return f"/{bucket}/" + quote(key, safe="/")


def _x_oss_err(r: httpx.Response) -> bytes:
    return base64.b64decode(r.headers["x-oss-err"])


# ------------------------------------------------------------------ HEAD and GET


def test_head_headers(client: httpx.Client) -> None:
    r = client.head("/b/obj")
    assert r.status_code == 200
    h = r.headers
    assert h["etag"] == '"' + hashlib.md5(DATA).hexdigest().upper() + '"'
    assert h["content-length"] == "1000"
    assert h["accept-ranges"] == "bytes"
    assert h["content-type"] == "application/octet-stream"
    assert h["x-oss-object-type"] == "Normal"
    assert h["x-oss-storage-class"] == "Standard"
    assert h["x-oss-hash-crc64ecma"] == str(crc64(DATA))
    assert h["server"] == "ossfs-testing"
    assert parsedate_to_datetime(h["last-modified"]).timestamp() == 1_700_000_000
    assert r.content == b""
    ids = {client.head("/b/obj").headers["x-oss-request-id"] for _ in range(5)}
    ids.add(h["x-oss-request-id"])
    assert len(ids) == 6 and all(len(i) == 24 for i in ids)


def test_get_whole_object(client: httpx.Client) -> None:
    r = client.get("/b/big")
    assert r.status_code == 200
    assert r.content == BIG
    assert "content-range" not in r.headers


@pytest.mark.parametrize(
    ("range_header", "standard", "status", "first", "last"),
    [
        ("bytes=0-9", True, 206, 0, 9),
        ("bytes=0-9", False, 206, 0, 9),
        ("bytes=990-", True, 206, 990, 999),
        ("bytes=990-", False, 206, 990, 999),
        ("bytes=-10", True, 206, 990, 999),
        ("bytes=-10", False, 206, 990, 999),
        ("bytes=0-0", True, 206, 0, 0),
        # End past the object: clamped with the standard behaviour, the
        # whole object without it.
        ("bytes=500-2000", True, 206, 500, 999),
        ("bytes=500-2000", False, 200, 0, 999),
        ("bytes=-2000", True, 206, 0, 999),
        ("bytes=-2000", False, 200, 0, 999),
        ("bytes=1000-", False, 200, 0, 999),
        ("bytes=1000-2000", False, 200, 0, 999),
        # Several ranges: only the first counts.
        ("bytes=10-19,30-39", True, 206, 10, 19),
        # Malformed ranges are ignored either way.
        ("byte=0-9", True, 200, 0, 999),
        ("bytes=9-2", True, 200, 0, 999),
        ("bytes=x-y", False, 200, 0, 999),
    ],
)
def test_ranges(
    client: httpx.Client, range_header: str, standard: bool, status: int, first: int, last: int
) -> None:
    headers = {"Range": range_header}
    if standard:
        headers["x-oss-range-behavior"] = "standard"
    r = client.get("/b/obj", headers=headers)
    assert r.status_code == status
    assert r.content == DATA[first : last + 1]
    assert r.headers["content-length"] == str(last - first + 1)
    if status == 206:
        assert r.headers["content-range"] == f"bytes {first}-{last}/1000"
    else:
        assert "content-range" not in r.headers


@pytest.mark.parametrize("range_header", ["bytes=1000-", "bytes=1000-2000", "bytes=-0"])
def test_unsatisfiable_range_is_416_only_with_standard_behaviour(
    client: httpx.Client, range_header: str
) -> None:
    r = client.get("/b/obj", headers={"Range": range_header, "x-oss-range-behavior": "standard"})
    assert r.status_code == 416
    assert parse_error(r.content).code == "InvalidRange"
    assert r.headers["content-range"] == "bytes */1000"
    r = client.get("/b/obj", headers={"Range": range_header})
    assert (r.status_code, r.content) == (200, DATA)


def test_empty_object_with_range(client: httpx.Client) -> None:
    r = client.get("/b/empty", headers={"Range": "bytes=0-", "x-oss-range-behavior": "standard"})
    assert r.status_code == 416
    r = client.get("/b/empty", headers={"Range": "bytes=0-"})
    assert (r.status_code, r.content) == (200, b"")
    assert client.get("/b/empty").headers["x-oss-hash-crc64ecma"] == "0"


def test_if_match(client: httpx.Client) -> None:
    etag = client.head("/b/obj").headers["etag"]
    for value in (etag, etag.strip('"'), "*", f'"nope", {etag}'):
        r = client.get("/b/obj", headers={"If-Match": value, "Range": "bytes=0-1"})
        assert r.status_code == 206, value
    r = client.get("/b/obj", headers={"If-Match": '"0123"', "Range": "bytes=0-1"})
    assert r.status_code == 412
    assert parse_error(r.content).code == "PreconditionFailed"
    r = client.head("/b/obj", headers={"If-Match": '"0123"'})
    assert r.status_code == 412
    assert parse_error(_x_oss_err(r)).code == "PreconditionFailed"


def test_if_none_match(client: httpx.Client) -> None:
    etag = client.head("/b/obj").headers["etag"]
    r = client.get("/b/obj", headers={"If-None-Match": etag})
    assert (r.status_code, r.content) == (304, b"")
    assert r.headers["etag"] == etag
    assert client.get("/b/obj", headers={"If-None-Match": '"other"'}).status_code == 200
    # The connection is still usable after a 304.
    assert client.get("/b/obj").content == DATA


# ------------------------------------------------------------------------ listing


def _list(client: httpx.Client, bucket: str, **params: str) -> httpx.Response:
    return client.get(f"/{bucket}/", params={"list-type": "2", **params})


def test_list_pagination_past_1000_keys(srv: OssTestServer, client: httpx.Client) -> None:
    keys = [f"many/{i:05d}" for i in range(2500)]
    for k in keys:
        srv.put("big-bucket", k, b"x")
    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        params = {"prefix": "many/", "max-keys": "5000"}  # capped at 1000
        if token:
            params["continuation-token"] = token
        r = _list(client, "big-bucket", **params)
        assert r.status_code == 200
        assert b"<MaxKeys>1000</MaxKeys>" in r.content
        page = parse_list_objects_v2(r.content)
        pages += 1
        seen.extend(o.key for o in page.objects)
        assert (b"<NextContinuationToken>" in r.content) == (page.next_token is not None)
        if page.next_token is None:
            break
        token = page.next_token
    assert pages == 3
    assert seen == keys
    # The default page is 100 keys.
    page = parse_list_objects_v2(_list(client, "big-bucket").content)
    assert len(page.objects) == 100 and page.next_token is not None


def test_list_delimiter_and_small_pages(srv: OssTestServer, client: httpx.Client) -> None:
    for k in ["a/1", "a/2", "a/b/3", "b/x/y", "c", "d/", "e"]:
        srv.put("tree", k, b"")
    page = parse_list_objects_v2(_list(client, "tree", delimiter="/").content)
    assert [o.key for o in page.objects] == ["c", "e"]
    assert list(page.prefixes) == ["a/", "b/", "d/"]
    assert page.next_token is None
    page = parse_list_objects_v2(_list(client, "tree", delimiter="/", prefix="a/").content)
    assert [o.key for o in page.objects] == ["a/1", "a/2"]
    assert list(page.prefixes) == ["a/b/"]
    # One entry per page: a common prefix is never returned twice and
    # max-keys counts prefixes and objects together.
    items: list[str] = []
    token = None
    while True:
        params = {"delimiter": "/", "max-keys": "1"}
        if token:
            params["continuation-token"] = token
        page = parse_list_objects_v2(_list(client, "tree", **params).content)
        assert len(page.objects) + len(page.prefixes) == 1
        items += [o.key for o in page.objects] + list(page.prefixes)
        token = page.next_token
        if token is None:
            break
    assert items == ["a/", "b/", "c", "d/", "e"]
    page = parse_list_objects_v2(_list(client, "tree", **{"start-after": "a/2"}).content)
    assert [o.key for o in page.objects] == ["a/b/3", "b/x/y", "c", "d/", "e"]


WEIRD_KEYS = [
    "with space.txt",
    "plus+sign",
    "per%cent",
    "ünï/cödé",
    "double//slash",
    "~tilde",
    "q?mark",
    "amp&er=sand",
    "\u4e2d\u6587",
]


def test_url_encoded_listing_of_odd_keys(srv: OssTestServer, client: httpx.Client) -> None:
    for k in WEIRD_KEYS:
        srv.put("odd", k, k.encode())
    r = _list(client, "odd", **{"encoding-type": "url", "max-keys": "1000"})
    assert b"<EncodingType>url</EncodingType>" in r.content
    assert b"plus+sign" not in r.content  # "+" must travel as %2B
    page = parse_list_objects_v2(r.content)
    listed = [o.key for o in page.objects]
    assert listed == sorted(WEIRD_KEYS, key=lambda k: k.encode())
    for k in WEIRD_KEYS:
        got = client.get(_key_url("odd", k))
        assert (got.status_code, got.content) == (200, k.encode()), k
    # A prefix with special characters, sent through httpx's form encoding.
    page = parse_list_objects_v2(
        _list(client, "odd", prefix="plus+", **{"encoding-type": "url"}).content
    )
    assert [o.key for o in page.objects] == ["plus+sign"]


def test_list_v1_marker(srv: OssTestServer, client: httpx.Client) -> None:
    for k in ["a/1", "a/2", "b", "c/1", "d"]:
        srv.put("v1", k, b"")
    r = client.get("/v1/", params={"max-keys": "2", "delimiter": "/"})
    assert b"<Marker></Marker>" in r.content and b"<KeyCount>" not in r.content
    page = parse_list_objects_v2(r.content)
    assert (list(page.prefixes), [o.key for o in page.objects]) == (["a/"], ["b"])
    assert b"<NextMarker>b</NextMarker>" in r.content
    r = client.get("/v1/", params={"max-keys": "2", "delimiter": "/", "marker": "b"})
    page = parse_list_objects_v2(r.content)
    assert (list(page.prefixes), [o.key for o in page.objects]) == (["c/"], ["d"])
    assert page.next_token is None
    r = client.get("/v1/", params={"marker": "a/1"})
    assert [o.key for o in parse_list_objects_v2(r.content).objects] == ["a/2", "b", "c/1", "d"]


@pytest.mark.parametrize(
    "params",
    [
        {"max-keys": "abc"},
        {"max-keys": "-1"},
        {"encoding-type": "base64"},
        {"continuation-token": "!!!"},
    ],
)
def test_list_bad_arguments(client: httpx.Client, params: dict[str, str]) -> None:
    r = _list(client, "b", **params)
    assert r.status_code == 400
    assert parse_error(r.content).code == "InvalidArgument"


# ------------------------------------------------------------------------- errors


def test_errors(client: httpx.Client) -> None:
    r = client.get("/nobucket/k")
    assert r.status_code == 404
    doc = parse_error(r.content)
    assert doc.code == "NoSuchBucket"
    assert doc.request_id == r.headers["x-oss-request-id"]
    assert r.headers["x-oss-ec"] == doc.ec
    assert _list(client, "nobucket").status_code == 404
    r = client.get("/b/missing")
    assert (r.status_code, parse_error(r.content).code) == (404, "NoSuchKey")
    # HEAD: no body, the document travels base64-encoded in x-oss-err.
    r = client.head("/b/missing")
    assert r.status_code == 404 and r.content == b""
    doc = parse_error(_x_oss_err(r))
    assert doc.code == "NoSuchKey" and doc.request_id == r.headers["x-oss-request-id"]
    assert r.headers["x-oss-ec"] == doc.ec
    assert parse_error(_x_oss_err(client.head("/nobucket/k"))).code == "NoSuchBucket"
    for method in ("PUT", "POST", "DELETE"):
        r = client.request(method, "/b/obj", content=b"data")
        assert (r.status_code, parse_error(r.content).code) == (405, "MethodNotAllowed")
    assert client.get("/b/obj").content == DATA


def test_keys_cannot_escape_a_directory_bucket(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "secret").write_bytes(b"secret")
    with OssTestServer() as server, httpx.Client(base_url=server.url) as c:
        server.add_directory_bucket("d", tmp_path / "data")
        assert c.get("/d/").status_code == 200
        for path in ("/d/%2E%2E/secret", "/d/..%2Fsecret", "/d/x/%2E%2E/%2E%2E/secret"):
            r = c.get(path)
            assert (r.status_code, parse_error(r.content).code) == (404, "NoSuchKey"), path


# --------------------------------------------------------------------- signatures


def test_signatures() -> None:
    creds = Credentials("ak", "sk")
    with OssTestServer(credentials={"ak": "sk"}) as server, httpx.Client(base_url=server.url) as c:
        server.put("b", "dir/a b+c.txt", b"hello")
        key = "dir/a b+c.txt"
        headers: dict[str, str] = {"Range": "bytes=0-1"}
        sign_oss_v4(
            method="GET",
            bucket="b",
            key=key,
            query=[],
            headers=headers,
            credentials=creds,
            region="cn-hangzhou",
            now=time.time(),
        )
        r = c.get(_key_url("b", key), headers=headers)
        assert (r.status_code, r.content) == (206, b"he")

        query: list[tuple[str, str | None]] = [
            ("list-type", "2"),
            ("prefix", "dir/"),
            ("continuation-token", "ZGly"),
        ]
        headers = {}
        sign_oss_v1(
            method="GET",
            bucket="b",
            key=None,
            query=query,
            headers=headers,
            credentials=creds,
            now=time.time(),
        )
        r = c.get("/b/?list-type=2&prefix=dir%2F&continuation-token=ZGly", headers=headers)
        assert r.status_code == 200, r.text

        headers = {}
        sign_oss_v4(
            method="HEAD",
            bucket="b",
            key=key,
            query=[],
            headers=headers,
            credentials=Credentials("ak", "wrong"),
            region="cn-hangzhou",
            now=time.time(),
        )
        r = c.head(_key_url("b", key), headers=headers)
        assert r.status_code == 403
        assert parse_error(_x_oss_err(r)).code == "SignatureDoesNotMatch"
        headers = {}
        sign_oss_v1(
            method="GET",
            bucket="b",
            key=key,
            query=[],
            headers=headers,
            credentials=Credentials("ak", "wrong"),
            now=time.time(),
        )
        r = c.get(_key_url("b", key), headers=headers)
        assert (r.status_code, parse_error(r.content).code) == (403, "SignatureDoesNotMatch")
        headers = {}
        sign_oss_v1(
            method="GET",
            bucket="b",
            key=key,
            query=[],
            headers=headers,
            credentials=Credentials("nobody", "sk"),
            now=time.time(),
        )
        r = c.get(_key_url("b", key), headers=headers)
        assert (r.status_code, parse_error(r.content).code) == (403, "InvalidAccessKeyId")

        r = c.get(_key_url("b", key))
        assert (r.status_code, parse_error(r.content).code) == (403, "AccessDenied")
        server.allow_anonymous = True
        assert c.get(_key_url("b", key)).content == b"hello"


# ------------------------------------------------------------------------- faults


def test_status_fault_and_filters(srv: OssTestServer, client: httpx.Client) -> None:
    srv.faults.add(Fault("status", status=503, key="obj", method="GET"), times=2)
    srv.faults.add(Fault("status", status=403, code="AccessDenied", op="list"))
    srv.faults.add(Fault("status", status=500, when=lambda info: info.key == "big"))
    assert client.head("/b/obj").status_code == 200  # method filter
    for _ in range(2):
        r = client.get("/b/obj")
        assert (r.status_code, parse_error(r.content).code) == (503, "ServiceUnavailable")
    assert client.get("/b/obj").status_code == 200
    r = _list(client, "b")
    assert (r.status_code, parse_error(r.content).code) == (403, "AccessDenied")
    assert _list(client, "b").status_code == 200
    r = client.head("/b/big")
    assert r.status_code == 500 and parse_error(_x_oss_err(r)).code == "InternalError"
    assert srv.faults.pending() == []
    assert [f.kind for f, _ in srv.faults.fired()] == ["status"] * 4
    srv.faults.add(Fault("status", status=429, key="obj"), times=None)
    assert [client.get("/b/obj").status_code for _ in range(3)] == [429] * 3
    srv.faults.clear()
    assert client.get("/b/obj").status_code == 200


def test_reset_mid_body(srv: OssTestServer, client: httpx.Client) -> None:
    srv.faults.add(Fault("reset", key="big", after_bytes=100_000))
    received = 0
    with pytest.raises(httpx.ReadError), client.stream("GET", "/b/big") as r:
        assert r.headers["content-length"] == str(len(BIG))
        for chunk in r.iter_raw():
            received += len(chunk)
    assert received <= 100_000
    assert client.get("/b/big").content == BIG  # a fresh connection works
    rec = [g for g in srv.stats.gets if g.fault == "reset"]
    assert len(rec) == 1 and rec[0].bytes_sent == 100_000 and rec[0].end == len(BIG)


def test_truncate_is_a_short_body(srv: OssTestServer, client: httpx.Client) -> None:
    srv.faults.add(Fault("truncate", key="big", after_bytes=12_345))
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", "/b/big") as r:
        for chunk in r.iter_raw():
            received += chunk
    assert bytes(received) == BIG[:12_345]


def test_stall_trips_a_read_timeout(srv: OssTestServer) -> None:
    srv.faults.add(Fault("stall", key="big", after_bytes=1000, seconds=3))
    timeout = httpx.Timeout(5, read=0.3)
    with httpx.Client(base_url=srv.url, timeout=timeout) as c:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            c.get("/b/big")
        assert time.monotonic() - started < 2
    # A stall that continues delivers everything, late.
    srv.faults.add(Fault("stall", key="obj", after_bytes=10, seconds=0.2))
    with httpx.Client(base_url=srv.url, timeout=5) as c:
        started = time.monotonic()
        assert c.get("/b/obj").content == DATA
        assert time.monotonic() - started >= 0.2


def test_stall_then_trickle(srv: OssTestServer, client: httpx.Client) -> None:
    srv.faults.add(
        Fault("stall", key="obj", after_bytes=100, seconds=0.1, then="trickle", interval=0.01)
    )
    received = bytearray()
    with client.stream("GET", "/b/obj") as r:
        for chunk in r.iter_raw():
            received += chunk
            if len(received) >= 105:
                break
    # Everything sent is the object's bytes, in order; the trickle sends one byte a write.
    assert bytes(received) == DATA[: len(received)]
    # A trickle that runs to its end delivers the whole object.
    srv.faults.add(
        Fault("stall", key="obj", after_bytes=990, seconds=0, then="trickle", interval=0.001)
    )
    assert client.get("/b/obj").content == DATA


@pytest.mark.parametrize("answer", [200, 206, 503])
def test_endless_body(srv: OssTestServer, client: httpx.Client, answer: int) -> None:
    srv.faults.add(Fault("endless", key="obj", answer=answer))
    received = bytearray()
    with client.stream("GET", "/b/obj", headers={"Range": "bytes=10-19"}) as r:
        assert r.status_code == answer
        assert "content-length" not in r.headers
        for chunk in r.iter_raw():
            received += chunk
            if len(received) > 3 * len(DATA):
                break
    assert len(received) > 3 * len(DATA)  # far more than the object, and still going
    if answer == 200:
        assert bytes(received[:3000]) == DATA * 3  # the object, over and over
    elif answer == 206:
        assert r.headers["content-range"] == "bytes 10-19/1000"
        assert bytes(received[:10]) == DATA[10:20]
    else:
        assert received.startswith(
            b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
        )
    assert client.get("/b/obj").content == DATA  # one shot
    # A listing too.
    srv.faults.add(Fault("endless", op="list"))
    received.clear()
    with client.stream("GET", "/b/", params={"list-type": "2"}) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            received += chunk
            if len(received) > 1 << 20:
                break
    assert received.count(b"<Contents>") > 1000


def _page_of_two(client: httpx.Client, token: str | None) -> tuple[list[str], str | None]:
    params = {"list-type": "2", "max-keys": "2"}
    if token:
        params["continuation-token"] = token
    page = parse_list_objects_v2(client.get("/b/", params=params).content)
    return [o.key for o in page.objects], page.next_token


def test_listing_faults(srv: OssTestServer, client: httpx.Client) -> None:
    first = ["big", "empty"]
    # token_loop: the first page, then the same token (and page) for ever.
    srv.faults.add(Fault("token_loop"), times=None)
    keys, token = _page_of_two(client, None)
    assert keys == first and token is not None
    for _ in range(3):
        keys, again = _page_of_two(client, token)
        assert (keys, again) == (first, token)
    srv.faults.clear()
    # From a later page, that page for ever.
    _, token = _page_of_two(client, None)
    srv.faults.add(Fault("token_loop"), times=None)
    keys, again = _page_of_two(client, token)
    assert (keys, again) == (["obj"], token)
    srv.faults.clear()
    # keys_repeat: the first page with a new token every time.
    srv.faults.add(Fault("keys_repeat"), times=None)
    tokens: set[str | None] = set()
    token = None
    for _ in range(4):
        keys, token = _page_of_two(client, token)
        assert keys == first and token not in tokens
        tokens.add(token)
    srv.faults.clear()
    # endless_listing: made-up keys that increase, never the end.
    srv.faults.add(Fault("endless_listing"), times=None)
    seen: list[str] = []
    token = None
    for _ in range(4):
        keys, token = _page_of_two(client, token)
        assert token is not None
        seen += keys
    assert seen == [f"endless-{n:012d}" for n in range(1, 9)]
    srv.faults.clear()
    assert _page_of_two(client, None) == (first, _page_of_two(client, None)[1])


def test_replace_during_a_read(srv: OssTestServer, client: httpx.Client) -> None:
    old = client.head("/b/big").headers["etag"]
    new_data = b"new content"
    srv.faults.add(Fault("replace", key="big", after_bytes=1000, data=new_data))
    r = client.get("/b/big", headers={"Range": "bytes=0-", "x-oss-range-behavior": "standard"})
    assert r.content == BIG  # the answer in flight keeps its version
    assert r.headers["etag"] == old
    h = client.head("/b/big")
    assert h.headers["etag"] != old and h.headers["content-length"] == str(len(new_data))
    r = client.get("/b/big", headers={"If-Match": old, "Range": "bytes=0-9"})
    assert r.status_code == 412
    # Without data, the old bytes are inverted: same size, new ETag.
    etag = client.head("/b/obj").headers["etag"]
    srv.faults.add(Fault("replace", key="obj"))
    client.get("/b/obj")
    assert client.head("/b/obj").headers["etag"] != etag
    assert client.get("/b/obj").content == bytes(255 - b for b in DATA)


def test_corrupt_flips_bytes(srv: OssTestServer, client: httpx.Client) -> None:
    srv.faults.add(Fault("corrupt", key="obj", offset=5, length=3))
    r = client.get("/b/obj", headers={"Range": "bytes=100-199"})
    body = r.content
    want = DATA[100:200]
    assert r.status_code == 206 and len(body) == 100
    assert [i for i in range(100) if body[i] != want[i]] == [5, 6, 7]
    assert r.headers["x-oss-hash-crc64ecma"] == str(crc64(DATA))
    assert client.get("/b/obj").content == DATA  # one shot


def test_random_errors_are_seeded(srv: OssTestServer) -> None:
    def run(seed: int) -> list[int]:
        with OssTestServer(seed=seed) as s, httpx.Client(base_url=s.url) as c:
            s.put("b", "k", b"v")
            s.faults.error_rate = 0.5
            s.faults.error_status = 503
            return [c.get("/b/k").status_code for _ in range(20)]

    first = run(7)
    assert first == run(7)
    assert set(first) == {200, 503}


def test_latency_and_bandwidth(srv: OssTestServer, client: httpx.Client) -> None:
    client.head("/b/obj")  # connect first
    srv.faults.latency = 0.1
    started = time.monotonic()
    client.head("/b/obj")
    assert 0.1 <= time.monotonic() - started < 0.5
    srv.faults.latency = 0
    srv.faults.bandwidth = 1_000_000
    started = time.monotonic()
    assert client.get("/b/big").content == BIG
    elapsed = time.monotonic() - started
    assert len(BIG) / 1_000_000 * 0.95 <= elapsed < len(BIG) / 1_000_000 + 0.3


# ----------------------------------------------------------------------- counters


def test_counters(srv: OssTestServer, client: httpx.Client) -> None:
    srv.reset_stats()
    client.head("/b/obj")
    client.get("/b/obj", headers={"Range": "bytes=10-19"})
    client.get("/b/obj", headers={"Range": "bytes=-5"})
    client.get("/b/obj", headers={"Range": "bytes=900-", "If-Match": '"stale"'})
    _list(client, "b")
    srv.faults.add(Fault("truncate", key="big", after_bytes=500))
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/b/big", headers={"Range": "bytes=1000-9999"})
    stats = srv.stats
    assert stats.requests == {("HEAD", "head"): 1, ("GET", "get"): 4, ("GET", "list"): 1}
    assert stats.count(op="get") == 4 and stats.count(method="GET") == 5
    summary = [
        (g.key, g.req_start, g.req_end, g.start, g.end, g.status, g.bytes_sent, g.fault)
        for g in stats.gets
    ]
    assert summary == [
        ("obj", 10, 19, 10, 20, 206, 10, None),
        ("obj", None, 5, 995, 1000, 206, 5, None),
        ("obj", 900, None, 0, 0, 412, 0, None),
        ("big", 1000, 9999, 1000, 10000, 206, 500, "truncate"),
    ]
    assert stats.bytes_sent == 515
    srv.reset_stats()
    assert srv.stats.requests == {} and srv.stats.gets == () and srv.stats.bytes_sent == 0


# ----------------------------------------------------------------- directory mode


def test_directory_bucket(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello")
    (root / "sub" / "deeper" / "b.bin").write_bytes(DATA)
    (tmp_path / "outside").write_bytes(b"nope")
    (root / "link-out").symlink_to(tmp_path / "outside")
    (root / "link-in").symlink_to(root / "a.txt")
    os.utime(root / "a.txt", (1_600_000_000, 1_600_000_000))
    with OssTestServer() as server, httpx.Client(base_url=server.url) as c:
        server.add_directory_bucket("d", root)
        server.add_directory_bucket("nocrc", root, crc=False)
        page = parse_list_objects_v2(_list(c, "d").content)
        assert [o.key for o in page.objects] == ["a.txt", "link-in", "sub/deeper/b.bin"]
        by_key = {o.key: o for o in page.objects}
        assert by_key["a.txt"].etag == nginx_etag(1_600_000_000, 5) == "5f5e1000-5"
        assert by_key["a.txt"].mtime == 1_600_000_000
        r = c.head("/d/a.txt")
        assert r.headers["etag"] == '"5f5e1000-5"'
        assert r.headers["x-oss-hash-crc64ecma"] == str(crc64(b"hello"))
        assert parsedate_to_datetime(r.headers["last-modified"]).timestamp() == 1_600_000_000
        assert "x-oss-hash-crc64ecma" not in c.head("/nocrc/a.txt").headers
        r = c.get("/d/sub/deeper/b.bin", headers={"Range": "bytes=10-19"})
        assert (r.status_code, r.content) == (206, DATA[10:20])
        assert c.get("/d/link-out").status_code == 404
        # New files show up in listings by themselves (their directory changed).
        (root / "sub" / "new.txt").write_bytes(b"new")
        page = parse_list_objects_v2(_list(c, "d", prefix="sub/", delimiter="/").content)
        assert [o.key for o in page.objects] == ["sub/new.txt"]
        assert list(page.prefixes) == ["sub/deeper/"]
        # A replaced file gets a new ETag even within the same second.
        old = c.head("/d/sub/new.txt").headers["etag"]
        server.faults.add(Fault("replace", key="sub/new.txt", data=b"NEW"))
        assert c.get("/d/sub/new.txt").content == b"new"
        assert c.head("/d/sub/new.txt").headers["etag"] != old
        assert (root / "sub" / "new.txt").read_bytes() == b"NEW"
        server.faults.add(Fault("reset", key="sub/deeper/b.bin", after_bytes=10))
        with pytest.raises(httpx.TransportError):
            c.get("/d/sub/deeper/b.bin")
        assert c.get("/d/sub/deeper/b.bin").content == DATA


# ------------------------------------------------------------------- command line


def test_command_line(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f.txt").write_bytes(b"file")
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ossfs.testing",
            "serve",
            "--bucket",
            f"d={tmp_path / 'data'}",
            "--random-object",
            "m/r.bin=1KiB",
            "--access-key-id",
            "ak",
            "--access-key-secret",
            "s3cr3t-value",
            "--anonymous",
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        port = int(port_file.read_text())
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/d/f.txt").content == b"file"
            assert c.head("/m/r.bin").headers["content-length"] == "1024"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip() == f"listening on http://127.0.0.1:{port}"
    assert "s3cr3t-value" not in out + err
