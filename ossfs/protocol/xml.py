"""Parsers for the XML bodies an object store answers with.

ListObjectsV2 (OSS and S3 share its shape; OSS's ``encoding-type=url``
percent-encodes keys, prefixes and tokens, decoded here with ``unquote``,
never ``unquote_plus``) and the error document. Also the writers the test
server uses, so that both directions are tested against each other; the
parsers are also tested against OSS and S3 answers of the documented formats
and answers captured from moto (tests/fixtures/xml).

Must not import: trio, httpx.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote
from xml.sax.saxutils import escape

from ossfs.model import ListPage, ObjectMeta

__all__ = [
    "ErrorDocument",
    "XmlError",
    "parse_list_objects_v2",
    "parse_error",
    "render_list_objects",
    "render_error",
    "parse_iso8601",
    "format_iso8601",
    "strip_etag",
]


class XmlError(ValueError):
    """A body that should be XML of a known shape is not."""


@dataclass(frozen=True, slots=True)
class ErrorDocument:
    code: str
    message: str
    request_id: str | None
    ec: str | None


def _local(tag: str) -> str:
    """Drop the ``{namespace}`` S3 puts in front of every tag."""
    return tag[tag.index("}") + 1 :] if tag[:1] == "{" else tag


def _children(elem: ET.Element) -> dict[str, ET.Element]:
    return {_local(c.tag): c for c in elem}


def _text(elem: ET.Element | None) -> str:
    return (elem.text or "") if elem is not None else ""


def strip_etag(value: str) -> str:
    """``W/"abc"`` or ``"abc"`` -> ``abc``."""
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def parse_iso8601(text: str) -> float:
    """``2020-06-22T11:42:32.000Z`` -> seconds since the epoch (UTC when no zone is given)."""
    text = text.strip()
    try:
        stamp = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError as e:
        raise XmlError(f"bad timestamp {text!r}") from e
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def format_iso8601(epoch: float) -> str:
    ms = int(round((epoch - int(epoch)) * 1000)) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(epoch))) + f".{ms:03d}Z"


def _parse(body: bytes, root_name: str) -> ET.Element:
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise XmlError(f"malformed XML ({e})") from e
    if _local(root.tag) != root_name:
        raise XmlError(f"expected <{root_name}>, got <{_local(root.tag)}>")
    return root


def parse_list_objects_v2(body: bytes) -> ListPage:
    """Parse a ``<ListBucketResult>`` (V2; V1's NextMarker is honoured too)."""
    root = _parse(body, "ListBucketResult")
    top = _children(root)
    encoded = _text(top.get("EncodingType")).lower() == "url"

    def dec(s: str) -> str:
        return unquote(s) if encoded else s

    objects: list[ObjectMeta] = []
    prefixes: list[str] = []
    for child in root:
        name = _local(child.tag)
        if name == "Contents":
            c = _children(child)
            try:
                objects.append(
                    ObjectMeta(
                        key=dec(_text(c.get("Key"))),
                        size=int(_text(c.get("Size")) or 0),
                        etag=strip_etag(_text(c.get("ETag"))),
                        mtime=parse_iso8601(_text(c.get("LastModified")))
                        if c.get("LastModified") is not None
                        else 0.0,
                        object_type=_text(c.get("Type")) or None,
                        storage_class=_text(c.get("StorageClass")) or None,
                    )
                )
            except ValueError as e:
                raise XmlError(f"bad <Contents> entry: {e}") from e
        elif name == "CommonPrefixes":
            for p in child:
                if _local(p.tag) == "Prefix":
                    prefixes.append(dec(_text(p)))
    truncated = _text(top.get("IsTruncated")).strip().lower() == "true"
    token: str | None = None
    if truncated:
        token = dec(_text(top.get("NextContinuationToken")))
        if not token:
            # ListObjects V1 answers (s3fs-style peers, some gateways): continue after
            # NextMarker, or after the last key when the server omits it.
            token = dec(_text(top.get("NextMarker")))
        if not token:
            last = [o.key for o in objects] + prefixes
            if not last:
                raise XmlError("truncated listing without a continuation token")
            token = max(last)
    return ListPage(tuple(objects), tuple(prefixes), token)


def parse_error(body: bytes) -> ErrorDocument:
    """Parse an ``<Error>`` document (OSS or S3)."""
    root = _parse(body, "Error")
    c = _children(root)
    return ErrorDocument(
        code=_text(c.get("Code")) or "Unknown",
        message=_text(c.get("Message")),
        request_id=_text(c.get("RequestId")) or None,
        ec=_text(c.get("EC")) or None,
    )


# ------------------------------------------------------------------ writers (test server)


def _enc(s: str, url: bool) -> str:
    return escape(quote(s, safe="/") if url else s)


def render_list_objects(
    *,
    bucket: str,
    prefix: str,
    delimiter: str,
    max_keys: int,
    objects: Iterable[ObjectMeta],
    prefixes: Iterable[str],
    next_token: str | None,
    continuation_token: str | None,
    start_after: str | None,
    encoding_url: bool,
    v2: bool = True,
    marker: str | None = None,
) -> bytes:
    """Write a ListObjects (V2, or V1 with ``v2=False``) answer as OSS does."""
    objects = list(objects)
    prefixes = list(prefixes)
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult>']
    out.append(f"<Name>{escape(bucket)}</Name>")
    out.append(f"<Prefix>{_enc(prefix, encoding_url)}</Prefix>")
    if v2:
        if continuation_token:
            out.append(
                f"<ContinuationToken>{_enc(continuation_token, encoding_url)}</ContinuationToken>"
            )
        if start_after:
            out.append(f"<StartAfter>{_enc(start_after, encoding_url)}</StartAfter>")
    else:
        out.append(f"<Marker>{_enc(marker or '', encoding_url)}</Marker>")
    out.append(f"<MaxKeys>{max_keys}</MaxKeys>")
    if delimiter:
        out.append(f"<Delimiter>{_enc(delimiter, encoding_url)}</Delimiter>")
    if encoding_url:
        out.append("<EncodingType>url</EncodingType>")
    out.append(f"<IsTruncated>{'true' if next_token else 'false'}</IsTruncated>")
    if next_token:
        tag = "NextContinuationToken" if v2 else "NextMarker"
        out.append(f"<{tag}>{_enc(next_token, encoding_url)}</{tag}>")
    if v2:
        out.append(f"<KeyCount>{len(objects) + len(prefixes)}</KeyCount>")
    for o in objects:
        out.append(
            "<Contents>"
            f"<Key>{_enc(o.key, encoding_url)}</Key>"
            f"<LastModified>{format_iso8601(o.mtime)}</LastModified>"
            f'<ETag>"{escape(o.etag)}"</ETag>'
            f"<Type>{escape(o.object_type or 'Normal')}</Type>"
            f"<Size>{o.size}</Size>"
            f"<StorageClass>{escape(o.storage_class or 'Standard')}</StorageClass>"
            "</Contents>"
        )
    for p in prefixes:
        out.append(f"<CommonPrefixes><Prefix>{_enc(p, encoding_url)}</Prefix></CommonPrefixes>")
    out.append("</ListBucketResult>")
    return "".join(out).encode()


def render_error(
    *, code: str, message: str, request_id: str, host: str = "localhost", ec: str | None = None
) -> bytes:
    """Write an OSS ``<Error>`` document."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>',
        f"<Code>{escape(code)}</Code>",
        f"<Message>{escape(message)}</Message>",
        f"<RequestId>{escape(request_id)}</RequestId>",
        f"<HostId>{escape(host)}</HostId>",
    ]
    if ec:
        parts.append(f"<EC>{escape(ec)}</EC>")
    parts.append("</Error>")
    return "".join(parts).encode()
