"""CRC-64/XZ, the checksum OSS publishes as ``x-oss-hash-crc64ecma``.

A thin wrapper over anycrc's C implementation (several GB/s, with a C
``combine`` that joins the CRCs of adjacent pieces without re-reading them).

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

from collections.abc import Iterable

import anycrc

__all__ = ["crc64", "crc64_combine", "crc64_of_parts"]

_MODEL = anycrc.Model("CRC64-XZ")


def crc64(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC of *data*; pass the CRC so far as *crc* to continue a running one."""
    if not data:
        return crc
    return int(_MODEL.calc(data, crc) if crc else _MODEL.calc(data))


def crc64_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``."""
    if len2 == 0:
        return crc1
    return int(_MODEL.combine(crc1, crc2, len2))


def crc64_of_parts(parts: Iterable[tuple[int, int]]) -> int:
    """Combine ``(crc, length)`` pairs of consecutive pieces into one CRC."""
    total = 0
    for crc, length in parts:
        total = crc64_combine(total, crc, length)
    return total
