"""Build signed HEAD, ranged GET and ListObjectsV2 requests; read their answers.

Two dialects share one shape: ``oss`` (OSS V1 or V4 signatures, ``x-oss-*``
headers, errors of HEAD in ``x-oss-err``) and ``s3`` (AWS SigV4). Addressing
is path style (``http://host/bucket/key``) for IP and localhost endpoints, or
when asked, and virtual-host style (``http://bucket.host/key``) otherwise.

Sans-IO: a request is a plain `HttpRequest`; an answer is read from its status,
headers and body. The signing time is a parameter.

Must not import: trio, httpx.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Literal
from urllib.parse import quote, urlsplit

from ossfs.errors import ServiceError, service_error
from ossfs.model import ObjectMeta
from ossfs.protocol import signing
from ossfs.protocol.xml import XmlError, parse_error, strip_etag

__all__ = [
    "Dialect",
    "Endpoint",
    "HttpRequest",
    "build_head",
    "build_get",
    "build_list",
    "meta_from_head",
    "error_from_response",
    "check_content_range",
    "MIN_TRAFFIC_LIMIT",
    "MAX_TRAFFIC_LIMIT",
    "STATUS_CODES",
]

Dialect = Literal["oss", "s3"]

# x-oss-traffic-limit bounds in bit/s (100 KB/s to 100 MB/s); outside them OSS
# answers 400 InvalidArgument.
MIN_TRAFFIC_LIMIT = 819_200
MAX_TRAFFIC_LIMIT = 838_860_800


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to talk to a store.

    :url: ``scheme://host[:port]`` of the service.
    :dialect: ``oss`` or ``s3``.
    :region: signing region (``cn-hangzhou``, ``us-east-1``).
    :signature_version: ``v4`` or ``v1`` (OSS only).
    :path_style: None chooses: path style for IP/localhost hosts.
    :credentials: None for anonymous access to a public bucket.
    """

    url: str
    dialect: Dialect = "oss"
    region: str = "cn-hangzhou"
    signature_version: Literal["v1", "v4"] = "v4"
    path_style: bool | None = None
    credentials: signing.Credentials | None = field(default=None, repr=False)

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme or "https"

    @property
    def netloc(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def uses_path_style(self) -> bool:
        if self.path_style is not None:
            return self.path_style
        host = urlsplit(self.url).hostname or ""
        if host == "localhost" or host.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str]


def _quote_path(path: str) -> str:
    """Percent-encode a key path; keep dot segments from being collapsed by URL libraries."""
    encoded = quote(path, safe="/-_.~")
    return "/".join("%2E" * len(s) if s in (".", "..") else s for s in encoded.split("/"))


def _query_string(query: list[tuple[str, str | None]]) -> str:
    return "&".join(
        quote(k, safe="-_.~") if v is None else f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
        for k, v in query
    )


def _build(
    ep: Endpoint,
    method: str,
    bucket: str,
    key: str | None,
    query: list[tuple[str, str | None]],
    headers: dict[str, str],
    now: float,
) -> HttpRequest:
    if ep.uses_path_style:
        host = ep.netloc
        path = f"/{bucket}/{key or ''}"
    else:
        host = f"{bucket}.{ep.netloc}"
        path = f"/{key or ''}"
    url = f"{ep.scheme}://{host}{_quote_path(path)}"
    if query:
        url += "?" + _query_string(query)
    creds = ep.credentials
    if creds is not None:
        if ep.dialect == "s3":
            headers["host"] = host
            signing.sign_aws_v4(
                method=method,
                path=path,
                query=query,
                headers=headers,
                credentials=creds,
                region=ep.region,
                now=now,
            )
        elif ep.signature_version == "v1":
            signing.sign_oss_v1(
                method=method,
                bucket=bucket,
                key=key,
                query=query,
                headers=headers,
                credentials=creds,
                now=now,
            )
        else:
            signing.sign_oss_v4(
                method=method,
                bucket=bucket,
                key=key,
                query=query,
                headers=headers,
                credentials=creds,
                region=ep.region,
                now=now,
            )
    return HttpRequest(method, url, headers)


def build_head(ep: Endpoint, bucket: str, key: str, *, now: float) -> HttpRequest:
    return _build(ep, "HEAD", bucket, key, [], {}, now)


def build_get(
    ep: Endpoint,
    bucket: str,
    key: str,
    *,
    start: int,
    end: int,
    etag: str | None,
    now: float,
    traffic_limit: int | None = None,
) -> HttpRequest:
    """A GET of object bytes ``[start, end)`` pinned to *etag* with If-Match.

    *traffic_limit* is bits per second for ``x-oss-traffic-limit`` (OSS only;
    clamped to the service's accepted range).
    """
    if end <= start:
        raise ValueError("empty range")
    headers = {"Range": f"bytes={start}-{end - 1}"}
    if etag:
        headers["If-Match"] = f'"{etag}"'
    if ep.dialect == "oss":
        headers["x-oss-range-behavior"] = "standard"
        if traffic_limit:
            bits = max(MIN_TRAFFIC_LIMIT, min(MAX_TRAFFIC_LIMIT, traffic_limit))
            headers["x-oss-traffic-limit"] = str(bits)
    return _build(ep, "GET", bucket, key, [], headers, now)


def build_list(
    ep: Endpoint,
    bucket: str,
    *,
    prefix: str = "",
    delimiter: str = "",
    continuation_token: str | None = None,
    start_after: str | None = None,
    max_keys: int = 1000,
    now: float,
) -> HttpRequest:
    query: list[tuple[str, str | None]] = [("list-type", "2")]
    if continuation_token:
        query.append(("continuation-token", continuation_token))
    if delimiter:
        query.append(("delimiter", delimiter))
    query.append(("encoding-type", "url"))
    query.append(("max-keys", str(max_keys)))
    if prefix:
        query.append(("prefix", prefix))
    if start_after:
        query.append(("start-after", start_after))
    return _build(ep, "GET", bucket, None, query, {}, now)


# ------------------------------------------------------------------ answers


def _header(headers: Mapping[str, str], name: str) -> str | None:
    v = headers.get(name)
    if v is None:
        lname = name.lower()
        for k, val in headers.items():
            if k.lower() == lname:
                return val
    return v


def meta_from_head(key: str, headers: Mapping[str, str]) -> ObjectMeta:
    """Object metadata from the headers of a successful HEAD (or 200/206 GET)."""
    length = _header(headers, "content-length")
    content_range = _header(headers, "content-range")
    size = int(length or 0)
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            size = int(total)
    lm = _header(headers, "last-modified")
    try:
        mtime = parsedate_to_datetime(lm).timestamp() if lm else 0.0
    except (TypeError, ValueError):
        mtime = 0.0
    crc = _header(headers, "x-oss-hash-crc64ecma")
    return ObjectMeta(
        key=key,
        size=size,
        etag=strip_etag(_header(headers, "etag") or ""),
        mtime=mtime,
        crc64=int(crc) if crc and crc.isdigit() else None,
        object_type=_header(headers, "x-oss-object-type"),
        storage_class=_header(headers, "x-oss-storage-class")
        or _header(headers, "x-amz-storage-class"),
        encryption="SSE-C"
        if _header(headers, "x-amz-server-side-encryption-customer-algorithm")
        else _header(headers, "x-amz-server-side-encryption")
        or _header(headers, "x-oss-server-side-encryption"),
    )


# The error code to assume for a status when an answer carries no error document.
STATUS_CODES: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "AccessDenied",
    404: "NoSuchKey",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    409: "Conflict",
    412: "PreconditionFailed",
    416: "InvalidRange",
    429: "TooManyRequests",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


def error_from_response(
    status: int, headers: Mapping[str, str], body: bytes, *, resource: str | None = None
) -> ServiceError:
    """The `ServiceError` for a non-2xx answer.

    The error document comes from the body, or for HEAD (which has no body)
    from OSS's base64 ``x-oss-err`` header; failing both, from the status.
    """
    request_id = _header(headers, "x-oss-request-id") or _header(headers, "x-amz-request-id")
    doc = None
    for source in (body, _decode_x_oss_err(_header(headers, "x-oss-err"))):
        if source:
            try:
                doc = parse_error(source)
                break
            except XmlError:
                continue
    if doc is not None:
        code, message = doc.code, doc.message
        request_id = doc.request_id or request_id
        ec = doc.ec or _header(headers, "x-oss-ec")
    else:
        code = STATUS_CODES.get(status, f"HTTP{status}")
        message = ""
        ec = _header(headers, "x-oss-ec")
        if status == 404 and resource is not None and resource.endswith("/"):
            code = "NoSuchBucket"
    return service_error(status, code, message, request_id, ec=ec, resource=resource)


def _decode_x_oss_err(value: str | None) -> bytes:
    if not value:
        return b""
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        return b""


def check_content_range(headers: Mapping[str, str], start: int, end: int) -> str | None:
    """None when a 206 answer covers exactly ``[start, end)``, else what is wrong."""
    value = _header(headers, "content-range")
    if not value:
        return "206 answer without Content-Range"
    try:
        unit, _, rest = value.partition(" ")
        span, _, _total = rest.partition("/")
        first, _, last = span.partition("-")
        if unit != "bytes" or int(first) != start or int(last) != end - 1:
            return f"Content-Range {value!r} does not match the requested bytes {start}-{end - 1}"
    except ValueError:
        return f"malformed Content-Range {value!r}"
    return None
