"""Request signing: OSS Signature V1, OSS Signature V4 and AWS SigV4.

Sans-IO: no network, no clock. Every function takes the signing time as a
parameter (seconds since the epoch), so the fixed vectors in the tests pin the
exact output. The module also checks signatures, which the OSS-dialect test
server uses to refuse badly signed requests the way the service does.

Inputs are plain values: the HTTP method, the bucket and the *decoded* object
key, the query as a list of ``(name, value)`` pairs (``None`` for a bare
``name``) and a header dict. Signing functions add their headers (``Date``,
``x-oss-date``, ``Authorization`` ...) to that dict in place.

Must not import: trio, httpx, anything that does I/O.
"""

from __future__ import annotations

import base64
import calendar
import functools
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import quote

__all__ = [
    "Credentials",
    "Query",
    "SignatureError",
    "UNSIGNED_PAYLOAD",
    "EMPTY_SHA256",
    "oss_v1_string_to_sign",
    "sign_oss_v1",
    "oss_v4_canonical_request",
    "sign_oss_v4",
    "sign_aws_v4",
    "check_oss_signature",
]

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# Sub-resources that OSS V1 puts into the canonicalized resource. Anything else
# in the query (list-type, prefix, max-keys ...) is not signed.
OSS_V1_SUBRESOURCES = frozenset(
    {
        "acl",
        "append",
        "bucketInfo",
        "callback",
        "callback-var",
        "cloudboxes",
        "continuation-token",
        "delete",
        "location",
        "objectMeta",
        "partNumber",
        "position",
        "regionList",
        "resourceGroup",
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
        "response-content-language",
        "response-content-type",
        "response-expires",
        "restore",
        "security-token",
        "sequential",
        "stat",
        "symlink",
        "tagging",
        "uploadId",
        "uploads",
        "versionId",
        "versioning",
        "versions",
        "x-oss-process",
        "x-oss-traffic-limit",
    }
)

# Allowed difference between the signing time and the verifier's clock.
MAX_CLOCK_SKEW = 15 * 60

Query = Sequence[tuple[str, str | None]]


@dataclass(frozen=True, slots=True)
class Credentials:
    """An access key pair with an optional STS session token.

    The secret and the token never appear in ``repr()``, so a credentials
    object that ends up in a log line or a traceback leaks nothing.
    """

    access_key_id: str
    access_key_secret: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


class SignatureError(Exception):
    """A request signature could not be verified.

    :code: the OSS error code a server would answer with.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- helpers


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@functools.lru_cache(maxsize=16)
def _signing_key(
    prefix: str, secret: str, date: str, region: str, service: str, terminator: str
) -> bytes:
    """The V4 signing key of one day (four HMACs): the same for every request of
    that day, so it is derived once (a small object's GET spent a quarter of its
    signing time on it)."""
    k = _hmac_sha256((prefix + secret).encode(), date)
    k = _hmac_sha256(k, region)
    k = _hmac_sha256(k, service)
    return _hmac_sha256(k, terminator)


def _hmac_sha256(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _http_date(now: float) -> str:
    return formatdate(now, usegmt=True)


def _iso8601(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def _resource_path(bucket: str | None, key: str | None) -> str:
    """`/bucket/key`, `/bucket/` for bucket requests, `/` with no bucket."""
    if not bucket:
        return "/"
    return f"/{bucket}/{key or ''}"


# --------------------------------------------------------------------------- OSS V1


def oss_v1_string_to_sign(
    *,
    method: str,
    bucket: str | None,
    key: str | None,
    query: Query,
    headers: Mapping[str, str],
    date: str,
) -> str:
    """The V1 string to sign; *date* is the Date header or the Expires value."""
    h = _lower_headers(headers)
    oss_headers = sorted((k, v.strip()) for k, v in h.items() if k.startswith("x-oss-"))
    canon_headers = "".join(f"{k}:{v}\n" for k, v in oss_headers)
    # A bare name sorts like an empty value (a name may also repeat).
    subresources = sorted((k, v or "") for k, v in query if k in OSS_V1_SUBRESOURCES)
    resource = _resource_path(bucket, key)
    if subresources:
        resource += "?" + "&".join(k if not v else f"{k}={v}" for k, v in subresources)
    return (
        "\n".join(
            [
                method.upper(),
                h.get("content-md5", "").strip(),
                h.get("content-type", "").strip(),
                date.strip(),
            ]
        )
        + "\n"
        + canon_headers
        + resource
    )


def _v1_signature(secret: str, string_to_sign: str) -> str:
    digest = hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def sign_oss_v1(
    *,
    method: str,
    bucket: str | None,
    key: str | None,
    query: Query,
    headers: dict[str, str],
    credentials: Credentials,
    now: float,
) -> None:
    """Sign a request with OSS V1 in the Authorization header (in place)."""
    if not any(k.lower() == "date" for k in headers):
        headers["Date"] = _http_date(now)
    if credentials.session_token:
        headers["x-oss-security-token"] = credentials.session_token
    h = _lower_headers(headers)
    date = h.get("x-oss-date") or h["date"]
    sts = oss_v1_string_to_sign(
        method=method, bucket=bucket, key=key, query=query, headers=headers, date=date
    )
    signature = _v1_signature(credentials.access_key_secret, sts)
    headers["Authorization"] = f"OSS {credentials.access_key_id}:{signature}"


# --------------------------------------------------------------------------- OSS V4


def _v4_canonical_query(query: Iterable[tuple[str, str | None]]) -> str:
    items = sorted((quote(k, safe=""), quote(v or "", safe="")) for k, v in query)
    return "&".join(f"{k}={v}" if v else k for k, v in items)


def _oss_v4_signed_by_default(name: str) -> bool:
    return name.startswith("x-oss-") or name in ("content-type", "content-md5")


def _oss_v4_additional(headers: Mapping[str, str], additional: Iterable[str]) -> list[str]:
    h = _lower_headers(headers)
    names = {a.lower() for a in additional}
    return sorted(n for n in names if n in h and not _oss_v4_signed_by_default(n))


def oss_v4_canonical_request(
    *,
    method: str,
    bucket: str | None,
    key: str | None,
    query: Query,
    headers: Mapping[str, str],
    additional_headers: Iterable[str] = (),
) -> str:
    """The OSS V4 canonical request (the payload hash is always UNSIGNED-PAYLOAD)."""
    h = _lower_headers(headers)
    extra = _oss_v4_additional(headers, additional_headers)
    signed = sorted(
        (k, v.strip()) for k, v in h.items() if _oss_v4_signed_by_default(k) or k in extra
    )
    canon_headers = "".join(f"{k}:{v}\n" for k, v in signed)
    uri = quote(_resource_path(bucket, key), safe="/")
    return "\n".join(
        [
            method.upper(),
            uri,
            _v4_canonical_query(query),
            canon_headers,
            ";".join(extra),
            UNSIGNED_PAYLOAD,
        ]
    )


def _oss_v4_scope(date: str, region: str, product: str) -> str:
    return f"{date}/{region}/{product}/aliyun_v4_request"


def _oss_v4_signature(
    *, secret: str, datetime_iso: str, region: str, product: str, canonical_request: str
) -> str:
    date = datetime_iso[:8]
    scope = _oss_v4_scope(date, region, product)
    string_to_sign = "\n".join(
        [
            "OSS4-HMAC-SHA256",
            datetime_iso,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    k = _signing_key("aliyun_v4", secret, date, region, product, "aliyun_v4_request")
    return hmac.new(k, string_to_sign.encode(), hashlib.sha256).hexdigest()


def sign_oss_v4(
    *,
    method: str,
    bucket: str | None,
    key: str | None,
    query: Query,
    headers: dict[str, str],
    credentials: Credentials,
    region: str,
    now: float,
    additional_headers: Iterable[str] = (),
    product: str = "oss",
) -> None:
    """Sign a request with OSS V4 (OSS4-HMAC-SHA256) in the Authorization header."""
    iso = _iso8601(now)
    headers["x-oss-date"] = iso
    headers["Date"] = _http_date(now)
    headers["x-oss-content-sha256"] = UNSIGNED_PAYLOAD
    if credentials.session_token:
        headers["x-oss-security-token"] = credentials.session_token
    extra = _oss_v4_additional(headers, additional_headers)
    canonical = oss_v4_canonical_request(
        method=method,
        bucket=bucket,
        key=key,
        query=query,
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
    scope = _oss_v4_scope(iso[:8], region, product)
    auth = f"OSS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope}"
    if extra:
        auth += ",AdditionalHeaders=" + ";".join(extra)
    headers["Authorization"] = auth + f",Signature={signature}"


# --------------------------------------------------------------------------- AWS SigV4


def _aws_canonical_query(query: Iterable[tuple[str, str | None]]) -> str:
    items = sorted((quote(k, safe="-_.~"), quote(v or "", safe="-_.~")) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in items)


def sign_aws_v4(
    *,
    method: str,
    path: str,
    query: Query,
    headers: dict[str, str],
    credentials: Credentials,
    region: str,
    now: float,
    service: str = "s3",
    payload_hash: str = UNSIGNED_PAYLOAD,
) -> None:
    """Sign an S3 request with AWS SigV4 in the Authorization header.

    *path* is the decoded request path (``/bucket/key`` for path style); it is
    URI-encoded once, as S3 expects. Every header in *headers* is signed, so
    pass the ones the request will carry (``host`` among them).
    """
    iso = _iso8601(now)
    headers["x-amz-date"] = iso
    headers["x-amz-content-sha256"] = payload_hash
    if credentials.session_token:
        headers["x-amz-security-token"] = credentials.session_token
    h = sorted((k.lower(), " ".join(v.strip().split())) for k, v in headers.items())
    signed_names = ";".join(k for k, _ in h)
    canonical = "\n".join(
        [
            method.upper(),
            quote(path, safe="/-_.~"),
            _aws_canonical_query(query),
            "".join(f"{k}:{v}\n" for k, v in h),
            signed_names,
            payload_hash,
        ]
    )
    scope = f"{iso[:8]}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", iso, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    k = _signing_key(
        "AWS4", credentials.access_key_secret, iso[:8], region, service, "aws4_request"
    )
    signature = hmac.new(k, string_to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed_names}, Signature={signature}"
    )


# --------------------------------------------------------------------------- verification


def _parse_v4_authorization(value: str) -> dict[str, str]:
    body = value[len("OSS4-HMAC-SHA256") :].strip()
    fields: dict[str, str] = {}
    for part in body.split(","):
        name, sep, val = part.strip().partition("=")
        if not sep:
            raise SignatureError("InvalidArgument", "malformed Authorization header")
        fields[name] = val
    return fields


def check_oss_signature(
    *,
    method: str,
    bucket: str | None,
    key: str | None,
    query: Query,
    headers: Mapping[str, str],
    secret_for: Mapping[str, str],
    now: float,
    region: str | None = None,
) -> str:
    """Verify an OSS V1 or V4 header signature; return the access key id.

    *secret_for* maps access key ids to secrets. Raises `SignatureError` with
    the code OSS would answer (``InvalidAccessKeyId``,
    ``SignatureDoesNotMatch``, ``RequestTimeTooSkewed`` ...). Used by the test
    server; a client never needs it.
    """
    request = _SignedRequest(method, bucket, key, query, headers, _lower_headers(headers))
    auth = request.lower.get("authorization", "")
    if auth.startswith("OSS4-HMAC-SHA256"):
        ak, signature, expected = _check_v4(request, auth, secret_for, now, region)
    elif auth.startswith("OSS "):
        ak, signature, expected = _check_v1(request, auth, secret_for, now)
    elif not auth:
        raise SignatureError(
            "AccessDenied", "You have no right to access this object because of bucket acl."
        )
    else:
        raise SignatureError("InvalidArgument", "unsupported Authorization scheme")
    if not hmac.compare_digest(expected, signature):
        raise SignatureError(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )
    return ak


@dataclass(frozen=True, slots=True)
class _SignedRequest:
    """What a signature covers, as the server received it."""

    method: str
    bucket: str | None
    key: str | None
    query: Query
    headers: Mapping[str, str]
    lower: dict[str, str]  # the headers by lower-case name


def _known_key(ak: str, secret_for: Mapping[str, str]) -> str:
    """The secret of access key *ak*; InvalidAccessKeyId when there is none."""
    if ak not in secret_for:
        raise SignatureError(
            "InvalidAccessKeyId",
            "The OSS Access Key Id you provided does not exist in our records.",
        )
    return secret_for[ak]


def _check_skew(now: float, signed_at: float) -> None:
    if abs(now - signed_at) > MAX_CLOCK_SKEW:
        raise SignatureError(
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
        )


def _check_v4(
    request: _SignedRequest,
    auth: str,
    secret_for: Mapping[str, str],
    now: float,
    region: str | None,
) -> tuple[str, str, str]:
    """(access key id, signature given, signature expected) of a V4 Authorization."""
    fields = _parse_v4_authorization(auth)
    try:
        ak, date, sig_region, product, terminator = fields["Credential"].split("/")
        signature = fields["Signature"]
    except (KeyError, ValueError) as e:
        raise SignatureError("InvalidArgument", "malformed V4 credential") from e
    if terminator != "aliyun_v4_request":
        raise SignatureError("InvalidArgument", "malformed V4 credential scope")
    secret = _known_key(ak, secret_for)
    if region is not None and sig_region != region:
        raise SignatureError(
            "SignatureDoesNotMatch",
            f"region in credential scope is {sig_region!r}, expected {region!r}",
        )
    iso = request.lower.get("x-oss-date", "")
    try:
        signed_at = calendar.timegm(time.strptime(iso, "%Y%m%dT%H%M%SZ"))
    except ValueError as e:
        raise SignatureError("AccessDenied", "missing or bad x-oss-date") from e
    if iso[:8] != date:
        raise SignatureError("SignatureDoesNotMatch", "date in scope differs from x-oss-date")
    _check_skew(now, signed_at)
    extra = [n for n in fields.get("AdditionalHeaders", "").split(";") if n]
    canonical = oss_v4_canonical_request(
        method=request.method,
        bucket=request.bucket,
        key=request.key,
        query=request.query,
        headers=request.headers,
        additional_headers=extra,
    )
    expected = _oss_v4_signature(
        secret=secret,
        datetime_iso=iso,
        region=sig_region,
        product=product,
        canonical_request=canonical,
    )
    return ak, signature, expected


def _check_v1(
    request: _SignedRequest, auth: str, secret_for: Mapping[str, str], now: float
) -> tuple[str, str, str]:
    """(access key id, signature given, signature expected) of a V1 Authorization."""
    ak, _, signature = auth[4:].partition(":")
    secret = _known_key(ak, secret_for)
    date = request.lower.get("x-oss-date") or request.lower.get("date", "")
    try:
        signed_at = int(parsedate_to_datetime(date).timestamp())
    except (TypeError, ValueError) as e:
        raise SignatureError("AccessDenied", "missing or bad Date header") from e
    _check_skew(now, signed_at)
    sts = oss_v1_string_to_sign(
        method=request.method,
        bucket=request.bucket,
        key=request.key,
        query=request.query,
        headers=request.headers,
        date=date,
    )
    return ak, signature, _v1_signature(secret, sts)
