"""The namespace: bucket listings seen as directories and files, with inode numbers.

Objects are files; ``/``-separated prefixes are directories, whether implied
by deeper keys or marked by a ``dir/`` object. Everything comes from
ListObjectsV2 pages (no HEAD per entry): sizes, ETags and mtimes included.

Rules that decide what a key looks like (``docs/semantics.md``):

- A name that cannot be a POSIX file name is skipped, with one warning per
  key: ``.``, ``..``, empty (from ``a//b``), longer than 255 bytes, or holding
  NUL. Names are single path components by construction, so no key can
  produce a path outside the mount.
- When a key is both a file and a prefix (``x`` and ``x/...``) the directory
  wins and the file is hidden (one warning): that hides one object, not a
  whole tree.

One listing per directory: a lookup in a directory that is not listed yet
lists it (one ListObjectsV2 page after another: each page needs the token of
the one before, so a listing cannot be fetched in parallel), and every lookup
and ``readdir`` of that directory shares the same listing while it is built.
A lookup waits for at most one page; a name the listing has not reached by
then is probed (a HEAD and a one-key LIST) while the listing goes on in the
background. HEAD is sent only there and where no listing can answer.

A walk of a tree (``find``, ``grep -r``: subdirectories opened one after
another in listing order) lists the next subdirectories ahead, in the
background, a few at once.

Caches (cachetools): directory listings for ``ttl`` seconds, negative
lookups for ``negative_ttl``. `DirReader` pages through a listing lazily as
``readdir`` asks for more, with stable offsets (its position in the list it
has built), so a directory of 100k objects costs 100 requests and no
quadratic work; a complete listing is kept for later lookups.

Listings are checked as they are followed (`ListingGuard`): a continuation
token that comes back, keys that do not increase from page to page, or page
after page with nothing on it is an error, not a loop; and one directory
holds at most ``max_dir_entries`` entries, so a listing that never ends
cannot grow memory without bound (a listed entry costs the mount about
1.3 KiB, inodes and attributes included).

Must not import: pyfuse3, httpx.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio
from cachetools import LRUCache, TTLCache

from ossfs.client import ObjectClient
from ossfs.errors import (
    ListingError,
    NotFoundError,
    ObjectChangedError,
    ServiceError,
    unwrap_groups,
)
from ossfs.model import ListPage, ObjectMeta, object_url

__all__ = [
    "Node",
    "Namespace",
    "DirReader",
    "ListingGuard",
    "ROOT_INODE",
    "DEFAULT_MAX_DIR_ENTRIES",
    "valid_name",
]

log = logging.getLogger(__name__)

ROOT_INODE = 1
# A walk of a tree lists this many subdirectories ahead, this many at once.
_WALK_AHEAD = 8
_WALK_LISTINGS = 4
_NAME_MAX = 255
# The most entries one directory of the mount may hold (``--max-dir-entries``).
DEFAULT_MAX_DIR_ENTRIES = 1_000_000
# Pages in a row with nothing on them before a listing counts as running in place.
_MAX_EMPTY_PAGES = 1000


def valid_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "\0" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= _NAME_MAX
    )


class ListingGuard:
    """Checks that a listing followed page by page moves forward.

    Call `check` with every page and the token that asked for it. It raises
    `ListingError` when:

    - the next continuation token is the one just sent, or one sent since the
      last page that had entries (a loop: the same page for ever);
    - a page's keys and prefixes do not all come after those of the pages
      before it (the service lists in key order; a listing that goes back is
      repeating itself, whatever its tokens say);
    - more than 1000 pages in a row have no entries at all.

    It keeps only the last key and the tokens of the current run of empty
    pages, so a listing of any length costs it constant memory.
    """

    def __init__(self, resource: str, *, max_empty_pages: int = _MAX_EMPTY_PAGES) -> None:
        self.resource = resource
        self.max_empty_pages = max_empty_pages
        self.pages = 0
        self._last: str | None = None
        self._empty_tokens: set[str] = set()

    def _fail(self, what: str) -> ListingError:
        return ListingError(f"the listing of {self.resource} does not move forward: {what}")

    def check(self, page: ListPage, sent_token: str | None) -> None:
        self.pages += 1
        nxt = page.next_token
        if nxt is not None and (nxt == sent_token or nxt in self._empty_tokens):
            raise self._fail(f"the continuation token repeats (page {self.pages})")
        names = [o.key for o in page.objects] + list(page.prefixes)
        if names:
            first = min(names)
            if self._last is not None and first <= self._last:
                raise self._fail(
                    f"page {self.pages} starts at {first!r}, not after "
                    f"{self._last!r} where page {self.pages - 1} ended"
                )
            self._last = max(names)
            self._empty_tokens.clear()
        if nxt is None:
            return
        if not names:
            if sent_token is not None:
                self._empty_tokens.add(sent_token)
            if len(self._empty_tokens) >= self.max_empty_pages:
                raise self._fail(f"{self.max_empty_pages} pages in a row have no entries")


@dataclass(slots=True)
class Node:
    """One file or directory known to the kernel (or about to be).

    :path: relative to the mount root, no leading or trailing slash ('' is the root).
    :meta: for files, what the listing (or a HEAD) said; None for directories.
    :seen: monotonic time `meta` was read.
    """

    inode: int
    path: str
    is_dir: bool
    meta: ObjectMeta | None
    seen: float
    lookups: int = 0
    # The FUSE layer's attributes for `meta`, kept with the meta they were made from.
    attrs: tuple[ObjectMeta | None, object] | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def _same_version(old: ObjectMeta | None, new: ObjectMeta | None) -> bool:
    if old is None or new is None:
        return old is new
    return (old.etag, old.size) == (new.etag, new.size)


@dataclass(slots=True)
class _Entry:
    name: str
    is_dir: bool
    meta: ObjectMeta | None


# `Namespace._from_listing`: the listing cannot answer yet.
_UNKNOWN = _Entry("", False, None)


@dataclass(slots=True)
class _Listing:
    entries: dict[str, _Entry]
    complete: bool
    # Files in listing order and their positions, built on first use (read-ahead).
    files: list[str] | None = None
    positions: dict[str, int] | None = None
    # The same for subdirectories (walk read-ahead).
    dirs: list[str] | None = None
    dir_positions: dict[str, int] | None = None


# Ties in `DirReader._pending` (one key twice, from a server that repeats) never compare
# entries.
_ORDER = itertools.count()


@dataclass(slots=True)
class DirReader:
    """One open directory: the entries found so far and how to get more.

    Offsets handed to the kernel are positions in `entries`, which only grows,
    so a ``readdir`` that resumes at an offset never skips or repeats a name.
    """

    path: str
    entries: list[_Entry] = field(default_factory=list)
    token: str | None = None
    done: bool = False
    guard: ListingGuard | None = None
    # Why the listing cannot go on (raised again by every later call).
    error: ListingError | None = None
    # The entries by name (the listing's dict: a lookup is answered from it).
    by_name: dict[str, _Entry] = field(default_factory=dict)
    pages: int = 0
    # The greatest key the listing has reached: names sorting before it are decided.
    last_key: str | None = None
    # Set while one task fetches the next page: everyone else waits for it.
    busy: trio.Event | None = None
    background: bool = False
    # Listed ahead of a walk (`Namespace._walk_ahead`), not because someone asked.
    ahead: bool = False
    # Files waiting until no directory prefix of the same name can follow: a heap by
    # ``key + "/"`` (each leaves as soon as the listing passes it), and the live ones
    # by name (a prefix of the same name takes one out: then it is not in the heap's
    # dict any more, and is skipped when it comes up).
    _pending: list[tuple[str, int, _Entry]] = field(default_factory=list)
    _pending_names: dict[str, _Entry] = field(default_factory=dict)
    # Keys listed so far, entries or not (the cap counts them all).
    listed: int = 0


class Namespace:
    """Inodes and listings for one mounted bucket prefix."""

    def __init__(
        self,
        client: ObjectClient,
        bucket: str,
        prefix: str,
        *,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        max_dirs: int = 4096,
        max_dir_entries: int = DEFAULT_MAX_DIR_ENTRIES,
        scheme: str = "oss",
    ) -> None:
        self.client = client
        self.scheme = scheme
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_dir_entries = max_dir_entries
        root = Node(ROOT_INODE, "", True, None, time.monotonic(), lookups=1)
        self._nodes: dict[int, Node] = {ROOT_INODE: root}
        self._by_path: dict[str, int] = {"": ROOT_INODE}
        self._next_inode = ROOT_INODE + 1
        self._listings: TTLCache[str, _Listing] = TTLCache(maxsize=max_dirs, ttl=max(ttl, 1e-3))
        self._negative: TTLCache[str, bool] = TTLCache(maxsize=65536, ttl=max(negative_ttl, 1e-3))
        # The reader building each directory's listing now (shared; see `_from_listing`).
        self._filling: TTLCache[str, DirReader] = TTLCache(maxsize=max_dirs, ttl=max(ttl, 1e-3))
        self._nursery: trio.Nursery | None = None
        # Directory walks: the position of the subdirectory opened last, per parent.
        self._walks: dict[str, int] = {}
        self._walk_limiter = trio.CapacityLimiter(_WALK_LISTINGS)
        # Keys warned about (bounded: a listing of millions of bad names must not grow
        # it without end; a key forgotten is warned about again).
        self._warned: LRUCache[str, bool] = LRUCache(maxsize=4096)
        self.list_requests = 0

    def attach(self, nursery: trio.Nursery) -> None:
        """Let listings that lookups started finish in the background (in *nursery*)."""
        self._nursery = nursery

    # ---------------------------------------------------------------- keys

    def key_of(self, path: str) -> str:
        return self.prefix + path

    def _dir_prefix(self, path: str) -> str:
        return self.prefix + (path + "/" if path else "")

    def _warn_once(self, key: str, why: str) -> None:
        if key not in self._warned:
            self._warned[key] = True
            log.warning("skipping %s://%s/%s: %s", self.scheme, self.bucket, key, why)

    # ---------------------------------------------------------------- inodes

    def node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFoundError(404, "NoSuchInode", f"inode {inode} is unknown") from None

    def listed_files(self, path: str) -> tuple[list[str], dict[str, int]] | None:
        """Names of the files of directory *path* in listing order, with their positions.

        Only what a listing already brought (None if the directory was not listed).
        """
        listing = self._listings.get(path)
        if listing is None:
            return None
        if listing.files is None or listing.positions is None:
            listing.files = [e.name for e in listing.entries.values() if not e.is_dir]
            listing.positions = {name: i for i, name in enumerate(listing.files)}
        return listing.files, listing.positions

    def listed_meta(self, path: str, name: str) -> ObjectMeta | None:
        listing = self._listings.get(path)
        entry = listing.entries.get(name) if listing is not None else None
        return entry.meta if entry is not None else None

    def _node_for(self, path: str, entry: _Entry) -> Node:
        now = time.monotonic()
        inode = self._by_path.get(path)
        if inode is not None:
            node = self._nodes[inode]
            if node.is_dir == entry.is_dir and _same_version(node.meta, entry.meta):
                if entry.meta is not None:
                    node.meta, node.seen = entry.meta, now
                return node
            # The key changed kind (file <-> directory), or the object is another
            # version: a new inode. An inode is one version for good, so the kernel
            # never shares page-cache pages between versions; the old inode lives on
            # (with its old metadata) while the kernel still holds it.
            del self._by_path[path]
        inode = self._next_inode
        self._next_inode += 1
        node = Node(inode, path, entry.is_dir, entry.meta, now)
        self._nodes[inode] = node
        self._by_path[path] = inode
        return node

    def remember(self, parent: Node, entry: _Entry) -> Node:
        path = f"{parent.path}/{entry.name}" if parent.path else entry.name
        return self._node_for(path, entry)

    def forget(self, inode: int, count: int) -> None:
        node = self._nodes.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self._nodes[inode]
            if self._by_path.get(node.path) == inode:
                del self._by_path[node.path]

    @property
    def inode_count(self) -> int:
        return len(self._nodes)

    # ---------------------------------------------------------------- lookup

    async def lookup(self, parent_inode: int, name: str) -> Node:
        """Find *name* in a directory; raise NotFoundError when it is not there."""
        parent = self.node(parent_inode)
        if not parent.is_dir:
            raise NotFoundError(404, "NotADirectory", parent.path)
        if name == ".":
            return parent
        if name == "..":
            return self.node(self._by_path.get(parent.path.rpartition("/")[0], ROOT_INODE))
        path = f"{parent.path}/{name}" if parent.path else name
        if not valid_name(name) or path in self._negative:
            raise NotFoundError(404, "NoSuchKey", path)
        listing = self._listings.get(parent.path)
        if listing is not None:
            entry = listing.entries.get(name)
            if entry is not None:
                return self.remember(parent, entry)
            if listing.complete:
                self._negative[path] = True
                raise NotFoundError(404, "NoSuchKey", path)
        found = await self._from_listing(parent.path, path, name)
        if found is _UNKNOWN:
            found = await self._probe(path, name)
        if found is None or found is _UNKNOWN:
            self._negative[path] = True
            raise NotFoundError(404, "NoSuchKey", path)
        return self.remember(parent, found)

    async def _from_listing(self, directory: str, path: str, name: str) -> _Entry | None:
        """Answer a lookup from the listing of *directory*, listing it if nobody has.

        One listing per directory: every lookup in a directory that is being listed
        waits for the same pages (nobody sends a request of their own). A lookup
        waits for one more page at most; a name the listing has not reached by
        then is probed (HEAD) while the listing goes on in the background, so the
        lookups after it are answered from the listing. None: the name is not
        there; `_UNKNOWN`: the listing cannot tell yet.
        """
        reader = self._filling.get(directory)
        if reader is None:
            if directory in self._listings:
                # Partly listed by a reader that stopped (an abandoned readdir).
                return _UNKNOWN
            reader = self._filling[directory] = DirReader(directory)
        key = self.key_of(path)
        waited = False
        while True:
            entry = reader.by_name.get(name)
            if entry is not None:
                return entry
            if reader.done or (reader.last_key is not None and reader.last_key > key + "/"):
                # The sorted listing went past both "name" and "name/": a file still
                # waiting behind another one (`_accept`) is decided too.
                return reader._pending_names.get(name)
            if waited:
                self._continue_in_background(reader)
                return _UNKNOWN
            await self._page(reader)
            waited = True

    def _continue_in_background(self, reader: DirReader) -> None:
        if self._nursery is None or reader.background or reader.done:
            return
        reader.background = True
        self._nursery.start_soon(self._finish_listing, reader)

    async def _finish_listing(self, reader: DirReader) -> None:
        try:
            if reader.ahead:
                async with self._walk_limiter:
                    while not reader.done:
                        await self._page(reader)
                return
            while not reader.done:
                await self._page(reader)
        except Exception as e:  # a lookup that needs it asks again (and sees the error)
            log.debug("listing %s in the background failed: %s", reader.path or "/", e)
        finally:
            reader.background = False

    async def _page(self, reader: DirReader) -> None:
        """Fetch *reader*'s next page; if another task is fetching it, wait for that."""
        if reader.error is not None:
            raise reader.error
        if reader.busy is not None:
            await reader.busy.wait()
            if reader.error is not None:
                raise reader.error
            return
        busy = reader.busy = trio.Event()
        try:
            await self._next_page(reader)
        except ListingError as e:
            # The same again for every waiter and later call, with no request; a later
            # open of the directory starts a new listing.
            reader.error = e
            if self._filling.get(reader.path) is reader:
                del self._filling[reader.path]
            raise
        finally:
            reader.busy = None
            busy.set()
            if reader.done and self._filling.get(reader.path) is reader:
                del self._filling[reader.path]

    async def _probe(self, path: str, name: str) -> _Entry | None:
        """Is *path* a directory (a prefix with something under it) or a file (an object)?"""
        key = self.key_of(path)
        found: dict[str, object] = {}

        async def as_dir() -> None:
            self.list_requests += 1
            page = await self.client.list_page(
                self.bucket, prefix=key + "/", delimiter="/", max_keys=1
            )
            found["dir"] = bool(page.objects or page.prefixes)

        async def as_file() -> None:
            try:
                found["file"] = await self.client.head(self.bucket, key)
            except NotFoundError:
                found["file"] = None
            except ServiceError as e:
                if not 300 <= e.status < 400:
                    raise
                # A redirect is not an object (e.g. a web server fronting a directory
                # of files redirects "dir" to "dir/"); the listing decides.
                found["file"] = None

        with unwrap_groups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(as_dir)
                nursery.start_soon(as_file)
        meta = found.get("file")
        if found.get("dir"):
            if isinstance(meta, ObjectMeta):
                self._warn_once(key, "it is also a directory prefix; the directory is shown")
            return _Entry(name, True, None)
        if isinstance(meta, ObjectMeta):
            return _Entry(name, False, meta)
        return None

    async def refresh(self, node: Node) -> Node:
        """Re-read a file's metadata when it is older than the TTL (before an open).

        Returns *node*, or the new node of its path when the object is another
        version now (the caller's inode then stays the old version's).
        """
        if node.is_dir or time.monotonic() - node.seen < self.ttl:
            return node
        meta = await self.client.head(self.bucket, self.key_of(node.path))
        if _same_version(node.meta, meta):
            node.meta, node.seen = meta, time.monotonic()
            return node
        return self._node_for(node.path, _Entry(node.name, False, meta))

    async def object_crc64(self, node: Node) -> int | None:
        """The service's CRC-64 of *node*'s version (a HEAD when the listing had none);
        None when the service keeps none. ObjectChangedError when the object is
        another version now: nothing to compare *node*'s bytes with, which is not
        the same as a service without CRCs."""
        meta = node.meta
        if meta is None:
            return None
        if meta.crc64 is None:
            fresh = await self.client.head(self.bucket, meta.key)
            if not _same_version(meta, fresh):
                raise ObjectChangedError(
                    412, "ObjectChanged", "another version now", resource=self.url(meta.key)
                )
            node.meta = meta = fresh
        return meta.crc64

    # ---------------------------------------------------------------- readdir

    def open_dir(self, inode: int) -> DirReader:
        """A reader of the directory's listing: the complete one, the one being
        built (shared with lookups and other readers: its offsets only grow), or
        a new one."""
        node = self.node(inode)
        if node.path:
            self._walk_ahead(node.path)
        listing = self._listings.get(node.path)
        if listing is not None and listing.complete:
            reader = DirReader(node.path)
            reader.entries = list(listing.entries.values())
            reader.by_name = listing.entries
            reader.done = True
            return reader
        filling = self._filling.get(node.path)
        if filling is None:
            filling = self._filling[node.path] = DirReader(node.path)
        return filling

    def _walk_ahead(self, path: str) -> None:
        """List the next subdirectories of a tree being walked, in the background.

        ``find``, ``grep -r``, ``du`` and ``cp -r`` open the subdirectories of a
        directory one after another in listing order, and each waits for its own
        listing. When a subdirectory is opened right after the one before it, the
        next `_WALK_AHEAD` ones are listed ahead (at most `_WALK_LISTINGS` at once);
        an open out of order lists nothing ahead.
        """
        parent, _, name = path.rpartition("/")
        listing = self._listings.get(parent)
        if listing is None or not listing.complete or self._nursery is None:
            return
        if listing.dirs is None or listing.dir_positions is None:
            listing.dirs = [e.name for e in listing.entries.values() if e.is_dir]
            listing.dir_positions = {n: i for i, n in enumerate(listing.dirs)}
        pos = listing.dir_positions.get(name)
        if pos is None:
            return
        last = self._walks.get(parent)
        self._walks[parent] = pos
        if len(self._walks) > 1024:
            self._walks.pop(next(iter(self._walks)))
        if last is None or not last < pos <= last + 2:
            return  # not (yet) a walk in order
        for sibling in listing.dirs[pos + 1 : pos + 1 + _WALK_AHEAD]:
            sub = f"{parent}/{sibling}" if parent else sibling
            if sub in self._listings or sub in self._filling:
                continue
            reader = self._filling[sub] = DirReader(sub)
            reader.ahead = True
            self._continue_in_background(reader)

    async def fill(self, reader: DirReader, upto: int) -> None:
        """Fetch listing pages until *reader* has more than *upto* entries or is done."""
        while len(reader.entries) <= upto and not reader.done:
            await self._page(reader)

    def url(self, key: str) -> str:
        """How the object or prefix *key* of this bucket is named to a user."""
        return object_url(self.scheme, self.bucket, key)

    def _resource(self, path: str) -> str:
        return self.url(self._dir_prefix(path))

    async def _next_page(self, reader: DirReader) -> None:
        prefix = self._dir_prefix(reader.path)
        if reader.guard is None:
            reader.guard = ListingGuard(self._resource(reader.path))
        self.list_requests += 1
        sent = reader.token
        page = await self.client.list_page(
            self.bucket, prefix=prefix, delimiter="/", continuation_token=sent
        )
        reader.guard.check(page, sent)
        # Every key counts, also those that give no entry (invalid names): a listing
        # of nothing but such keys must end too.
        reader.listed += len(page.objects) + len(page.prefixes)
        if reader.listed > self.max_dir_entries:
            raise ListingError(
                f"{self._resource(reader.path)} has more than "
                f"{self.max_dir_entries} entries, the most one directory of "
                "the mount may hold (--max-dir-entries)"
            )
        items: list[tuple[str, _Entry]] = []
        for obj in page.objects:
            name = obj.key[len(prefix) :]
            if not obj.key.startswith(prefix) or name == "":
                continue  # the directory's own marker object
            if "/" in name:
                continue  # cannot happen with a delimiter; be safe with odd servers
            items.append((obj.key, _Entry(name, False, obj)))
        for p in page.prefixes:
            name = p[len(prefix) :].rstrip("/")
            if not p.startswith(prefix):
                continue
            items.append((p, _Entry(name, True, None)))
        items.sort(key=lambda t: t[0])
        for key, entry in items:
            self._accept(reader, key, entry)
        if items:
            reader.last_key = max(reader.last_key or "", items[-1][0])
        reader.pages += 1
        reader.token = page.next_token
        if reader.token is None:
            for _, _, pending in sorted(reader._pending):
                if reader._pending_names.get(pending.name) is pending:
                    self._emit(reader, pending)
            reader._pending.clear()
            reader._pending_names.clear()
            reader.done = True
            self._listings[reader.path] = _Listing(reader.by_name, True)
        else:
            partial = self._listings.get(reader.path)
            if partial is None or not partial.complete:
                self._listings[reader.path] = _Listing(reader.by_name, False)

    def _accept(self, reader: DirReader, key: str, entry: _Entry) -> None:
        # A file "x" waits until no "x/" prefix can follow: keys sort, and "x/" comes
        # after every "x<c>" with c < "/". Usually the very next item settles it; files
        # "x-1", "x.json" that sort before "x/" wait too, each until the listing passes
        # its own "x-1/" (not behind "x").
        while reader._pending and reader._pending[0][0] < key:
            _, _, pending = heapq.heappop(reader._pending)
            if reader._pending_names.get(pending.name) is pending:
                del reader._pending_names[pending.name]
                self._emit(reader, pending)
        if not valid_name(entry.name):
            self._warn_once(key, "the name is not a valid file name")
            return
        if entry.is_dir:
            shadowed = reader._pending_names.pop(entry.name, None)
            if shadowed is not None:  # (its heap item is skipped when it comes up)
                self._warn_once(key[:-1], "it is also a directory prefix; the directory is shown")
            self._emit(reader, entry)
        else:
            heapq.heappush(reader._pending, (key + "/", next(_ORDER), entry))
            reader._pending_names[entry.name] = entry

    def _emit(self, reader: DirReader, entry: _Entry) -> None:
        if entry.name in reader.by_name:
            return
        reader.by_name[entry.name] = entry
        reader.entries.append(entry)

    def iter_entries(self, reader: DirReader, start: int) -> Iterator[tuple[int, _Entry]]:
        for i in range(start, len(reader.entries)):
            yield i, reader.entries[i]
