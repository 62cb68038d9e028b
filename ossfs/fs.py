"""The FUSE operations: kernel requests translated to namespace and fetcher calls.

This module only translates. It does no HTTP, no retries and holds no read
strategy: lookups and listings go to `Namespace`, reads to the open file's
`OpenFile` (`ossfs.reader`: pins, checks, read-ahead, the reply buffer), the
background check of a cached object's CRC-64 to `Fetcher`. Exceptions become
errnos in one place (`_errors`). The file system is read-only: every request that would change it
fails with EROFS.

An inode is one version of an object (`Namespace` gives a new version a new
inode), so an open file reads one version (every GET carries If-Match) and the
kernel never mixes pages of two versions, also across processes. When the
object changes under an open file, reads of what is not cached fail with EIO
and a log line; the next lookup sees the new version under a new inode. The
kernel page cache of an inode is always kept across opens.

Must not import: httpx.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import pyfuse3
import trio
from cachetools import LRUCache

from ossfs.cache.cachedir import CacheDir, object_identity
from ossfs.cache.index import StoreIdentity
from ossfs.cache.store import PartStore
from ossfs.errors import (
    IntegrityError,
    NotFoundError,
    ObjectChangedError,
    OssfsError,
    errno_for,
)
from ossfs.fetcher import Fetcher
from ossfs.model import DEFAULT_CACHE_PART_SIZE
from ossfs.namespace import DirReader, Namespace, Node
from ossfs.prefetch import SiblingPrefetch
from ossfs.reader import OpenFile, Reader

__all__ = ["Operations", "FsOptions"]

log = logging.getLogger(__name__)

_XATTR_PREFIX = "user.ossfs."
_XATTR_PREFIX_BYTES = _XATTR_PREFIX.encode()
_FILE_XATTRS = ("etag", "crc64", "cached_bytes", "url")
_ROOT_XATTRS = ("mount", "status")
# After this many objects in a row without a CRC-64 the service is taken to have none.
_NO_CRC_AFTER = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class FsOptions:
    """How files look: owner, permissions and how long the kernel may cache them."""

    uid: int
    gid: int
    umask: int = 0o222
    ttl: float = 60.0
    negative_ttl: float = 5.0
    part_size: int = DEFAULT_CACHE_PART_SIZE


@dataclass(slots=True)
class _Handle:
    node: Node
    file: OpenFile

    @property
    def store(self) -> PartStore:
        return self.file.store


class Operations(pyfuse3.Operations):
    """A read-only view of a bucket prefix."""

    enable_writeback_cache = False

    def __init__(
        self,
        namespace: Namespace,
        fetcher: Fetcher,
        cache: CacheDir,
        options: FsOptions,
        *,
        describe: Callable[[], dict[str, Any]],
        status: Callable[[], dict[str, Any]],
        has_crc64: bool = True,
        prefetch: SiblingPrefetch | None = None,
    ) -> None:
        super().__init__()
        self.ns = namespace
        self.fetcher = fetcher
        self.cache = cache
        self.opts = options
        self._describe = describe
        self._status = status
        self._prefetch = prefetch
        # S3 has no CRC-64 to show; OSS has it on HEAD (not in listings).
        self._has_crc64 = has_crc64
        self._crc_missing = 0  # objects in a row the service had no CRC-64 for
        self._file_xattrs = (
            _FILE_XATTRS if has_crc64 else tuple(n for n in _FILE_XATTRS if n != "crc64")
        )
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, tuple[Node, DirReader]] = {}
        self._next_fh = 1
        self._mounted_at = time.time()
        self.errors = 0
        self.reads = 0  # read requests the kernel sent (page-cache misses)
        # Requests the kernel sent, by operation (status shows them: how many round
        # trips a file costs).
        self.requests: Counter[str] = Counter()
        self.reader = Reader(fetcher, cache)
        # Inodes whose kernel pages came from bytes that failed the whole-object check:
        # their next open drops the page cache.
        self._stale_pages: LRUCache[int, bool] = LRUCache(maxsize=4096)
        # The inode each recently opened object version was read through: the kernel
        # keeps its pages after the file is closed, and a whole-object check may fail
        # only then (it runs in the background).
        self._inode_of: LRUCache[StoreIdentity, int] = LRUCache(maxsize=4096)
        fetcher.on_corrupt = self._drop_pages

    # ---------------------------------------------------------------- errors

    @asynccontextmanager
    async def _errors(self, what: str, path: str) -> AsyncIterator[None]:
        """The one place where exceptions become errnos."""
        try:
            yield
        except pyfuse3.FUSEError:
            raise
        except ObjectChangedError as e:
            self.errors += 1
            log.error(
                "%s %s: the object changed while open; reopen to read the new version (%s)",
                what,
                path,
                e,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OssfsError as e:
            code = errno_for(e)
            if code != errno.ENOENT:
                self.errors += 1
                log.error("%s %s failed: %s", what, path, e)
            raise pyfuse3.FUSEError(code) from None
        except OSError as e:
            self.errors += 1
            log.error("%s %s failed: %s", what, path, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:
            # A defect, or an answer nothing here expected: pyfuse3 would end the mount
            # on it. The request fails (EIO) and the mount goes on; the log has it all.
            self.errors += 1
            log.error("%s %s failed unexpectedly: %r", what, path, e, exc_info=True)
            raise pyfuse3.FUSEError(errno.EIO) from None

    # ---------------------------------------------------------------- attributes

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        # Built once per node and metadata version: `ls -l` of a big directory asks
        # for thousands. pyfuse3 copies the values into each reply.
        cached = node.attrs
        if cached is not None and cached[0] is node.meta:
            return cast(pyfuse3.EntryAttributes, cached[1])
        a = self._build_attrs(node)
        node.attrs = (node.meta, a)
        return a

    def _build_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = self.opts.ttl
        a.attr_timeout = self.opts.ttl
        a.st_uid = self.opts.uid
        a.st_gid = self.opts.gid
        a.st_blksize = 1 << 20
        if node.is_dir:
            a.st_mode = stat.S_IFDIR | (0o777 & ~self.opts.umask)
            a.st_nlink = 1  # "unknown": tools like find must not count subdirectories
            a.st_size = 0
            stamp = self._mounted_at
        else:
            meta = node.meta
            assert meta is not None
            a.st_mode = stat.S_IFREG | (0o666 & ~self.opts.umask)
            a.st_nlink = 1
            a.st_size = meta.size
            stamp = meta.mtime
        a.st_blocks = -(-a.st_size // 512)
        ns = int(stamp * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        return a

    def _no_entry(self) -> pyfuse3.EntryAttributes:
        """A negative entry, which the kernel may cache for a short while."""
        neg = pyfuse3.EntryAttributes()
        neg.st_ino = 0
        neg.entry_timeout = self.opts.negative_ttl
        return neg

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        self.requests["lookup"] += 1
        text = os.fsdecode(name)
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            # Object keys are UTF-8: no object has this name (and it cannot be asked for).
            return self._no_entry()
        async with self._errors("lookup", text):
            try:
                node = await self.ns.lookup(parent_inode, text)
            except NotFoundError:
                return self._no_entry()
        node.lookups += 1
        return self._attrs(node)

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        self.requests["getattr"] += 1
        async with self._errors("getattr", str(inode)):
            return self._attrs(self.ns.node(inode))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            try:
                self.ns.forget(inode, count)
            except Exception:  # forget must never raise
                log.exception("forget %d", inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = max(1, self.cache.used_bytes // 4096)
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.ns.inode_count
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # ---------------------------------------------------------------- directories

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.requests["opendir"] += 1
        async with self._errors("opendir", str(inode)):
            node = self.ns.node(inode)
            reader = self.ns.open_dir(inode)
        fh = self._new_fh()
        self._dirs[fh] = (node, reader)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.requests["readdir"] += 1
        # Offsets: 1 after ".", 2 after "..", then 3 + position in the listing.
        parent, reader = self._dirs[fh]
        if start_id < 2:
            # The kernel keeps no lookup count for these two, so neither do we.
            up = await self.ns.lookup(parent.inode, "..")
            for offset, name, node in ((1, b".", parent), (2, b"..", up)):
                if start_id < offset and not pyfuse3.readdir_reply(
                    token, name, self._attrs(node), offset
                ):
                    return
        pos = max(0, start_id - 2)
        while True:
            async with self._errors("readdir", reader.path or "/"):
                await self.ns.fill(reader, pos)
            if pos >= len(reader.entries):
                return
            for i, entry in self.ns.iter_entries(reader, pos):
                node = self.ns.remember(parent, entry)
                if not pyfuse3.readdir_reply(
                    token, os.fsencode(entry.name), self._attrs(node), i + 3
                ):
                    return
                node.lookups += 1
                pos = i + 1

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # ---------------------------------------------------------------- files

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.requests["open"] += 1
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.ns.node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        async with self._errors("open", node.path):
            if await self.ns.refresh(node) is not node:
                # The object is another version than this inode's. ESTALE makes the
                # kernel look the name up again (and open the new version's inode).
                log.info("open %s: the object changed; it gets a new inode", node.path)
                raise pyfuse3.FUSEError(errno.ESTALE)
            meta = node.meta
            assert meta is not None
            ident = object_identity(
                self.ns.bucket, meta.key, meta.etag, meta.size, self.opts.part_size
            )
            store = await self.fetcher.open_store(self.cache, ident)
            self._inode_of[store.identity] = inode  # (it may be an earlier identity's)
            if self._prefetch is not None:
                self._prefetch.on_open(node)
            if (
                store.complete
                and not store.crc_checked
                and store.server_crc64 is None
                and self._has_crc64
            ):
                # (A store with server_crc64 was fetched here: the fetch checks it.)
                # Cached by another process or run: compare the whole with the
                # service's CRC-64 once, in the background (a HEAD at most).
                self.fetcher.spawn(self._check_whole, node, self.cache.reuse(store.identity))
        fh = self._new_fh()
        self._handles[fh] = _Handle(node, self.reader.open(store, self.ns.url(meta.key)))
        # An inode is one version (`Namespace`): its page cache is good, unless the
        # cached bytes it came from failed the whole-object check since.
        keep = self._stale_pages.pop(inode, None) is None
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.reads += 1
        h = self._handles[fh]
        async with self._errors("read", h.file.url):
            return cast(bytes, await h.file.read(off, size))  # any contiguous buffer

    async def _check_whole(self, node: Node, store: PartStore | None) -> None:
        if store is None:
            return
        try:
            crc = await self.ns.object_crc64(node)
            if crc is None:
                # Nothing to compare with (the service keeps no CRC-64 of this object):
                # not asked again at every open of it (that was a HEAD per open). A
                # service that has none for several objects in a row has none at all
                # (an OSS-compatible store): no more HEADs for it.
                store.crc_checked = True
                self._crc_missing += 1
                if self._crc_missing == _NO_CRC_AFTER and self._has_crc64:
                    log.info(
                        "the service sends no CRC-64 of its objects: cached objects "
                        "are checked against their own part CRCs only"
                    )
                    self._has_crc64 = False
                return
            self._crc_missing = 0
            self.fetcher.check_whole(store, crc)
        except IntegrityError as e:
            log.error("%s", e)
        except OssfsError as e:
            log.debug("cannot check %s against the service's CRC-64: %s", node.path, e)
        finally:
            self.cache.release(store)

    def _drop_pages(self, store: PartStore) -> None:
        """Cached bytes of *store* were wrong: the kernel's copies of them go too."""
        inodes = {
            h.node.inode for h in self._handles.values() if h.store.identity == store.identity
        }
        opened = self._inode_of.get(store.identity)
        if opened is not None:
            inodes.add(opened)
        for inode in inodes:
            self._stale_pages[inode] = True
            # Not from the event loop: the kernel may wait for reads this loop serves.
            self.fetcher.spawn(trio.to_thread.run_sync, _invalidate_pages, inode)

    async def release(self, fh: int) -> None:
        self.requests["release"] += 1
        h = self._handles.pop(fh, None)
        if h is not None:
            try:
                h.file.close()  # (may evict: an error there must not keep the store open)
            finally:
                self.cache.release(h.store)

    async def flush(self, fh: int) -> None:
        # Nothing to flush on a read-only file system. ENOSYS tells the kernel never to
        # send FLUSH again: every close() waited for one round trip of it.
        self.requests["flush"] += 1
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # ---------------------------------------------------------------- xattrs

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self.ns.node(inode)
        if inode == pyfuse3.ROOT_INODE:
            names: tuple[str, ...] = _ROOT_XATTRS
        elif node.is_dir:
            names = ()
        else:
            names = self._file_xattrs
        return [(_XATTR_PREFIX + n).encode() for n in names]

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self.requests["getxattr"] += 1
        if not name.startswith(_XATTR_PREFIX_BYTES):
            if not name.startswith(b"user."):
                # Namespaces this file system does not have (security.*, system.*,
                # trusted.*): "not supported", not "no such attribute". `ls -l` asks
                # every file for security.selinux and system.posix_acl_access; told
                # that the file system does not support them it stops asking (it
                # remembers per device), which saves two round trips per entry.
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        key = name.decode(errors="replace")
        attr = key[len(_XATTR_PREFIX) :]
        node = self.ns.node(inode)
        async with self._errors("getxattr", node.path):
            if inode == pyfuse3.ROOT_INODE and attr in _ROOT_XATTRS:
                doc = self._describe() if attr == "mount" else self._status()
                return json.dumps(doc, sort_keys=True).encode()
            if node.is_dir or attr not in self._file_xattrs:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            meta = node.meta
            assert meta is not None
            if attr == "etag":
                return meta.etag.encode()
            if attr == "url":
                return self.ns.url(meta.key).encode()
            if attr == "crc64":
                try:
                    crc = await self.ns.object_crc64(node)
                except ObjectChangedError:
                    crc = None  # (this inode's version has none to give now)
                if crc is None:
                    raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
                return str(crc).encode()
            info = self.cache.info_for(
                object_identity(self.ns.bucket, meta.key, meta.etag, meta.size, self.opts.part_size)
            )
            return str(info.cached_bytes if info else 0).encode()

    # ---------------------------------------------------------------- read-only

    async def _erofs(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    create = write = setxattr = removexattr = fsync = fsyncdir = _erofs


def _invalidate_pages(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode)
    except OSError as e:  # the kernel forgot the inode meanwhile
        log.debug("cannot invalidate inode %d: %s", inode, e)
