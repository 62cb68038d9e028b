"""The buckets of the OSS-dialect test server: in memory, or a directory on disk.

A `MemoryBucket` keeps each object as immutable ``bytes`` with its metadata
(ETag: upper-case hex MD5, as OSS gives simple uploads; CRC-64 computed on
``put``). A `DirectoryBucket` serves the regular files under a directory:
keys are their ``/``-separated relative paths, the ETag is nginx's
(``<mtime hex>-<size hex>``) so that nginx serving the same files and this
server's listings agree, and the CRC-64 is computed on the first HEAD or GET
and cached by (path, inode, mtime, size).

Listing walks a sorted key list with bisect, so a page costs O(page) whatever
the bucket size. Python orders ``str`` by code point, which is the same order
as UTF-8 bytes, the order OSS and S3 list in. The list is rebuilt lazily after
a put or delete. A directory bucket is scanned when added, on `rescan`, and
before a listing when the mtime of any directory seen by the last scan has
changed (one ``stat`` per directory): files added, removed or renamed show up
by themselves. A file rewritten in place keeps its directory's mtime, so its
listing entry changes only after `rescan`; HEAD and GET always ``stat`` the
file and are never stale.

Must not import: trio, httpx, http.server (no network code here).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import BinaryIO

from ossfs.crc import crc64
from ossfs.fsutil import write_atomically
from ossfs.model import ObjectMeta

__all__ = [
    "MemorySource",
    "FileSource",
    "OpenObject",
    "ListResult",
    "Bucket",
    "MemoryBucket",
    "DirectoryBucket",
    "CrcCache",
    "nginx_etag",
    "http_date",
    "list_keys",
]

log = logging.getLogger(__name__)

# Inverting every byte is the default new content of a `replace` fault and
# what `corrupt` does: it always changes the data and keeps the size.
INVERT = bytes(255 - i for i in range(256))

_CRC_CHUNK = 8 * 1024 * 1024


def nginx_etag(mtime: float, size: int) -> str:
    """nginx's ETag (without quotes): ``%x-%x`` of the mtime seconds and size."""
    return f"{int(mtime):x}-{size:x}"


def http_date(epoch: float) -> str:
    return formatdate(int(epoch), usegmt=True)


@dataclass(frozen=True, slots=True)
class MemorySource:
    data: bytes

    def read(self, start: int, end: int) -> bytes:
        return self.data[start:end]


@dataclass(frozen=True, slots=True)
class FileSource:
    """An open file; the server sends from its descriptor with ``sendfile``."""

    file: BinaryIO
    path: str

    def read(self, start: int, end: int) -> bytes:
        return os.pread(self.file.fileno(), end - start, start)


@dataclass(slots=True)
class OpenObject:
    """One object version opened for a GET: its metadata and its bytes.

    For a directory object the file is opened before it is stat'ed, so the
    metadata describes exactly the bytes that will be sent even if the file is
    replaced meanwhile.
    """

    meta: ObjectMeta
    source: MemorySource | FileSource

    def read(self, start: int, end: int) -> bytes:
        return self.source.read(start, end)

    def close(self) -> None:
        if isinstance(self.source, FileSource):
            self.source.file.close()


@dataclass(frozen=True, slots=True)
class ListResult:
    objects: tuple[ObjectMeta, ...]
    prefixes: tuple[str, ...]
    # The last key or common prefix returned, when more follow: where the
    # next page starts (exclusive).
    next_after: str | None


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with *prefix*.

    None when there is none (the prefix is all U+10FFFF).
    """
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


def list_keys(
    keys: list[str],
    meta_of: dict[str, ObjectMeta],
    *,
    prefix: str,
    delimiter: str,
    after: str | None,
    max_keys: int,
) -> ListResult:
    """One page of a listing over the sorted *keys*.

    Returns the objects and common prefixes greater than *after*, up to
    *max_keys* of them together. When *after* itself rolls up into a common
    prefix, that prefix was already returned (it sorts before *after*), so the
    whole group is skipped: this is what lets the last common prefix of a page
    serve as the continuation point.
    """
    n = len(keys)
    i = bisect.bisect_left(keys, prefix)
    if after is not None:
        i = max(i, bisect.bisect_right(keys, after))
        if delimiter and after.startswith(prefix):
            j = after.find(delimiter, len(prefix))
            if j >= 0:
                end = _prefix_end(after[: j + len(delimiter)])
                i = max(i, bisect.bisect_left(keys, end) if end is not None else n)
    objects: list[ObjectMeta] = []
    prefixes: list[str] = []
    last: str | None = None
    count = 0
    while i < n and count < max_keys:
        key = keys[i]
        if not key.startswith(prefix):
            break
        if delimiter:
            j = key.find(delimiter, len(prefix))
            if j >= 0:
                common = key[: j + len(delimiter)]
                prefixes.append(common)
                last = common
                count += 1
                end = _prefix_end(common)
                i = bisect.bisect_left(keys, end) if end is not None else n
                continue
        meta = meta_of.get(key)
        i += 1
        if meta is None:  # deleted since the key list was built
            continue
        objects.append(meta)
        last = key
        count += 1
    more = i < n and keys[i].startswith(prefix) and max_keys > 0
    return ListResult(tuple(objects), tuple(prefixes), last if more else None)


class CrcCache:
    """CRC-64 of files, keyed by (path, inode, mtime_ns, size).

    One thread computes a given file's CRC while others wait for it: sixteen
    parallel GETs of a fresh 1 GiB file read it once, not sixteen times.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, int, int, int], int] = {}
        self._busy: dict[tuple[str, int, int, int], threading.Lock] = {}

    def get(self, path: str, st: os.stat_result, fd: int) -> int:
        ident = (path, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if ident in self._values:
                return self._values[ident]
            busy = self._busy.setdefault(ident, threading.Lock())
        with busy:
            with self._lock:
                if ident in self._values:
                    return self._values[ident]
            value = self._compute(fd, st.st_size)
            with self._lock:
                self._values[ident] = value
                self._busy.pop(ident, None)
        return value

    @staticmethod
    def _compute(fd: int, size: int) -> int:
        buf = bytearray(min(_CRC_CHUNK, max(size, 1)))
        view = memoryview(buf)
        crc = 0
        offset = 0
        while offset < size:
            n = os.preadv(fd, [view], offset)
            if n <= 0:
                break
            crc = crc64(view[:n], crc)
            offset += n
        return crc


class Bucket:
    """What the server needs of a bucket; see the two implementations."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._meta: dict[str, ObjectMeta] = {}

    def head(self, key: str) -> ObjectMeta | None:
        raise NotImplementedError

    def open(self, key: str) -> OpenObject | None:
        raise NotImplementedError

    def put(self, key: str, data: bytes, *, etag: str | None, mtime: float | None) -> ObjectMeta:
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def replace(self, key: str, data: bytes | None) -> ObjectMeta | None:
        """Give *key* new content and a newer mtime (None: the old bytes inverted)."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        """All keys, sorted. The list is never mutated afterwards."""
        raise NotImplementedError

    def list(self, *, prefix: str, delimiter: str, after: str | None, max_keys: int) -> ListResult:
        return list_keys(
            self.keys(),
            self._meta,
            prefix=prefix,
            delimiter=delimiter,
            after=after,
            max_keys=max_keys,
        )


class MemoryBucket(Bucket):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._data: dict[str, bytes] = {}
        self._sorted: list[str] | None = None

    def head(self, key: str) -> ObjectMeta | None:
        return self._meta.get(key)

    def open(self, key: str) -> OpenObject | None:
        with self._lock:
            data = self._data.get(key)
            meta = self._meta.get(key)
        if data is None or meta is None:
            return None
        return OpenObject(meta, MemorySource(data))

    def put(self, key: str, data: bytes, *, etag: str | None, mtime: float | None) -> ObjectMeta:
        data = bytes(data)
        meta = ObjectMeta(
            key=key,
            size=len(data),
            etag=etag.strip('"') if etag else hashlib.md5(data).hexdigest().upper(),
            # Whole seconds: Last-Modified has no fraction, and a listing's
            # LastModified must agree with the HEAD of the same object.
            mtime=float(int(time.time() if mtime is None else mtime)),
            crc64=crc64(data),
            object_type="Normal",
            storage_class="Standard",
        )
        with self._lock:
            if key not in self._data:
                self._sorted = None
            self._data[key] = data
            self._meta[key] = meta
        return meta

    def delete(self, key: str) -> bool:
        with self._lock:
            if key not in self._data:
                return False
            del self._data[key]
            del self._meta[key]
            self._sorted = None
        return True

    def replace(self, key: str, data: bytes | None) -> ObjectMeta | None:
        with self._lock:
            old = self._data.get(key)
            old_meta = self._meta.get(key)
        if old is None or old_meta is None:
            return None
        new = old.translate(INVERT) if data is None else data
        if not new:
            new = b"\0"
        return self.put(key, new, etag=None, mtime=max(time.time(), old_meta.mtime + 1))

    def keys(self) -> list[str]:
        with self._lock:
            if self._sorted is None:
                self._sorted = sorted(self._data)
            return self._sorted


class DirectoryBucket(Bucket):
    """The regular files under *root* as objects (read-only but for tests' puts)."""

    def __init__(self, name: str, root: str, *, crc: bool, crc_cache: CrcCache) -> None:
        super().__init__(name)
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(root)
        self.crc = crc
        self._crc_cache = crc_cache
        self._sorted: list[str] = []
        self._dirs: dict[str, int] = {}
        self.rescan()

    # -------------------------------------------------------------- paths and stat

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)

    def _path(self, key: str) -> str | None:
        """The file of *key*, or None when the key cannot name one of our files."""
        parts = key.split("/")
        # Empty, "." and ".." segments never come out of a scan; refusing them
        # also keeps a key from escaping the root.
        if "\0" in key or any(p in ("", ".", "..") for p in parts):
            return None
        return os.path.join(self.root, *parts)

    def _meta_for(self, key: str, st: os.stat_result, crc: int | None) -> ObjectMeta:
        return ObjectMeta(
            key=key,
            size=st.st_size,
            etag=nginx_etag(st.st_mtime, st.st_size),
            mtime=float(int(st.st_mtime)),
            crc64=crc,
            object_type="Normal",
            storage_class="Standard",
        )

    def _open_file(self, key: str) -> tuple[BinaryIO, str] | None:
        path = self._path(key)
        if path is None:
            return None
        try:
            if not self._inside(os.path.realpath(path)):
                return None
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by OpenObject.close
        except OSError:
            return None
        return f, path

    # ---------------------------------------------------------------- object access

    def head(self, key: str) -> ObjectMeta | None:
        obj = self.open(key)
        if obj is None:
            return None
        obj.close()
        return obj.meta

    def open(self, key: str) -> OpenObject | None:
        opened = self._open_file(key)
        if opened is None:
            return None
        f, path = opened
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                f.close()
                return None
            crc = self._crc_cache.get(path, st, f.fileno()) if self.crc else None
        except BaseException:
            f.close()
            raise
        return OpenObject(self._meta_for(key, st, crc), FileSource(f, path))

    def put(self, key: str, data: bytes, *, etag: str | None, mtime: float | None) -> ObjectMeta:
        if etag is not None:
            raise ValueError("a directory bucket's ETag comes from the file; do not pass one")
        path = self._path(key)
        if path is None:
            raise ValueError(f"key {key!r} cannot be a file name")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Write beside and rename, so a GET in flight keeps reading the old file.
        write_atomically(path, data, 0o666, durable=False, mtime=mtime)
        st = os.stat(path)
        meta = self._meta_for(key, st, None)
        with self._lock:
            if key not in self._meta:
                # Copy, never mutate: listings in flight hold the old list.
                keys = list(self._sorted)
                bisect.insort(keys, key)
                self._sorted = keys
            self._meta[key] = meta
        return meta

    def delete(self, key: str) -> bool:
        path = self._path(key)
        if path is None:
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        with self._lock:
            if self._meta.pop(key, None) is not None:
                self._sorted = [k for k in self._sorted if k != key]
        return True

    def replace(self, key: str, data: bytes | None) -> ObjectMeta | None:
        obj = self.open(key)
        if obj is None:
            return None
        try:
            old = obj.meta
            new = data if data is not None else obj.read(0, old.size).translate(INVERT)
        finally:
            obj.close()
        # The ETag only has whole seconds of mtime: move it forward by at
        # least one second so the new version never shares the old ETag.
        return self.put(key, new, etag=None, mtime=max(int(time.time()), int(old.mtime) + 1))

    # -------------------------------------------------------------------- listing

    def rescan(self) -> None:
        """Walk the directory again (regular files only).

        Symlinks to files inside the root are served under the link's name;
        symlinks leading outside the root, and symlinked directories (which
        could loop), are skipped.
        """
        started = time.monotonic()
        meta: dict[str, ObjectMeta] = {}
        dirs: dict[str, int] = {}
        stack: list[tuple[str, str]] = [("", self.root)]
        while stack:
            rel, path = stack.pop()
            try:
                dirs[path] = os.stat(path).st_mtime_ns
                entries = list(os.scandir(path))
            except OSError as e:
                log.debug("scan of %s skipped: %s", path, e)
                continue
            for entry in entries:
                key = rel + entry.name
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    log.warning("skipping %r: the name is not UTF-8", entry.path)
                    continue
                try:
                    if entry.is_symlink() and (
                        entry.is_dir() or not self._inside(os.path.realpath(entry.path))
                    ):
                        continue
                    st = entry.stat()
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append((key + "/", entry.path))
                elif stat.S_ISREG(st.st_mode):
                    meta[key] = self._meta_for(key, st, None)
        keys = sorted(meta)
        with self._lock:
            self._meta, self._sorted, self._dirs = meta, keys, dirs
        log.debug(
            "scanned %s: %d files in %d directories (%.3f s)",
            self.root,
            len(keys),
            len(dirs),
            time.monotonic() - started,
        )

    def _stale(self) -> bool:
        for path, mtime_ns in self._dirs.items():
            try:
                if os.stat(path).st_mtime_ns != mtime_ns:
                    return True
            except OSError:
                return True
        return False

    def keys(self) -> list[str]:
        with self._lock:
            stale = self._stale()
        if stale:
            self.rescan()
        with self._lock:
            return self._sorted
