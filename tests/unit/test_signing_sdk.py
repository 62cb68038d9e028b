"""Property tests: our OSS request signers agree with the official V2 Python SDK.

``alibabacloud_oss_v2`` serves only as a test oracle here. For random requests
(object keys with spaces, ``+``, ``%``, ``~``, ``*``, ``'``, CJK, emoji, ``//``,
leading ``/``, ``.`` and ``..`` segments and very long keys; valid bucket names;
query parameters with the same characters, empty values and bare names; random
``x-oss-*``, ``content-*`` and other headers; optional STS tokens; random
signing times, regions and products) these tests prove that:

1. ``sign_oss_v4`` produces exactly the SDK ``SignerV4``'s ``Authorization``,
   ``x-oss-date``, ``Date``, ``x-oss-content-sha256`` and ``x-oss-security-token``,
   with and without ``additional_headers``;
2. ``sign_oss_v1`` produces exactly the SDK ``SignerV1``'s ``Authorization`` and
   ``Date``, signs the same sub-resources as the SDK, and ignores the same
   non-whitelisted query parameters;
3. ``check_oss_signature`` accepts every request our signers produce and rejects
   it once one character of the object key or of the secret changes.

Where the SDK and we differ on purpose, the comments on the strategies and the
tests below say why, and the SDK is given the request as the service receives
it. Defects of ``ossfs.protocol.signing`` found this way (local-time parsing of
x-oss-date, repeated V1 sub-resource names, untrimmed V1 first lines) are kept
at the end of the file as regression tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import formatdate
from urllib.parse import quote, urlencode

import pytest
from alibabacloud_oss_v2.signer import SignerV1, SignerV4
from alibabacloud_oss_v2.types import Credentials as SdkCredentials
from alibabacloud_oss_v2.types import HttpRequest, Signer, SigningContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ossfs.protocol.signing import (
    MAX_CLOCK_SKEW,
    OSS_V1_SUBRESOURCES,
    Credentials,
    SignatureError,
    check_oss_signature,
    sign_oss_v1,
    sign_oss_v4,
)

Query = list[tuple[str, str | None]]

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# V1 sub-resources a read-only client sends. The doc, oss2 and the C++ SDK sign
# all of them.
V1_READ_ONLY_SIGNED = (
    "continuation-token",
    "versionId",
    "response-cache-control",
    "response-content-disposition",
    "response-content-encoding",
    "response-content-language",
    "response-content-type",
    "response-expires",
    "x-oss-process",
)
# Read-only query parameters that V1 never signs.
V1_UNSIGNED = (
    "list-type",
    "prefix",
    "delimiter",
    "max-keys",
    "encoding-type",
    "start-after",
    "fetch-owner",
    "marker",
)
OTHER_SUBRESOURCES = (
    "acl",
    "objectMeta",
    "symlink",
    "location",
    "bucketInfo",
    "stat",
    "uploadId",
    "partNumber",
    "resourceGroup",
    "security-token",
    "x-oss-traffic-limit",
)
# The SDK's static V1 whitelist (``SignerV1._subresource_key_set``) lacks these
# two. The doc, oss2, the C++ and the .NET SDKs sign both as sub-resources; the
# V2 SDK instead relies on each operation declaring extra sub-resources in its
# ``op_metadata["sub-resource"]``, which reaches the signer as
# ``SigningContext.sub_resource``, and its GetObject declares neither, so a V2
# SDK GetObject with ``x-oss-process`` signed with V1 leaves it out. We treat
# that as an SDK gap and hand the SDK these names through ``sub_resource``, the
# SDK's own mechanism for extra sub-resources.
SDK_V1_MISSING_SUBRESOURCES = frozenset({"x-oss-process", "x-oss-traffic-limit"})

# Headers the signers set themselves; a caller never passes them.
SIGNER_HEADERS = frozenset(
    {
        "date",
        "authorization",
        "x-oss-date",
        "x-oss-content-sha256",
        "x-oss-security-token",
        "security-token",
    }
)
HEADER_POOL = (
    "x-oss-meta-author",
    "x-oss-meta-magic",
    "x-oss-head1",
    "x-oss-range-behavior",
    "x-oss-traffic-limit",
    "x-oss-request-payer",
    "content-type",
    "content-md5",
    "range",
    "host",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "cache-control",
    "user-agent",
    "accept-encoding",
    "abc",
    "zabc",
)
# Names offered as additional headers besides the ones present: absent names,
# names signed by default (both signers drop those), and Date, which both
# signers set before choosing the additional headers.
ADDITIONAL_POOL = HEADER_POOL + ("date", "authorization", "x-oss-no-exist", "x-custom")

CEST_ZONE = "CET-1CEST,M3.5.0,M10.5.0/3"  # POSIX rule, needs no tz database
DEC28 = "Wed, 28 Dec 2022 10:27:41 GMT"
DEC28_EPOCH = 1672223261


# --------------------------------------------------------------------------- strategies

_NASTY = " +%~*'!$&()=,;:@?#[]/\\\"<>^`{|}._-"
# CJK, Hangul, Latin with diacritics, emoji (with a skin-tone modifier), a
# combining accent and non-ASCII spaces; sequences of these arise in the texts.
_UNICODE = "中文件日本語한국éßΩж😀🎉👍\U0001f3fd\u0301\u00a0\u3000"
_chars = st.one_of(
    st.sampled_from(" +%~*'/"),  # the usual suspects get a branch of their own
    st.sampled_from(_NASTY + _UNICODE),
    st.characters(categories=("L", "M", "N", "P", "S", "Zs")),
)


def _texts(min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
    return st.text(_chars, min_size=min_size, max_size=max_size)


def _repeated(unit: st.SearchStrategy[str], min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """Long strings, built by repetition so that drawing them is cheap."""
    return st.builds(
        lambda u, n: (u * n)[:n], unit, st.integers(min_value=min_size, max_value=max_size)
    )


_LOWER_DIGITS = "abcdefghijklmnopqrstuvwxyz0123456789"
_ALNUM = _LOWER_DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_segments = st.one_of(st.sampled_from(["", ".", "..", "~", "%", "%2F", "+"]), _texts(1, 10))
_normal_keys = st.builds(
    lambda lead, segs: lead + "/".join(segs),
    st.sampled_from(["", "/", "//", "./", "../"]),
    st.lists(_segments, min_size=1, max_size=6),
)
_long_keys = _repeated(_texts(1, 6), 200, 1023)  # up to the 1023-character limit
_keys = st.one_of(_normal_keys, _long_keys)
# 3..63 of [a-z0-9-], neither starting nor ending with "-".
_buckets = st.builds(
    lambda first, middle, last: first + middle + last,
    st.sampled_from(_LOWER_DIGITS),
    st.text(_LOWER_DIGITS + "-", min_size=1, max_size=61),
    st.sampled_from(_LOWER_DIGITS),
)
_regions = st.one_of(
    st.sampled_from(["cn-hangzhou", "cn-beijing", "us-west-1", "ap-southeast-1", "eu-central-1"]),
    st.builds(
        lambda a, b, n: f"{a}-{b}{n}",
        st.text("abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=2),
        st.text("abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=12),
        st.sampled_from(["", "-1", "-2"]),
    ),
)

_query_names = st.one_of(
    st.sampled_from(V1_READ_ONLY_SIGNED + V1_UNSIGNED + OTHER_SUBRESOURCES), _texts(1, 10)
)
_query_values = st.one_of(st.none(), st.just(""), _texts(0, 16))
_query_pairs = st.tuples(_query_names, _query_values)

_token_names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text(_LOWER_DIGITS + "-", max_size=15),
)
_header_names = st.one_of(
    st.sampled_from(HEADER_POOL), _token_names, _token_names.map(lambda s: "x-oss-meta-" + s)
).filter(lambda n: n not in SIGNER_HEADERS)
_name_cases = st.sampled_from([str.lower, str.upper, str.title])
# Printable ASCII without surrounding whitespace: a value as an HTTP server
# parses it. Padding is drawn separately (see `_requests`).
_header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
    str.strip
)
_sts_tokens = st.one_of(
    st.text(_ALNUM + "+/=", min_size=1, max_size=40),
    _repeated(st.text(_LOWER_DIGITS + "+/=", min_size=1, max_size=8), 100, 1200),
)
_paddings = st.sampled_from(["", " ", "  ", "\t", " \t"])


@dataclass(frozen=True)
class Request:
    """One request to sign, in our calling convention and the SDK's."""

    method: str
    bucket: str | None
    key: str | None
    query: Query
    # What we are asked to send; values may carry surrounding whitespace.
    headers: dict[str, str]
    # The same headers as the service receives them: HTTP strips whitespace
    # around field values, so the SDK is given these.
    received: dict[str, str]
    additional: list[str]
    access_key_id: str
    secret: str
    token: str | None
    region: str
    product: str
    now: int

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.access_key_id, self.secret, self.token)


@st.composite
def _requests(draw: st.DrawFn, *, version: str, need_key: bool = False) -> Request:
    kind = "object" if need_key else draw(st.sampled_from(["object"] * 3 + ["bucket", "service"]))
    bucket = None if kind == "service" else draw(_buckets)
    key = draw(_keys.map(lambda k: k or "k") if need_key else _keys) if kind == "object" else None
    query = draw(st.lists(_query_pairs, max_size=6))
    now = draw(st.integers(min_value=946_684_800, max_value=4_102_444_799))  # 2000..2099

    headers: dict[str, str] = {}
    received: dict[str, str] = {}
    names = draw(st.lists(_header_names, max_size=8, unique_by=str.lower))
    for name in names:
        shown = draw(_name_cases)(name)
        value = draw(_header_values)
        # Header values arrive trimmed at the service; both signers sign them so.
        left, right = draw(_paddings), draw(_paddings)
        headers[shown] = left + value + right
        received[shown] = value
    if version == "v1" and draw(st.booleans()):
        # x-oss-date wins over Date in V1; it may arrive padded like any value.
        stamp = formatdate(now, usegmt=True)
        headers["x-oss-date"] = draw(_paddings) + stamp + draw(_paddings)
        received["x-oss-date"] = stamp

    candidates = [*names, *ADDITIONAL_POOL]
    additional = [
        draw(_name_cases)(n) for n in draw(st.lists(st.sampled_from(candidates), max_size=5))
    ]
    token = draw(st.none() | _sts_tokens)
    return Request(
        method=draw(st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE"])),
        bucket=bucket,
        key=key,
        query=query,
        headers=headers,
        received=received,
        additional=additional,
        access_key_id=draw(st.text(_ALNUM, min_size=1, max_size=32)),
        secret=draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)),
        token=token,
        region=draw(_regions),
        product=draw(st.sampled_from(["oss", "oss-cloudbox"])),
        now=now,
    )


# --------------------------------------------------------------------------- signing helpers


def _sdk_sign(
    signer: Signer,
    req: Request,
    *,
    headers: Mapping[str, str],
    token: str | None,
    additional: Iterable[str] | None = None,
    sub_resource: Iterable[str] = (),
) -> MutableMapping[str, str]:
    """Sign *req* with an SDK signer; return the SDK request's headers.

    The URL is built the way the SDK client does it
    (``_client.build_request_context``): the key quoted with ``quote``, the
    query with ``urlencode(params, quote_via=quote)``. Bare names go in as
    empty values, which both SDK signers write as a bare name.
    """
    url = "https://oss-cn-hangzhou.aliyuncs.com/" + quote(req.key or "")
    if req.query:
        url += "?" + urlencode([(k, v or "") for k, v in req.query], quote_via=quote)
    request = HttpRequest(req.method, url, headers=dict(headers))
    ctx = SigningContext(
        product=req.product,
        region=req.region,
        bucket=req.bucket,
        key=req.key,
        request=request,
        credentials=SdkCredentials(req.access_key_id, req.secret, token),
        signing_time=datetime.fromtimestamp(req.now, tz=UTC),
        additional_headers=set(additional) if additional is not None else None,
    )
    ctx.sub_resource = list(sub_resource)
    signer.sign(ctx)
    signed: MutableMapping[str, str] = request.headers
    return signed


def _our_v4(req: Request, additional: Sequence[str] = ()) -> dict[str, str]:
    headers = dict(req.headers)
    sign_oss_v4(
        method=req.method,
        bucket=req.bucket,
        key=req.key,
        query=req.query,
        headers=headers,
        credentials=req.credentials,
        region=req.region,
        now=req.now,
        additional_headers=additional,
        product=req.product,
    )
    return headers


def _our_v1(req: Request, query: Query | None = None) -> dict[str, str]:
    headers = dict(req.headers)
    sign_oss_v1(
        method=req.method,
        bucket=req.bucket,
        key=req.key,
        query=req.query if query is None else query,
        headers=headers,
        credentials=req.credentials,
        now=req.now,
    )
    return headers


def _sdk_v1(req: Request, query: Query | None = None) -> MutableMapping[str, str]:
    # The SDK's V1 header signer sends an STS token as a header named
    # `security-token`, which is not an x-oss-* header and so is not signed
    # (reference doc, section 1.1). We follow the C++ SDK, oss2 and the doc and
    # send `x-oss-security-token`, which is signed. To compare the signatures
    # of the request we actually send, the SDK gets no token in its
    # credentials and our header among the request headers instead.
    headers = dict(req.received)
    if req.token:
        headers["x-oss-security-token"] = req.token
    if query is not None:
        req = replace(req, query=query)
    return _sdk_sign(
        SignerV1(), req, headers=headers, token=None, sub_resource=SDK_V1_MISSING_SUBRESOURCES
    )


def _received_additional(req: Request) -> list[str]:
    """The additional headers on which both signers agree.

    For a listed header that is present with an empty value the SDKs differ:
    the V2 Python SDK (and the Go SDK) drop it, while the C++ SDK
    (``getCommonAdditionalHeaders``) and the reference doc drop only absent
    names, and so do we. The verifier reads the list from the Authorization
    header (``AdditionalHeaders=``), so either choice gives a signature that
    verifies; `test_v4_empty_additional_header_is_signed` pins ours.
    """
    received = {k.lower(): v for k, v in req.received.items()}
    return [a for a in req.additional if received.get(a.lower()) != ""]


@contextmanager
def _local_timezone(zone: str) -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def _change_one_char(text: str, index: int) -> str:
    i = index % len(text)
    return text[:i] + ("b" if text[i] == "a" else "a") + text[i + 1 :]


# --------------------------------------------------------------------------- 1. V4


@PROPERTY_SETTINGS
@given(req=_requests(version="v4"))
def test_v4_header_signing_matches_sdk(req: Request) -> None:
    # Our V4 signer trims header values like the C++ SDK and the doc
    # ("lower(name):trim(value)"); the SDK signs values verbatim (and its HTTP
    # layer, requests, refuses leading whitespace anyway). So our signature of
    # the padded headers must equal the SDK's of the headers as received.
    ours = _our_v4(req)
    sdk = _sdk_sign(SignerV4(), req, headers=req.received, token=req.token)
    assert ours["Authorization"] == sdk["Authorization"]
    for name in ("x-oss-date", "Date", "x-oss-content-sha256"):
        assert ours[name] == sdk[name]
    if req.token:
        assert ours["x-oss-security-token"] == sdk["x-oss-security-token"] == req.token
    else:
        assert "x-oss-security-token" not in ours
        assert "x-oss-security-token" not in sdk


@PROPERTY_SETTINGS
@given(req=_requests(version="v4"))
def test_v4_additional_headers_match_sdk(req: Request) -> None:
    additional = _received_additional(req)
    ours = _our_v4(req, additional)
    sdk = _sdk_sign(SignerV4(), req, headers=req.received, token=req.token, additional=additional)
    assert ours["Authorization"] == sdk["Authorization"]
    assert ours["x-oss-date"] == sdk["x-oss-date"]
    if req.token:
        assert ours["x-oss-security-token"] == sdk["x-oss-security-token"]


def test_v4_empty_additional_header_is_signed() -> None:
    # See `_received_additional`: the C++ SDK's behaviour, not the V2 SDK's.
    headers = {"abc": "", "x-oss-meta-a": "1"}
    sign_oss_v4(
        method="GET",
        bucket="b",
        key="k",
        query=[],
        headers=headers,
        credentials=Credentials("ak", "sk"),
        region="cn-hangzhou",
        now=DEC28_EPOCH,
        additional_headers=["ABC"],
    )
    assert ",AdditionalHeaders=abc,Signature=" in headers["Authorization"]
    assert (
        check_oss_signature(
            method="GET",
            bucket="b",
            key="k",
            query=[],
            headers=headers,
            secret_for={"ak": "sk"},
            now=DEC28_EPOCH,
        )
        == "ak"
    )


# --------------------------------------------------------------------------- 2. V1


@PROPERTY_SETTINGS
@given(req=_requests(version="v1"))
def test_v1_header_signing_matches_sdk(req: Request) -> None:
    ours = _our_v1(req)
    sdk = _sdk_v1(req)
    assert ours["Authorization"] == sdk["Authorization"]
    assert ours["Date"] == sdk["Date"]
    if req.token:
        assert ours["x-oss-security-token"] == req.token


@PROPERTY_SETTINGS
@given(
    req=_requests(version="v1"),
    noise=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(V1_UNSIGNED), _texts(1, 10)).filter(
                lambda n: n not in OSS_V1_SUBRESOURCES
            ),
            _query_values,
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_v1_unsigned_query_parameters_are_ignored(req: Request, noise: Query) -> None:
    noisy = req.query + noise
    ours = _our_v1(req, noisy)
    assert ours["Authorization"] == _our_v1(req)["Authorization"]
    assert ours["Authorization"] == _sdk_v1(req, noisy)["Authorization"]


def test_v1_subresource_whitelist_agrees_with_sdk() -> None:
    sdk = SignerV1._subresource_key_set
    for name in V1_READ_ONLY_SIGNED:
        assert name in OSS_V1_SUBRESOURCES
        if name not in SDK_V1_MISSING_SUBRESOURCES:
            assert name in sdk
    assert sdk <= OSS_V1_SUBRESOURCES
    # The only names we sign and the SDK's static list does not are the two
    # documented at SDK_V1_MISSING_SUBRESOURCES.
    assert OSS_V1_SUBRESOURCES - sdk <= SDK_V1_MISSING_SUBRESOURCES
    for name in V1_UNSIGNED:
        assert name not in OSS_V1_SUBRESOURCES
        assert name not in sdk


# --------------------------------------------------------------------------- 3. round trip


@pytest.mark.parametrize("version", ["v1", "v4"])
@PROPERTY_SETTINGS
@given(data=st.data())
@pytest.mark.slow
def test_check_signature_round_trip(version: str, data: st.DataObject) -> None:
    req = data.draw(_requests(version=version, need_key=True))
    skew = data.draw(st.integers(min_value=-MAX_CLOCK_SKEW, max_value=MAX_CLOCK_SKEW))
    key_index = data.draw(st.integers(min_value=0))
    secret_index = data.draw(st.integers(min_value=0))
    assert req.key
    if version == "v1":
        headers = _our_v1(req)
        region = None
    else:
        headers = _our_v4(req, req.additional)
        region = req.region

    def check(key: str, secret: str) -> str:
        return check_oss_signature(
            method=req.method,
            bucket=req.bucket,
            key=key,
            query=req.query,
            headers=headers,
            secret_for={req.access_key_id: secret},
            now=req.now + skew,
            region=region,
        )

    # The verifier must not depend on the machine's time zone (a regression test
    # below checks a DST zone); pin one here so a failure is reproducible.
    with _local_timezone("UTC"):
        assert check(req.key, req.secret) == req.access_key_id
        for key, secret in (
            (_change_one_char(req.key, key_index), req.secret),
            (req.key, _change_one_char(req.secret, secret_index)),
        ):
            with pytest.raises(SignatureError) as exc:
                check(key, secret)
            assert exc.value.code == "SignatureDoesNotMatch"


# --------------------------------------------------------------------------- regressions


def test_v4_check_signature_does_not_depend_on_local_dst() -> None:
    now = 1_720_000_000  # 2024-07-03, summer time in Europe
    headers: dict[str, str] = {}
    sign_oss_v4(
        method="GET",
        bucket="b",
        key="k",
        query=[],
        headers=headers,
        credentials=Credentials("ak", "sk"),
        region="cn-hangzhou",
        now=now,
    )
    with _local_timezone(CEST_ZONE):
        assert (
            check_oss_signature(
                method="GET",
                bucket="b",
                key="k",
                query=[],
                headers=headers,
                secret_for={"ak": "sk"},
                now=now,
            )
            == "ak"
        )


def test_v1_repeated_subresource_matches_sdk() -> None:
    req = Request(
        method="GET",
        bucket="b",
        key="k",
        query=[("versionId", None), ("versionId", "v2")],
        headers={},
        received={},
        additional=[],
        access_key_id="ak",
        secret="sk",
        token=None,
        region="cn-hangzhou",
        product="oss",
        now=DEC28_EPOCH,
    )
    assert _our_v1(req)["Authorization"] == _sdk_v1(req)["Authorization"]


@pytest.mark.parametrize(
    "padded",
    [
        {"Content-Type": " text/plain "},
        {"Content-MD5": "eB5eJF1ptWaXm4bijSPyxw==\t"},
        {"x-oss-date": f" {DEC28}"},
    ],
)
def test_v1_first_lines_are_trimmed(padded: dict[str, str]) -> None:
    req = Request(
        method="PUT",
        bucket="b",
        key="k",
        query=[],
        headers=padded,
        received={k: v.strip() for k, v in padded.items()},
        additional=[],
        access_key_id="ak",
        secret="sk",
        token=None,
        region="cn-hangzhou",
        product="oss",
        now=DEC28_EPOCH,
    )
    assert _our_v1(req)["Authorization"] == _sdk_v1(req)["Authorization"]
