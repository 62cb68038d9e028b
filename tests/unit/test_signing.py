"""Signing vectors from the protocol reference (sections 1.1-1.3), reproduced exactly."""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Mapping
from urllib.parse import quote

import pytest

from ossfs.protocol.signing import (
    Credentials,
    Query,
    SignatureError,
    _iso8601,
    _oss_v4_additional,
    _oss_v4_scope,
    _oss_v4_signature,
    _v1_signature,
    check_oss_signature,
    oss_v1_string_to_sign,
    oss_v4_canonical_request,
    sign_aws_v4,
    sign_oss_v1,
    sign_oss_v4,
)

AK = Credentials("ak", "sk")
DEC28 = "Wed, 28 Dec 2022 10:27:41 GMT"
DEC28_EPOCH = calendar.timegm((2022, 12, 28, 10, 27, 41))


# The presigned-URL forms of V1 and V4: ossfs never presigns, but the reference's
# vectors for them check the string-to-sign and the canonical request.


def presign_oss_v1(
    *,
    method: str,
    bucket: str | None,
    key: str | None,
    query: Query,
    headers: Mapping[str, str],
    credentials: Credentials,
    expires: int,
) -> list[tuple[str, str | None]]:
    """Return the query of a V1 presigned URL valid until epoch *expires*."""
    q = list(query)
    if credentials.session_token:
        q.append(("security-token", credentials.session_token))
    sts = oss_v1_string_to_sign(
        method=method, bucket=bucket, key=key, query=q, headers=headers, date=str(expires)
    )
    signature = _v1_signature(credentials.access_key_secret, sts)
    return q + [
        ("OSSAccessKeyId", credentials.access_key_id),
        ("Expires", str(expires)),
        ("Signature", signature),
    ]


def presign_oss_v4(
    *,
    method: str,
    bucket: str | None,
    key: str | None,
    query: Query,
    headers: Mapping[str, str],
    credentials: Credentials,
    region: str,
    now: float,
    expires: int,
    additional_headers: Iterable[str] = (),
    product: str = "oss",
) -> list[tuple[str, str | None]]:
    """Return the query of a V4 presigned URL valid for *expires* seconds after *now*."""
    iso = _iso8601(now)
    scope = _oss_v4_scope(iso[:8], region, product)
    extra = _oss_v4_additional(headers, additional_headers)
    q = list(query) + [
        ("x-oss-signature-version", "OSS4-HMAC-SHA256"),
        ("x-oss-credential", f"{credentials.access_key_id}/{scope}"),
        ("x-oss-date", iso),
        ("x-oss-expires", str(expires)),
    ]
    if credentials.session_token:
        q.append(("x-oss-security-token", credentials.session_token))
    if extra:
        q.append(("x-oss-additional-headers", ";".join(extra)))
    canonical = oss_v4_canonical_request(
        method=method,
        bucket=bucket,
        key=key,
        query=q,
        headers=headers,
        additional_headers=extra,
    )
    signature = _oss_v4_signature(
        secret=credentials.access_key_secret,
        datetime_iso=iso,
        region=region,
        product=product,
        canonical_request=canonical,
    )
    return q + [("x-oss-signature", signature)]


# ------------------------------------------------------------------ V1 (section 1.1)


def _v1_put_headers() -> dict[str, str]:
    return {
        "Content-MD5": "eB5eJF1ptWaXm4bijSPyxw==",
        "Content-Type": "text/html",
        "x-oss-meta-author": "alice",
        "x-oss-meta-magic": "abracadabra",
        "x-oss-date": DEC28,
        "Date": DEC28,
    }


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ([], "OSS ak:kSHKmLxlyEAKtZPkJhG9bZb5k7M="),
        ([("acl", None)], "OSS ak:/afkugFbmWDQ967j1vr6zygBLQk="),
    ],
)
def test_v1_put_vectors(query: list[tuple[str, str | None]], expected: str) -> None:
    headers = _v1_put_headers()
    sign_oss_v1(
        method="PUT",
        bucket="examplebucket",
        key="nelson",
        query=query,
        headers=headers,
        credentials=AK,
        now=DEC28_EPOCH,
    )
    assert headers["Authorization"] == expected


def test_v1_put_string_to_sign() -> None:
    sts = oss_v1_string_to_sign(
        method="PUT",
        bucket="examplebucket",
        key="nelson",
        query=[],
        headers=_v1_put_headers(),
        date=DEC28,
    )
    assert sts == (
        "PUT\neB5eJF1ptWaXm4bijSPyxw==\ntext/html\n" + DEC28 + "\n"
        "x-oss-date:" + DEC28 + "\nx-oss-meta-author:alice\nx-oss-meta-magic:abracadabra\n"
        "/examplebucket/nelson"
    )


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            [("resourceGroup", None), ("non-resousce", "null")],
            "OSS ak:vkQmfuUDyi1uDi3bKt67oemssIs=",
        ),
        ([("resourceGroup", None), ("acl", None)], "OSS ak:x3E5TgOvl/i7PN618s5mEvpJDYk="),
    ],
)
def test_v1_bucket_get_vectors(query: list[tuple[str, str | None]], expected: str) -> None:
    headers = {"x-oss-date": DEC28, "Date": DEC28}
    sign_oss_v1(
        method="GET",
        bucket="examplebucket",
        key=None,
        query=query,
        headers=headers,
        credentials=AK,
        now=DEC28_EPOCH,
    )
    assert headers["Authorization"] == expected


def test_v1_presign_vector() -> None:
    q = presign_oss_v1(
        method="GET",
        bucket="bucket",
        key="key",
        query=[("versionId", "versionId")],
        headers={},
        credentials=AK,
        expires=1699807420,
    )
    sig = dict(q)["Signature"]
    assert sig is not None
    assert "Signature=" + quote(sig, safe="") == "Signature=dcLTea%2BYh9ApirQ8o8dOPqtvJXQ%3D"


def test_v1_presign_with_token_vector() -> None:
    q = presign_oss_v1(
        method="GET",
        bucket="bucket",
        key="key+123",
        query=[("versionId", "versionId")],
        headers={},
        credentials=Credentials("ak", "sk", "token"),
        expires=1699808204,
    )
    sig = dict(q)["Signature"]
    assert sig is not None
    assert quote(sig, safe="") == "jzKYRrM5y6Br0dRFPaTGOsbrDhY%3D"
    assert ("security-token", "token") in q


def test_v1_session_token_header_is_signed() -> None:
    headers: dict[str, str] = {}
    sign_oss_v1(
        method="GET",
        bucket="b",
        key="k",
        query=[],
        headers=headers,
        credentials=Credentials("ak", "sk", "tok"),
        now=DEC28_EPOCH,
    )
    assert headers["x-oss-security-token"] == "tok"
    sts = oss_v1_string_to_sign(
        method="GET", bucket="b", key="k", query=[], headers=headers, date=headers["Date"]
    )
    assert "x-oss-security-token:tok\n" in sts


# ------------------------------------------------------------------ V4 (section 1.2)

V4_KEY = "1234+-/123/1.txt"
V4_QUERY: list[tuple[str, str | None]] = [
    ("param1", "value1"),
    ("+param1", "value3"),
    ("|param1", "value4"),
    ("+param2", None),
    ("|param2", None),
    ("param2", None),
]


def _v4_headers(content_type: str = "text/plain", sha: bool = True) -> dict[str, str]:
    h = {
        "x-oss-head1": "value",
        "abc": "value",
        "ZAbc": "value",
        "XYZ": "value",
        "content-type": content_type,
    }
    if sha:
        h["x-oss-content-sha256"] = "UNSIGNED-PAYLOAD"
    return h


def test_v4_header_vector_and_intermediates() -> None:
    headers = _v4_headers()
    sign_oss_v4(
        method="PUT",
        bucket="bucket",
        key=V4_KEY,
        query=V4_QUERY,
        headers=headers,
        credentials=AK,
        region="cn-hangzhou",
        now=1702743657,
    )
    assert headers["Authorization"] == (
        "OSS4-HMAC-SHA256 Credential=ak/20231216/cn-hangzhou/oss/aliyun_v4_request,"
        "Signature=e21d18daa82167720f9b1047ae7e7f1ce7cb77a31e8203a7d5f4624fa0284afe"
    )
    canonical = oss_v4_canonical_request(
        method="PUT", bucket="bucket", key=V4_KEY, query=V4_QUERY, headers=headers
    )
    assert canonical == (
        "PUT\n/bucket/1234%2B-/123/1.txt\n"
        "%2Bparam1=value3&%2Bparam2&%7Cparam1=value4&%7Cparam2&param1=value1&param2\n"
        "content-type:text/plain\nx-oss-content-sha256:UNSIGNED-PAYLOAD\n"
        "x-oss-date:20231216T162057Z\nx-oss-head1:value\n\n\nUNSIGNED-PAYLOAD"
    )


def test_v4_header_vector_with_token() -> None:
    headers = _v4_headers()
    sign_oss_v4(
        method="PUT",
        bucket="bucket",
        key=V4_KEY,
        query=V4_QUERY,
        headers=headers,
        credentials=Credentials("ak", "sk", "token"),
        region="cn-hangzhou",
        now=1702784856,
    )
    assert headers["Authorization"] == (
        "OSS4-HMAC-SHA256 Credential=ak/20231217/cn-hangzhou/oss/aliyun_v4_request,"
        "Signature=b94a3f999cf85bcdc00d332fbd3734ba03e48382c36fa4d5af5df817395bd9ea"
    )


@pytest.mark.parametrize(
    "additional", [["ZAbc", "abc"], ["ZAbc", "abc", "x-oss-head1", "x-oss-no-exist"]]
)
def test_v4_header_vector_additional_headers(additional: list[str]) -> None:
    headers = _v4_headers()
    sign_oss_v4(
        method="PUT",
        bucket="bucket",
        key=V4_KEY,
        query=V4_QUERY,
        headers=headers,
        credentials=AK,
        region="cn-hangzhou",
        now=1702747512,
        additional_headers=additional,
    )
    assert headers["Authorization"] == (
        "OSS4-HMAC-SHA256 Credential=ak/20231216/cn-hangzhou/oss/aliyun_v4_request,"
        "AdditionalHeaders=abc;zabc,"
        "Signature=4a4183c187c07c8947db7620deb0a6b38d9fbdd34187b6dbaccb316fa251212f"
    )


@pytest.mark.parametrize(
    ("creds", "now", "expires", "additional", "expected"),
    [
        (
            AK,
            1702781677,
            1702782276,
            [],
            "a39966c61718be0d5b14e668088b3fa07601033f6518ac7b523100014269c0fe",
        ),
        (
            Credentials("ak", "sk", "token"),
            1702785388,
            1702785987,
            [],
            "3817ac9d206cd6dfc90f1c09c00be45005602e55898f26f5ddb06d7892e1f8b5",
        ),
        (
            AK,
            1702783809,
            1702784408,
            ["ZAbc", "abc"],
            "6bd984bfe531afb6db1f7550983a741b103a8c58e5e14f83ea474c2322dfa2b7",
        ),
    ],
)
def test_v4_presign_vectors(
    creds: Credentials, now: int, expires: int, additional: list[str], expected: str
) -> None:
    q = presign_oss_v4(
        method="PUT",
        bucket="bucket",
        key=V4_KEY,
        query=V4_QUERY,
        headers=_v4_headers("application/octet-stream", sha=False),
        credentials=creds,
        region="cn-hangzhou",
        now=now,
        expires=expires - now,
        additional_headers=additional,
    )
    d = dict(q)
    assert d["x-oss-signature"] == expected
    assert d["x-oss-expires"] == str(expires - now)
    if now == 1702781677:
        assert d["x-oss-date"] == "20231217T025437Z"


# ------------------------------------------------------------------ AWS SigV4 (section 1.3)


def test_aws_sigv4_get_range_vector() -> None:
    headers = {"host": "examplebucket.s3.amazonaws.com", "range": "bytes=0-9"}
    sign_aws_v4(
        method="GET",
        path="/test.txt",
        query=[],
        headers=headers,
        credentials=Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        region="us-east-1",
        now=calendar.timegm((2013, 5, 24, 0, 0, 0)),
        payload_hash="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    )
    assert headers["Authorization"].endswith(
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


# ------------------------------------------------------------------ verification


@pytest.mark.parametrize("version", ["v1", "v4"])
def test_check_signature_roundtrip_and_tamper(version: str) -> None:
    headers: dict[str, str] = {"Range": "bytes=0-9"}
    query: list[tuple[str, str | None]] = [("continuation-token", "a b")]
    now = 1_800_000_000.0
    if version == "v1":
        sign_oss_v1(
            method="GET",
            bucket="b",
            key="dir/a b+c",
            query=query,
            headers=headers,
            credentials=AK,
            now=now,
        )
    else:
        sign_oss_v4(
            method="GET",
            bucket="b",
            key="dir/a b+c",
            query=query,
            headers=headers,
            credentials=AK,
            region="r1",
            now=now,
        )
    ok = dict(method="GET", bucket="b", query=query, headers=headers, now=now + 5)
    assert check_oss_signature(key="dir/a b+c", secret_for={"ak": "sk"}, **ok) == "ak"  # type: ignore[arg-type]
    with pytest.raises(SignatureError) as e:
        check_oss_signature(key="dir/other", secret_for={"ak": "sk"}, **ok)  # type: ignore[arg-type]
    assert e.value.code == "SignatureDoesNotMatch"
    with pytest.raises(SignatureError) as e:
        check_oss_signature(key="dir/a b+c", secret_for={"ak": "wrong"}, **ok)  # type: ignore[arg-type]
    assert e.value.code == "SignatureDoesNotMatch"
    with pytest.raises(SignatureError) as e:
        check_oss_signature(key="dir/a b+c", secret_for={"other": "sk"}, **ok)  # type: ignore[arg-type]
    assert e.value.code == "InvalidAccessKeyId"
    with pytest.raises(SignatureError) as e:
        check_oss_signature(
            method="GET",
            bucket="b",
            key="dir/a b+c",
            query=query,
            headers=headers,
            secret_for={"ak": "sk"},
            now=now + 3600,
        )
    assert e.value.code == "RequestTimeTooSkewed"


def test_credentials_repr_hides_secrets() -> None:
    text = repr(Credentials("AKID", "very-secret", "token-secret"))
    assert "AKID" in text
    assert "very-secret" not in text and "token-secret" not in text
