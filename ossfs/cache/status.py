"""What a cache directory holds, for ``ossfs status``: read-only, from any process.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

from typing import Any

from ossfs.cache.cachedir import cached_objects

__all__ = ["cached_objects_of"]


def cached_objects_of(cache_dir: str, bucket: str | None) -> list[dict[str, Any]]:
    """Every object version of *bucket* that the cache at *cache_dir* holds something of,
    sorted by key, as JSON-ready records (key, etag, size, cached_bytes, parts,
    parts_cached). A cache may hold several versions of one key."""
    return [
        {
            "key": o.key,
            "etag": o.etag,
            "size": o.size,
            "cached_bytes": o.cached_bytes,
            "parts": o.parts,
            "parts_cached": o.parts_present,
        }
        for o in sorted(cached_objects(cache_dir), key=lambda o: o.key)
        if o.bucket == bucket
    ]
