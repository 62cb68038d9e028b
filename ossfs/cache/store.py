"""A part store: the bytes of one object range in a sparse data file, plus its index.

The same class backs the mount's cache (data and index inside the cache
directory) and ``ossfs download`` (the data file is the destination's temp
file, the index is the checkpoint). Bytes are written at their offset; a part
is recorded in the index only after all its bytes were written, together with
its CRC-64. On opening, an index that is corrupt, foreign (another object or
part size) or stale (the object changed) is discarded, with the reason given
to the caller, and none of its parts are trusted.

Writes are not fsynced part by part (that would halve throughput). Instead
every recorded part carries its CRC: a part whose bytes did not reach the disk
before a power loss fails `verify` and is fetched again. Downloads verify all
recorded parts when they resume; the cache verifies a part the first time a
process reads it.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn

from ossfs.cache.index import IndexCorrupt, IndexFile, PartRecord, StoreIdentity
from ossfs.cache.memory import MemoryBudget, MemoryParts
from ossfs.crc import crc64, crc64_of_parts
from ossfs.errors import IntegrityError
from ossfs.fsutil import open_private_file, pwrite_all, start_writeback, unlink_quietly

__all__ = ["PartStore", "describe_mismatch", "Discarded"]

log = logging.getLogger(__name__)

# How much of a part to read at once when verifying it.
_VERIFY_CHUNK = 4 << 20
# Parts at least this large start their writeback as soon as they are complete.
_EARLY_WRITEBACK = 1 << 20
EARLY_WRITEBACK = _EARLY_WRITEBACK


@dataclass(frozen=True, slots=True)
class Discarded:
    """Why an existing index was not used."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def describe_mismatch(old: StoreIdentity, new: StoreIdentity) -> str:
    """Explain in a few words why index *old* cannot serve *new*."""
    if (old.bucket, old.key) != (new.bucket, new.key):
        # The identity has no scheme (oss:// or s3://): name the key and the bucket.
        return f"it belongs to another object (key {old.key} in bucket {old.bucket})"
    if (old.etag, old.size) != (new.etag, new.size):
        return (
            f"the object changed since it was written (ETag {old.etag}, {old.size} bytes "
            f"then; ETag {new.etag}, {new.size} bytes now)"
        )
    if old.part_size != new.part_size:
        return f"it was made with part size {old.part_size}, this run uses {new.part_size}"
    return (
        f"it covers bytes {old.start}-{old.start + old.length - 1}, this run wants "
        f"{new.start}-{new.start + new.length - 1}"
    )


class PartStore:
    """Bytes ``[identity.start, identity.start + identity.length)`` of an object version."""

    def __init__(
        self, identity: StoreIdentity, data_path: str, data_fd: int, index: IndexFile | None
    ) -> None:
        self.identity = identity
        self.layout = identity.layout
        self.data_path = data_path
        self._fd = data_fd
        self._index = index
        # Parts that need no index (checkpoints off) are tracked here instead.
        self._parts: dict[int, PartRecord] = index.state.parts if index else {}
        # Parts whose bytes this process has checked against their CRC (or wrote itself).
        self.verified: set[int] = set()
        # The whole object's CRC-64 as the service published it (OSS), once seen.
        self.server_crc64: int | None = None
        # True once the parts' CRCs (recorded, or served from memory) matched
        # server_crc64, and none has changed since.
        self.crc_checked = False
        # Fetches writing into this store right now; closing waits for them (a closed
        # descriptor's number can be reused by another file at once).
        self.flights = 0
        self._close_when_idle = False
        # Called once a close deferred for running fetches has happened (the cache
        # trims itself then: those fetches may have taken it over its cap).
        self.on_deferred_close: Callable[[], None] | None = None
        # Parts a mount fetched into memory while the cache disk was behind
        # (ossfs.cache.memory): read from there, never recorded in the index.
        self.memory: MemoryParts | None = None
        # The CRC-64 of what arrived for each part served from memory and not recorded,
        # for the whole-object check (`note_served`): 9 bytes per part of the object,
        # made when the first such part is complete.
        self._served: array[int] | None = None
        self._served_known = bytearray()
        self._served_count = 0

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        identity: StoreIdentity,
        data_path: str,
        index_path: str | None,
        *,
        data_mode: int = 0o600,
        on_discard: Callable[[Discarded], None] | None = None,
        shared: bool = False,
    ) -> PartStore:
        """Open (or create) the store; reuse the index when it matches *identity*.

        *index_path* None means no checkpoint: the data file starts empty.
        *shared* (the cache) keeps an index another process creates at the same
        moment instead of replacing it.

        The data file's bytes are kept only with a usable index (they are what it
        records), or in a shared cache when there is no index yet (another process
        may be creating it with its first parts); otherwise it is emptied.
        """
        found = _load_index(identity, data_path, index_path)
        if isinstance(found, _Refused) and found.why is not None:
            _report(on_discard, found.why)
        index = found if isinstance(found, IndexFile) else None
        # Refused, nothing of the old index or its data is trusted, even in a shared cache.
        fresh = isinstance(found, _Refused) or (index is None and not shared)
        fd = open_private_file(data_path, os.O_RDWR | os.O_CREAT, data_mode)
        try:
            _prepare_data(fd, identity.length, index_path, empty_first=fresh)
            if index is None and index_path is not None:
                index = IndexFile.create(index_path, identity, replace=fresh)
        except BaseException:
            os.close(fd)
            if index is not None:
                index.close()
            raise
        return cls(identity, data_path, fd, index)

    def close(self) -> None:
        """Close the files, or as soon as the last fetch into the store ends."""
        if self.flights > 0:
            self._close_when_idle = True
            return
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._index is not None:
            self._index.close()

    def flight_started(self) -> None:
        self.flights += 1

    def flight_ended(self) -> None:
        self.flights -= 1
        if self.flights == 0 and self._close_when_idle:
            self._close_when_idle = False
            self.close()
            if self.on_deferred_close is not None:
                self.on_deferred_close()

    def index_mark(self) -> tuple[int, ...]:
        """`IndexFile.mark`; empty for a store without an index (its records live in
        its one file, which another process replaces rather than changes)."""
        return self._index.mark() if self._index is not None else ()

    @property
    def index_path(self) -> str | None:
        return self._index.path if self._index else None

    def fileno(self) -> int:
        return self._fd

    # ---------------------------------------------------------------- state

    @property
    def parts(self) -> dict[int, PartRecord]:
        return self._parts

    def is_present(self, part: int) -> bool:
        """Whether *part* is recorded: its bytes are in the data file, with their CRC."""
        return part in self._parts

    def has(self, part: int) -> bool:
        """Whether *part* can be read now: recorded, or kept in memory."""
        return part in self._parts or (self.memory is not None and self.memory.is_kept(part))

    def memory_parts(self, budget: MemoryBudget) -> MemoryParts:
        """The store's parts in memory (made on first use)."""
        if self.memory is None:
            self.memory = MemoryParts(self, budget)
        return self.memory

    def missing(self) -> list[int]:
        return [i for i in range(self.layout.count) if i not in self._parts]

    @property
    def complete(self) -> bool:
        return len(self._parts) == self.layout.count

    @property
    def present_bytes(self) -> int:
        return sum(r.length for r in self._parts.values())

    def refresh(self) -> None:
        """See parts that other processes recorded since the last look."""
        if self._index is not None:
            self._index.refresh()
            self._parts = self._index.state.parts
            self._settle_foreign()

    # ---------------------------------------------------------------- data

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write object bytes starting at object offset *offset*."""
        pwrite_all(self._fd, data, offset - self.identity.start)

    def read(self, offset: int, size: int) -> bytes:
        """Read object bytes ``[offset, offset+size)`` from the data file."""
        return os.pread(self._fd, size, offset - self.identity.start)

    def read_into(self, offset: int, view: memoryview, *, nowait: bool = False) -> int:
        """Read object bytes at *offset* into *view*; return how many were read.

        With *nowait*, only what the page cache holds (BlockingIOError if nothing).
        Parts held in memory are read from there.
        """
        flags = os.RWF_NOWAIT if nowait else 0
        memory = self.memory
        if memory is None or not memory.state:
            return os.preadv(self._fd, [view], offset - self.identity.start, flags)
        done = 0
        for part in self.layout.parts_for(offset, len(view)):
            first, end = self.layout.bounds(part)
            a, b = max(first, offset), min(end, offset + len(view))
            piece = view[a - offset : b - offset]
            if memory.holds(part) and part not in self._parts:
                n = memory.read_into(a, piece)
            else:
                n = os.preadv(self._fd, [piece], a - self.identity.start, flags)
            done += n
            if n < len(piece):
                break
        return done

    def commit(self, part: int, crc: int) -> None:
        """Record *part* as complete; its bytes must already be written."""
        if not self._recorded_over_served(part, crc):
            self.crc_checked = False  # (its CRC was not known before: only after a drop)
        record = PartRecord(self.layout.part_length(part), crc)
        if self._index is not None:
            self._index.add(part, record)
            self._parts = self._index.state.parts
            self._settle_foreign()
        else:
            self._parts[part] = record
        self.verified.add(part)

    def note_served(self, part: int, crc: int) -> None:
        """A part fetched into memory is complete; *crc* is the CRC-64 of what arrived.
        Kept after its bytes are released, so that the whole-object check can cover
        the parts a reader was served from memory (`crc_known`)."""
        if self._served is None:
            self._served = array("Q", bytes(8 * self.layout.count))
            self._served_known = bytearray(self.layout.count)
        if part in self._parts:
            # Recorded meanwhile by another process: the record speaks for the part,
            # and the copy in memory is not read again (`MemoryParts.retire`).
            if self.memory is not None:
                self.memory.retire(part)
            return
        if not self._served_known[part]:
            self._served_known[part] = 1
            self._served_count += 1
            self.crc_checked = False  # (not known before: only after a release)
        elif self._served[part] != crc:
            self.crc_checked = False
        self._served[part] = crc

    def _settle_foreign(self) -> None:
        """After a look at the index: the parts other processes recorded meanwhile.

        - Each is checked on its first read here, as any part another process
          cached (out of `verified`, where an earlier record of it may have put it).
        - One served from memory here: its record speaks for it now (a part is never
          counted as both), and a check that passed with another CRC for it no
          longer holds.
        - One that was not: a check that passed covered an earlier record of it
          (the part was dropped and fetched again there), so it no longer holds.

        Only those parts are looked at; after a compaction (which rewrites the
        records, usually the same ones), only the served parts are, all of them.
        """
        index = self._index
        if index is None or not (index.foreign_parts or index.foreign_all):
            return
        known = self._served_known
        for p in index.foreign_parts:
            self.verified.discard(p)
            if not (known and known[p]):
                self.crc_checked = False
        if self._served_count:
            self._settle_served(None if index.foreign_all else index.foreign_parts)
        index.foreign_parts.clear()
        index.foreign_all = False

    def _settle_served(self, parts: Iterable[int] | None) -> None:
        known = self._served_known
        if parts is None:
            parts = [p for p in range(len(known)) if known[p]]
        for p in parts:
            record = self._parts.get(p)
            if record is not None:
                self._recorded_over_served(p, record.crc64)

    def _recorded_over_served(self, part: int, crc: int) -> bool:
        """*part*, served from memory, is recorded now with CRC *crc*: the record speaks
        for it (a part is never counted as both), a check that passed with another CRC
        for it no longer holds, and the copy in memory is not read again
        (`MemoryParts.retire`). False when it was not served."""
        if not (self._served_known and self._served_known[part]):
            return False
        assert self._served is not None
        if self._served[part] != crc:
            self.crc_checked = False
        self._served_known[part] = 0
        self._served_count -= 1
        if self.memory is not None:
            self.memory.retire(part)
        return True

    def forget_served(self) -> None:
        """Trust no CRC of a part served from memory (the whole did not match)."""
        self._served = None
        self._served_known = bytearray()
        self._served_count = 0

    @property
    def crc_known(self) -> bool:
        """Whether every part's CRC-64 is known: recorded in the index (`complete`), or
        of what arrived for a part served from memory (`note_served`)."""
        # (No part is counted as both: `commit`, `note_served` and `_settle_foreign`.)
        return len(self._parts) + self._served_count == self.layout.count

    def _part_crc(self, part: int) -> int:
        record = self._parts.get(part)
        if record is not None:
            return record.crc64
        if self._served is None or not self._served_known[part]:
            raise ValueError(f"part {part}'s CRC-64 is not known")
        return int(self._served[part])

    def drop(self, parts: Iterable[int]) -> None:
        """Forget *parts* (their bytes are no longer trusted or were evicted)."""
        parts = [p for p in parts if p in self._parts]
        if self._index is not None:
            self._index.drop(parts)
            self._parts = self._index.state.parts
            self._settle_foreign()
        else:
            for p in parts:
                self._parts.pop(p, None)
        self.verified.difference_update(parts)
        if parts:
            self.crc_checked = False

    def part_crc_on_disk(self, part: int) -> int:
        first, end = self.layout.bounds(part)
        crc = 0
        pos = first
        while pos < end:
            chunk = self.read(pos, min(_VERIFY_CHUNK, end - pos))
            if not chunk:
                break  # the file is shorter than it should be: the CRC will not match
            crc = crc64(chunk, crc)
            pos += len(chunk)
        return crc

    def verify(self, part: int) -> bool:
        """Check the bytes of a recorded part against its CRC (blocking I/O)."""
        record = self._parts.get(part)
        if record is None:
            return False
        ok = self.part_crc_on_disk(part) == record.crc64
        if ok:
            self.verified.add(part)
        return ok

    def failing_parts(self, parts: Iterable[int]) -> list[int]:
        """The recorded parts of *parts* whose bytes fail their CRC (`verify`: reads
        them all, blocking I/O, for a worker thread)."""
        return [p for p in parts if not self.verify(p)]

    def combined_crc(self) -> int:
        """CRC-64 of the whole range; every part's must be known (`crc_known`)."""
        if not self.crc_known:
            raise ValueError("not every part's CRC-64 is known")
        layout = self.layout
        return crc64_of_parts(
            (self._part_crc(i), layout.part_length(i)) for i in range(layout.count)
        )

    def check_crc(self) -> bool:
        """Compare the complete range with the service's whole-object CRC-64.

        True when it matched, False when there is nothing to compare with (no
        CRC from the service, or a store that is not the whole object). On a
        mismatch every part is dropped and IntegrityError is raised
        (`drop_mismatched`).
        """
        actual = self.whole_crc_mismatch()
        if actual is None:
            return self.crc_checked
        self.drop_mismatched(actual)

    def whole_crc_mismatch(self) -> int | None:
        """The combined CRC-64 of the parts when it differs from the service's, else None
        (matched: `crc_checked` is set; or nothing to compare with). No I/O."""
        ident = self.identity
        if (
            self.server_crc64 is None
            or ident.start != 0
            or ident.length != ident.size
            or self.crc_checked
        ):
            return None
        try:
            actual = self.combined_crc() if self.layout.count else 0
        except ValueError:
            return None  # (not every part's CRC is known: nothing to compare yet)
        if actual == self.server_crc64:
            self.crc_checked = True
            return None
        return actual

    def drop_mismatched(self, actual: int) -> NoReturn:
        """After a whole-object mismatch: drop every part, forget the CRCs of parts
        served from memory and let go of those still kept; raise IntegrityError.

        The combined CRC is made of the parts' records (and served CRCs), which are
        the CRCs of the bytes as they arrived: a mismatch says some part arrived
        wrong (or the object is another one now), and its record matches its wrong
        bytes, so no part can be told apart. (A part damaged on disk since would not
        change the combined CRC: each process checks such parts against their
        record on first read.) No I/O but the index append."""
        ident = self.identity
        bad = list(self._parts)
        self.drop(bad)
        served = ""
        if self._served_count:
            served = f" ({self._served_count} more had been served from memory)"
            self.forget_served()
        if self.memory is not None:
            self.memory.distrust()
        raise IntegrityError(
            f"{ident.bucket}/{ident.key}: CRC-64 mismatch (the service says "
            f"{self.server_crc64}, the fetched bytes give {actual}); dropped {len(bad)} "
            f"part(s){served}, run again to fetch them"
        )

    def start_writeback(self, parts: Iterable[int]) -> None:
        """Start writing *parts* to disk now (see `ossfs.fsutil.start_writeback`), a run
        of consecutive parts in one call.

        Only for parts of 1 MiB or more: early writeback keeps a large transfer
        from piling up dirty pages; for small files it would only add I/O.
        """
        big = [p for p in parts if self.layout.part_length(p) >= _EARLY_WRITEBACK]
        for first, end in self.layout.spans(big):
            start_writeback(self._fd, first - self.identity.start, end - first)

    def drop_pages(self, parts: Iterable[int]) -> None:
        """Let the kernel drop its page cache of *parts* (``POSIX_FADV_DONTNEED``): the
        bytes stay on disk; dirty pages are written back first, not lost.

        For parts a stream has read through: the reader keeps its own copy in the page
        cache of the file it read (the mount's), and keeping this one too doubles what
        a long sequential read puts in memory. Blocking (it may start writeback). A run
        of consecutive parts is one call: on a cold 1 GiB read of 1 MiB parts this
        function took 7.7% of the daemon's CPU samples with one call per part, 4.7%
        with one per run (py-spy)."""
        for first, end in self.layout.spans(parts):
            try:
                os.posix_fadvise(
                    self._fd, first - self.identity.start, end - first, os.POSIX_FADV_DONTNEED
                )
            except OSError as e:  # only advice
                log.debug("cannot drop the pages of %d-%d of %s: %s", first, end, self.data_path, e)

    def try_lock_part(self, part: int) -> bool:
        """Claim *part* for fetching across processes; False when another process has it."""
        first, end = self.layout.bounds(part)
        return _ofd_lock(self._fd, first - self.identity.start, end - first, fcntl.F_WRLCK)

    def unlock_part(self, part: int) -> None:
        first, end = self.layout.bounds(part)
        _ofd_lock(self._fd, first - self.identity.start, end - first, fcntl.F_UNLCK)

    def try_lock_upgrade(self) -> bool:
        """Claim the right to try to take the store for this process alone (see
        `CacheDir._evict_parts`); False when another process is trying now."""
        return _ofd_lock(self._fd, UPGRADE_BYTE, 1, fcntl.F_WRLCK)

    def unlock_upgrade(self) -> None:
        _ofd_lock(self._fd, UPGRADE_BYTE, 1, fcntl.F_UNLCK)

    def sync(self) -> None:
        os.fsync(self._fd)

    def compact(self) -> None:
        if self._index is not None and self._index.compact_if_worthwhile():
            self._parts = self._index.state.parts
            self._settle_foreign()  # (it may have followed another process's records)

    def remove_index(self) -> None:
        """Delete the index file (after a successful download)."""
        if self._index is not None:
            path = self._index.path
            self._index.close()
            self._index = None
            unlink_quietly(path)


# struct flock on Linux x86_64/aarch64: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhxxxxqqixxxx")


# A byte far past the end of any object: its OFD lock serializes the attempts of
# processes to turn their shared flock of a store into an exclusive one. A failed
# conversion drops the shared lock for a moment (flock(2) unlocks first); without
# this, a second process could convert in that moment and punch parts the first one
# is reading.
UPGRADE_BYTE = 1 << 62


def _ofd_lock(fd: int, start: int, length: int, kind: int) -> bool:
    """Set or clear an open-file-description lock on a byte range without waiting.

    OFD locks belong to the open file, not the process: they do not vanish
    when some other descriptor of the file is closed, and they are released by
    the kernel when their holder dies, so a killed fetcher never blocks others.
    """
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@dataclass(frozen=True, slots=True)
class _Refused:
    """An index exists but may not be used. *why* is None when there is nothing to tell
    (it recorded no parts)."""

    why: Discarded | None


def _load_index(
    identity: StoreIdentity, data_path: str, index_path: str | None
) -> IndexFile | _Refused | None:
    """The index at *index_path* when it may serve *identity*, or why not.

    None: there is no index (or no checkpoint at all). `_Refused`: one exists, but
    it is corrupt, describes another object, version, part size or range, or its
    data file is gone; it has been closed.
    """
    if index_path is None:
        return None
    try:
        index = IndexFile.load(index_path)
    except IndexCorrupt as e:
        return _Refused(Discarded(index_path, f"it is corrupt ({e})"))
    if index is None:
        return None
    refused: _Refused | None = None
    if index.state.identity != identity:
        refused = _Refused(Discarded(index_path, describe_mismatch(index.state.identity, identity)))
    elif not os.path.exists(data_path):
        refused = _Refused(
            Discarded(index_path, f"its data file {data_path} is missing")
            if index.state.parts
            else None
        )
    if refused is not None:
        index.close()
        return refused
    return index


def _prepare_data(fd: int, length: int, index_path: str | None, *, empty_first: bool) -> None:
    """Give the data file *fd* its length; with *empty_first*, remove the old index and
    empty the file before (no byte of it is trusted)."""
    if empty_first:
        # Drop the old index before touching the data it describes.
        if index_path is not None:
            unlink_quietly(index_path)
        os.ftruncate(fd, 0)
    if os.fstat(fd).st_size != length:
        os.ftruncate(fd, length)


def _report(callback: Callable[[Discarded], None] | None, what: Discarded) -> None:
    log.info("discarding index %s", what)
    if callback is not None:
        callback(what)
