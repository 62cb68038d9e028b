"""Value types shared by every layer, and the part arithmetic.

An object version is (bucket, key, ETag, size): `ObjectMeta` carries it, and
the cache's `StoreIdentity` pins it. A transfer covers a byte range of it cut
into fixed, part-aligned pieces of ``part_size`` bytes; `PartLayout` does that
arithmetic. Sizes on the command line are parsed by
`parse_size` (``8MiB``, ``64M``, ``100K``).

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from ossfs.errors import UsageError

__all__ = [
    "KiB",
    "MiB",
    "GiB",
    "DEFAULT_PART_SIZE",
    "DEFAULT_CACHE_PART_SIZE",
    "WHOLE_OBJECT_MAX",
    "one_part_limit",
    "store_part_size",
    "MIN_PART_SIZE",
    "MAX_PART_SIZE",
    "validate_part_size",
    "ObjectMeta",
    "ListPage",
    "PartLayout",
    "parse_size",
    "format_size",
    "parse_range",
    "resolve_range",
    "object_url",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_PART_SIZE = 8 * MiB
# The cache's part size (mount, materialize): what one random read fetches at least.
# A sequential reader's GETs cover runs of parts (`ossfs.fetcher`), so its requests do
# not multiply; what 1 MiB costs against 8 MiB is per-part work (docs/bench-fetch.md).
DEFAULT_CACHE_PART_SIZE = 1 * MiB
# An object of at most this size (or of the part size, if larger) is cached as one
# part: one GET, one file (`ossfs.cache.small`). 8 MiB was the part size before the
# default became 1 MiB, so such objects keep the cache entries they had then. Not for
# part sizes below the default (`one_part_limit`).
WHOLE_OBJECT_MAX = 8 * MiB
MIN_PART_SIZE = 100 * KiB
MAX_PART_SIZE = 5 * GiB


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What a HEAD or a listing entry tells about one object.

    :key: the decoded object key.
    :size: bytes.
    :etag: the ETag with its quotes removed.
    :mtime: Last-Modified, seconds since the epoch.
    :crc64: ``x-oss-hash-crc64ecma`` when the service sent it.
    :object_type: ``Normal``, ``Multipart``, ``Appendable`` ... when known.
    :storage_class: ``Standard``, ``Archive`` ... when known.
    :encryption: the server-side encryption a HEAD names (``AES256``,
        ``aws:kms``, ``KMS``, ``SSE-C`` for a key of the customer's ...), if any.
    """

    key: str
    size: int
    etag: str
    mtime: float
    crc64: int | None = None
    object_type: str | None = None
    storage_class: str | None = None
    encryption: str | None = None

    def __post_init__(self) -> None:
        # A size no file can have (a hostile or broken answer) is refused where it is
        # read: st_size is a signed 64-bit number, and a negative one has no parts.
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"object size {self.size} is out of range")


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a ListObjectsV2 answer.

    :objects: the objects on this page, in key order.
    :prefixes: common prefixes (with their trailing delimiter).
    :next_token: continuation token, None on the last page.
    """

    objects: tuple[ObjectMeta, ...]
    prefixes: tuple[str, ...]
    next_token: str | None


@dataclass(frozen=True, slots=True)
class PartLayout:
    """Parts of ``part_size`` bytes over ``[start, start + length)`` of an object.

    Part ``i`` covers ``[start + i*part_size, min(start + (i+1)*part_size, end))``.
    A zero-length range has no parts.
    """

    start: int
    length: int
    part_size: int

    def __post_init__(self) -> None:
        if self.part_size <= 0:
            raise ValueError("part_size must be positive")
        if self.start < 0 or self.length < 0:
            raise ValueError("negative range")

    @property
    def count(self) -> int:
        return -(-self.length // self.part_size)

    def bounds(self, index: int) -> tuple[int, int]:
        """Object offsets ``(first, end_exclusive)`` of part *index*."""
        if not 0 <= index < self.count:
            raise IndexError(index)
        first = self.start + index * self.part_size
        return first, min(first + self.part_size, self.start + self.length)

    def spans(self, parts: Iterable[int]) -> list[tuple[int, int]]:
        """Object ranges ``(first, end_exclusive)`` covering *parts*, consecutive parts
        merged into one range (one system call for a run of parts)."""
        out: list[tuple[int, int]] = []
        for part in sorted(set(parts)):
            first, end = self.bounds(part)
            if out and out[-1][1] == first:
                out[-1] = (out[-1][0], end)
            else:
                out.append((first, end))
        return out

    def part_length(self, index: int) -> int:
        first, end = self.bounds(index)
        return end - first

    def parts_for(self, offset: int, size: int) -> range:
        """Indexes of the parts that overlap object bytes ``[offset, offset+size)``."""
        lo = max(offset, self.start)
        hi = min(offset + size, self.start + self.length)
        if hi <= lo:
            return range(0)
        return range(
            (lo - self.start) // self.part_size, (hi - 1 - self.start) // self.part_size + 1
        )


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB, "p": 1024 * 1024 * GiB}


def object_url(scheme: str, bucket: str, key: str = "") -> str:
    """``oss://bucket/key`` (or ``s3://``): how an object or prefix is named to a user.

    Not escaped: pass it through `ossfs.escape.printable` before a terminal or log.
    """
    return f"{scheme}://{bucket}/{key}"


def parse_size(text: str) -> int:
    """Parse ``8MiB``, ``64M``, ``100k``, ``1.5G`` or ``4096`` into bytes.

    Units are binary (``M`` and ``MiB`` both mean 2**20): part sizes and cache
    caps are always thought of in binary units, and one meaning is simpler
    than two. Raises ValueError with a readable message.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(
            f"not a size: {text!r} (use a number with an optional unit: 4096, 100K, 8MiB, 64M, 2G)"
        )
    number, unit, _ = m.groups()
    if len(number) > 30:  # (far beyond any disk; and a bound on the work below)
        raise ValueError(f"not a size: {text[:40]!r}... is too large")
    # Decimal, not float: exact at any size (a float of 309 digits is inf).
    value = Decimal(number) * _UNITS[unit.lower()]
    if value != value.to_integral_value():
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def one_part_limit(part_size: int) -> int:
    """The largest object the cache keeps as one part, at cache part size *part_size*:
    `WHOLE_OBJECT_MAX`, or the part size if larger. A part size below the default asks
    for fine-grained caching: then objects are cut into parts whatever their size."""
    return part_size if part_size < DEFAULT_CACHE_PART_SIZE else max(part_size, WHOLE_OBJECT_MAX)


def store_part_size(size: int, part_size: int) -> int:
    """The part size of the cache entry of an object of *size* bytes: *part_size*, or
    one part for an object of at most `one_part_limit`."""
    whole = one_part_limit(part_size)
    return whole if size <= whole else part_size


def validate_part_size(part_size: int) -> None:
    """UsageError unless *part_size* is one the services take (100 KiB to 5 GiB)."""
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise UsageError(
            f"part size {format_size(part_size)} is out of range "
            f"({format_size(MIN_PART_SIZE)} to {format_size(MAX_PART_SIZE)})"
        )


def utc_stamp(when: float) -> str:
    """Seconds since the epoch as ISO 8601 in UTC, to the second: 2026-11-30T10:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def format_size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; for messages and reports."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_range(text: str) -> tuple[int, int | None]:
    """Parse ``START-END`` (bytes, inclusive; END optional: to the end of the object).

    Returns ``(start, end)``, *end* None for ``START-``. Raises ValueError when
    the text is malformed or the range ends before it starts.
    """
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d*)\s*", text)
    if not m:
        raise ValueError(f"not a range: {text!r} (use START-END or START-, in bytes)")
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else None
    if end is not None and end < start:
        raise ValueError(f"range {text!r} ends before it starts")
    return start, end


def resolve_range(start: int, end: int | None, size: int) -> tuple[int, int]:
    """``(start, length)`` of the inclusive range *start*..*end* (None: to the end)
    of an object of *size* bytes; an END past the end is clamped, as HTTP ranges
    are. Raises ValueError when the range is inverted or starts at or past the end.
    """
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid range {start}-{'' if end is None else end}")
    if start >= size:
        raise ValueError(f"range starts at byte {start}, past the end of the object ({size} bytes)")
    last = size - 1 if end is None else min(end, size - 1)
    return start, last - start + 1
