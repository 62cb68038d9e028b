"""A small object in the cache: one file holding the whole object and its CRC.

An object that fits in one part needs no directory and no journal. Its cache
entry is one file, ``objects/ab/<sha256>.o``, published complete in one step::

    <the object's bytes> <trailer: JSON identity and CRC-64> <footer, 31 bytes>

    footer = b"%08x %08x ossfs-small1\\n" % (len(trailer), crc32(trailer))

- **Create**: the bytes are written to an unnamed file in the shard directory
  (``O_TMPFILE``), then the trailer; `commit` links it under its name. Until
  that link nothing is visible; after it, the file is complete. (Where the
  file system has no ``O_TMPFILE``, a named ``.tmp-*`` file is renamed into
  place; one left by a crash is removed by eviction.)
- **Find**: open the name and read the footer and trailer; an identity that
  differs, a bad checksum or a short file (a torn write after a power loss)
  is discarded with a message.
- **Evict**: unlink the name (under ``flock(LOCK_EX)``, which fails while any
  process has it open: every process holds ``LOCK_SH`` on the files it uses).
  A reader's open descriptor keeps the bytes it reads whatever happens to the
  name.
- **Verify**: the CRC-64 in the trailer is checked the first time a process
  reads the object, as a part of a multi-part store is; a mismatch drops the
  file and the object is fetched again.

The name is a hash of (bucket, key, ETag, size) only, so mounts and
``materialize`` runs with different part sizes share the file.

`SmallStore` is a `PartStore` with one part: the fetcher, the read path and
``materialize`` use it unchanged. Parts are part 0 only.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from ossfs.cache.index import PartRecord, StoreIdentity
from ossfs.cache.store import Discarded, PartStore, describe_mismatch
from ossfs.fsutil import open_private_file, pwrite_all

__all__ = [
    "SmallStore",
    "small_name",
    "read_trailer",
    "SmallTrailer",
    "SUFFIX",
    "TMP_PREFIX",
    "make_unnamed",
    "remove_small",
]

log = logging.getLogger(__name__)

SUFFIX = ".o"
# Named temp files (only where O_TMPFILE is unsupported) start with this.
TMP_PREFIX = ".tmp-"
_FOOTER_LEN = 31
_FOOTER_MAGIC = b" ossfs-small1\n"
_MAX_TRAILER = 1 << 16
# An unpublished entry looks for one another process published at most this often.
_LOOK_INTERVAL = 1.0


@lru_cache(maxsize=65536)
def small_name(identity: StoreIdentity) -> str:
    """The file name (without directory) of a small object's cache entry."""
    blob = json.dumps(
        {
            "small": 1,
            "bucket": identity.bucket,
            "key": identity.key,
            "etag": identity.etag,
            "size": identity.size,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return hashlib.sha256(blob).hexdigest() + SUFFIX


@dataclass(frozen=True, slots=True)
class SmallTrailer:
    bucket: str
    key: str
    etag: str
    size: int
    crc64: int
    # The CRC-64 matched the one the service sent with the object when it was fetched.
    checked: bool = False


def _encode_trailer(identity: StoreIdentity, crc: int, checked: bool) -> bytes:
    doc: dict[str, object] = {
        "bucket": identity.bucket,
        "key": identity.key,
        "etag": identity.etag,
        "size": identity.size,
        "crc64": f"{crc:016x}",
    }
    if checked:
        doc["checked"] = True
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    footer = b"%08x %08x" % (len(body), zlib.crc32(body)) + _FOOTER_MAGIC
    assert len(footer) == _FOOTER_LEN
    return body + footer


def read_trailer(fd: int, file_size: int) -> SmallTrailer | str:
    """The trailer of an open small-object file, or why it has none that holds."""
    if file_size < _FOOTER_LEN:
        return "it is shorter than its footer (torn)"
    footer = os.pread(fd, _FOOTER_LEN, file_size - _FOOTER_LEN)
    if len(footer) != _FOOTER_LEN or not footer.endswith(_FOOTER_MAGIC):
        return "its footer is damaged (torn)"
    try:
        length, crc = int(footer[:8], 16), int(footer[9:17], 16)
    except ValueError:
        return "its footer is damaged"
    start = file_size - _FOOTER_LEN - length
    if length > _MAX_TRAILER or start < 0:
        return "its footer is damaged"
    body = os.pread(fd, length, start)
    if len(body) != length or zlib.crc32(body) != crc:
        return "its trailer is damaged"
    try:
        doc = json.loads(body)
        trailer = SmallTrailer(
            str(doc["bucket"]),
            str(doc["key"]),
            str(doc["etag"]),
            int(doc["size"]),
            int(doc["crc64"], 16),
            doc.get("checked") is True,
        )
    except (ValueError, KeyError, TypeError):
        return "its trailer is damaged"
    if trailer.size != start:
        return "its length does not match its trailer (torn)"
    return trailer


class SmallStore(PartStore):
    """The cache entry of an object of at most one part (see the module docstring)."""

    def __init__(
        self,
        identity: StoreIdentity,
        path: str,
        fd: int,
        published: bool,
        record: PartRecord | None,
        checked: bool = False,
    ) -> None:
        super().__init__(identity, path, fd, None)
        self._published = published
        # The bytes matched the service's CRC-64 when they were fetched (trailer): the
        # first read still checks them against their own CRC, no HEAD is needed.
        self.crc_checked = checked and record is not None
        # The named temp file being fetched into (only without O_TMPFILE).
        self._temp_path: str | None = None
        # When the name was last looked for (`refresh`).
        self._looked = 0.0
        self._retired: list[int] = []
        if record is not None and self.layout.count:
            self._parts[0] = record

    # ---------------------------------------------------------------- opening

    @classmethod
    def find(
        cls,
        identity: StoreIdentity,
        path: str,
        *,
        on_discard: Callable[[Discarded], None] | None = None,
    ) -> SmallStore | None:
        """The published entry at *path*, locked for sharing; None when there is none.

        Cheap (an open and two reads): creating an entry is not (a new inode costs
        up to 200 us on a journaling file system), so that is `open_small`'s job.
        """
        found = _open_published(identity, path, on_discard)
        if found is None:
            return None
        fd, record, checked = found
        return cls(identity, path, fd, True, record, checked)

    @classmethod
    def open_small(
        cls,
        identity: StoreIdentity,
        path: str,
        *,
        looked: bool = False,
        spare: int | None = None,
        on_discard: Callable[[Discarded], None] | None = None,
    ) -> SmallStore:
        """Find the entry at *path* or start an unpublished one; lock it for sharing.

        *looked*: the caller found no entry just now (`find`); no second look.
        *spare*: an unnamed file made ahead (`make_unnamed`) to fetch into.
        """
        if not looked:
            found = cls.find(identity, path, on_discard=on_discard)
            if found is not None:
                return found
        fd, temp = (spare, None) if spare is not None else _new_temp(path)
        store = cls(identity, path, fd, False, None)
        store._temp_path = temp
        store._looked = time.monotonic()
        if not store.layout.count:
            # An empty object has nothing to fetch: it is complete, and cached, at once.
            try:
                store._write_trailer(0, False)
                store._publish()
            except BaseException:
                store.close()
                raise
        return store

    # ---------------------------------------------------------------- state

    def refresh(self) -> None:
        """See an entry another process published since this one was opened (looked for
        at most once a second: a fetch right after opening does not look again)."""
        if self._parts or not self.layout.count or self.flights:
            return  # (never swap the file under a running fetch: readers read it)
        now = time.monotonic()
        if now - self._looked < _LOOK_INTERVAL:
            return
        self._looked = now
        found = _open_published(self.identity, self.data_path, None)
        if found is None:
            return
        fd, record, checked = found
        self.crc_checked = checked
        if self._temp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp_path)
            self._temp_path = None
        self._retire()
        self._fd = fd
        self._published = True
        self._parts[0] = record

    @property
    def published(self) -> bool:
        return self._published

    def commit(self, part: int, crc: int) -> None:
        """Write the trailer and publish the file under its name: one link."""
        if part != 0 or not self.layout.count:
            raise IndexError(part)
        checked = self.server_crc64 is not None and self.server_crc64 == crc
        self._write_trailer(crc, checked)
        if not self._published:
            self._publish()
        self._parts[0] = PartRecord(self.identity.size, crc)
        self.verified.add(0)

    def _write_trailer(self, crc: int, checked: bool) -> None:
        pwrite_all(self._fd, _encode_trailer(self.identity, crc, checked), self.identity.size)

    def _publish(self) -> None:
        temp = self._temp_path
        try:
            if temp is None:
                # linkat(AT_SYMLINK_FOLLOW) of the descriptor's /proc link (os.link
                # calls plain link() unless a directory descriptor is given).
                os.link(str(self._fd), self.data_path, src_dir_fd=_proc_fds(), follow_symlinks=True)
            else:
                os.rename(temp, self.data_path)
                self._temp_path = None
            self._published = True
        except FileExistsError:
            # Another process published the same version meanwhile: theirs is in the
            # cache, this process reads its own (equal) copy until it closes it.
            log.debug("cache: %s was published by another process", self.data_path)

    def drop(self, parts: Iterable[int]) -> None:
        """Forget the object (evicted, or its bytes failed their CRC): the file goes."""
        if 0 not in list(parts) or 0 not in self._parts:
            return
        del self._parts[0]
        self.verified.discard(0)
        self.crc_checked = False
        if self._published:
            self._unlink_if_ours()
        # Later fetches write into a new file; the old one stays open (a reader may be
        # reading it) until the store closes.
        self._retire()
        self._fd, self._temp_path = _new_temp(self.data_path)
        self._published = False

    def _unlink_if_ours(self) -> None:
        try:
            same = os.stat(self.data_path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return
        if same:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.data_path)

    def _retire(self) -> None:
        if self._fd >= 0:
            self._retired.append(self._fd)
        self._fd = -1

    # ---------------------------------------------------------------- cross-process

    def try_lock_part(self, part: int) -> bool:
        # An unpublished file is this process's own: nobody else can write into it.
        # Two processes may fetch the same small object at once; the first link wins.
        return True

    def unlock_part(self, part: int) -> None:
        return None

    def compact(self) -> None:
        return None

    def close(self) -> None:
        if self.flights > 0:
            self._close_when_idle = True
            return
        temp = self._temp_path
        if temp is not None:
            self._temp_path = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        for fd in (self._fd, *self._retired):
            if fd >= 0:
                os.close(fd)
        self._fd = -1
        self._retired.clear()


def _open_published(
    identity: StoreIdentity, path: str, on_discard: Callable[[Discarded], None] | None
) -> tuple[int, PartRecord, bool] | None:
    """The published entry at *path* (descriptor locked shared, its record, and whether
    it matched the service's CRC-64), or None."""
    try:
        fd = open_private_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        size = os.fstat(fd).st_size
        trailer = read_trailer(fd, size)
        if isinstance(trailer, SmallTrailer):
            seen = StoreIdentity(
                trailer.bucket,
                trailer.key,
                trailer.etag,
                trailer.size,
                identity.part_size,
                0,
                trailer.size,
            )
            if seen == identity:
                return fd, PartRecord(trailer.size, trailer.crc64), trailer.checked
            why = describe_mismatch(seen, identity)
        else:
            why = trailer
        what = Discarded(path, why)
        log.info("discarding cache entry %s", what)
        if on_discard is not None:
            on_discard(what)
        _remove_unused(fd, path)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _remove_unused(fd: int, path: str) -> bool:
    """Unlink *path* (whose open descriptor is *fd*) unless some process uses it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a failed conversion dropped the shared lock
        return False
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
            return True
    except FileNotFoundError:
        pass
    return False


def remove_small(path: str) -> int:
    """Evict the entry at *path* unless a process holds it; the bytes freed (0: none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        blocks = os.fstat(fd).st_blocks * 512
        return blocks if _remove_unused(fd, path) else 0
    finally:
        os.close(fd)


_tmpfile_works = True
_proc_fd: tuple[int, int] = (-1, -1)  # (pid, descriptor of /proc/<pid>/fd)


def _proc_fds() -> int:
    """A descriptor of this process's /proc/<pid>/fd (reopened in a forked child)."""
    global _proc_fd
    pid = os.getpid()
    if _proc_fd[0] != pid:
        fd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        _proc_fd = (pid, fd)
    return _proc_fd[1]


def make_unnamed(directory: str, count: int) -> list[int]:
    """*count* unnamed files (``O_TMPFILE``) on the file system of *directory*, locked
    shared, to fetch small objects into later (any shard directory of that file
    system can link them). Empty where ``O_TMPFILE`` is unsupported."""
    fds: list[int] = []
    if not _tmpfile_works:
        return fds
    try:
        for _ in range(count):
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            fds.append(fd)
    except OSError as e:
        log.debug("cache: cannot make unnamed files in %s: %s", directory, e)
    return fds


def _new_temp(path: str) -> tuple[int, str | None]:
    """An unnamed file beside *path* to fetch into, locked shared (the lock stays with
    the file when `commit` links it); with its name where it must have one."""
    global _tmpfile_works
    directory = os.path.dirname(path)
    fd = -1
    temp: str | None = None
    if _tmpfile_works:
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            _tmpfile_works = False
            log.info("cache: %s has no O_TMPFILE; small objects use named temp files", directory)
    if fd < 0:
        temp = os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd, temp
