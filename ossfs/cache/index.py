"""The part index: an append-only journal that is also the download checkpoint.

Format (``docs/cache-format.md`` has the full story): UTF-8 text, one record
per line, every line ``<payload> <crc32 of payload, 8 hex>\\n``::

    ossfs-index 1 {"bucket": ..., "key": ..., "etag": ..., "size": ..., "part_size": ...,
                   "start": ..., "length": ...}
    + <part> <length> <crc64 hex>      a part is complete (bytes written before this line)
    - <part>                           a part is no longer present (evicted, found bad)

The header identifies the object version and the cut into parts; a record
whose line checksum fails (a torn write) is skipped. The file is never
rewritten in place: records are appended under an advisory lock, and
compaction writes a new file and renames it over the old one. Readers notice
the rename (another inode behind the path) and read the new file from the
start.

`parse_index` / `format_*` are pure; `IndexFile` does the I/O.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from ossfs.fsutil import write_atomically
from ossfs.model import PartLayout

__all__ = [
    "MAGIC",
    "StoreIdentity",
    "PartRecord",
    "IndexState",
    "IndexCorrupt",
    "parse_index",
    "format_header",
    "format_add",
    "format_drop",
    "IndexFile",
]

log = logging.getLogger(__name__)

MAGIC = "ossfs-index"
VERSION = 1
# How often an empty index (being created by another process) is re-read, 2 ms apart.
_EMPTY_RETRIES = 25


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """What a part store holds: a byte range of one object version, cut into parts.

    Two identities that differ in any field must never share parts.
    """

    bucket: str
    key: str
    etag: str
    size: int
    part_size: int
    start: int
    length: int

    @property
    def layout(self) -> PartLayout:
        """How the range is cut into parts."""
        return PartLayout(self.start, self.length, self.part_size)


@dataclass(frozen=True, slots=True)
class PartRecord:
    length: int
    crc64: int


@dataclass(slots=True)
class IndexState:
    """What a parsed index says.

    :identity: from the header.
    :parts: present parts by index.
    :bad_lines: records skipped because their checksum or content was wrong.
    :records: number of part records read (for deciding when to compact).
    :consumed: bytes of the file that were parsed (complete lines only).
    """

    identity: StoreIdentity
    parts: dict[int, PartRecord]
    bad_lines: int = 0
    records: int = 0
    consumed: int = 0


class IndexCorrupt(Exception):
    """The index header is missing or unreadable: nothing in the file can be trusted."""


def _line(payload: str) -> bytes:
    data = payload.encode()
    return data + b" %08x\n" % zlib.crc32(data)


def _check(line: bytes) -> str | None:
    """The payload of a complete line (without its newline) whose checksum holds."""
    payload, sep, crc = line.rpartition(b" ")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        return payload.decode()
    except (ValueError, UnicodeDecodeError):
        return None


def format_header(identity: StoreIdentity) -> bytes:
    return _line(
        f"{MAGIC} {VERSION} " + json.dumps(asdict(identity), sort_keys=True, separators=(",", ":"))
    )


def format_add(part: int, record: PartRecord) -> bytes:
    return _line(f"+ {part} {record.length} {record.crc64:016x}")


def format_drop(part: int) -> bytes:
    return _line(f"- {part}")


def _expected_length(identity: StoreIdentity, part: int) -> int | None:
    layout = identity.layout
    if not 0 <= part < layout.count:
        return None
    return layout.part_length(part)


def _parse_header(line: bytes) -> StoreIdentity:
    payload = _check(line)
    if payload is None:
        raise IndexCorrupt("header line is damaged")
    magic, _, rest = payload.partition(" ")
    version, _, body = rest.partition(" ")
    if magic != MAGIC:
        raise IndexCorrupt("not an ossfs index")
    if version != str(VERSION):
        raise IndexCorrupt(f"index format version {version} is not supported")
    try:
        fields = json.loads(body)
        identity = StoreIdentity(**fields)
    except (ValueError, TypeError) as e:
        raise IndexCorrupt(f"header is unreadable ({e})") from e
    numbers = (identity.size, identity.part_size, identity.start, identity.length)
    names = (identity.bucket, identity.key, identity.etag)
    if not (
        all(type(n) is int for n in numbers) and all(isinstance(s, str) for s in names)
    ):  # (a header edited by hand can still carry a right checksum)
        raise IndexCorrupt("header has values of the wrong type")
    if identity.part_size <= 0 or identity.length < 0 or identity.start < 0:
        raise IndexCorrupt("header has impossible values")
    return identity


def apply_records(state: IndexState, data: bytes, added: set[int] | None = None) -> None:
    """Apply the complete lines in *data* (which follows ``state.consumed``); the parts
    recorded go into *added* too."""
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl]
        pos = nl + 1
        payload = _check(line)
        fields = payload.split() if payload else []
        try:
            if len(fields) == 4 and fields[0] == "+":
                part, length, crc = int(fields[1]), int(fields[2]), int(fields[3], 16)
                if _expected_length(state.identity, part) != length:
                    raise ValueError("length does not fit the part")
                state.parts[part] = PartRecord(length, crc)
                state.records += 1
                if added is not None:
                    added.add(part)
            elif len(fields) == 2 and fields[0] == "-":
                state.parts.pop(int(fields[1]), None)
                state.records += 1
            else:
                raise ValueError("unknown record")
        except ValueError:
            state.bad_lines += 1
    state.consumed += pos


def parse_index(data: bytes) -> IndexState:
    """Parse a whole index file; raise IndexCorrupt when its header is unusable."""
    nl = data.find(b"\n")
    if nl < 0:
        raise IndexCorrupt("index is empty or its header is torn")
    identity = _parse_header(data[:nl])
    state = IndexState(identity, {}, consumed=nl + 1)
    apply_records(state, data[nl + 1 :])
    return state


class IndexFile:
    """One index on disk, shared by any number of processes.

    Appends happen under ``flock(LOCK_EX)`` and always start on a fresh line,
    so a record torn by a crash can only damage itself. `refresh` reads what
    other processes appended since the last look.
    """

    def __init__(self, path: str, state: IndexState, fd: int) -> None:
        self.path = path
        self.state = state
        self._fd = fd
        # What looks at the file found that other processes recorded: the parts (until
        # the caller takes them), or True for "any part" (their compaction was followed).
        self.foreign_parts: set[int] = set()
        self.foreign_all = False

    # ---------------------------------------------------------------- opening

    @classmethod
    def load(cls, path: str) -> IndexFile | None:
        """Open and parse an existing index; None when there is none.

        Raises IndexCorrupt when the file exists but its header is unusable. An
        empty file is one another process is creating this instant: it is read
        again a few times before it counts as corrupt.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            data = _read_from(fd, 0)
            for _ in range(_EMPTY_RETRIES):
                if data:
                    break
                time.sleep(0.002)
                data = _read_from(fd, 0)
            state = parse_index(data)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, state, fd)

    @classmethod
    def create(
        cls, path: str, identity: StoreIdentity, *, mode: int = 0o600, replace: bool = True
    ) -> IndexFile:
        """Write a new, empty index for *identity*.

        With ``replace=False`` an index that another process created meanwhile
        is kept and loaded instead (it may already hold parts).
        """
        header = format_header(identity)
        # A new, empty index need not survive a crash (losing it loses nothing), so
        # it is not fsynced: opening thousands of small objects stays cheap.
        if replace:
            write_atomically(path, header, mode, durable=False)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
            return cls(path, IndexState(identity, {}, consumed=len(header)), fd)
        # Created in place with O_EXCL and one small write: a concurrent reader sees no
        # file, an empty one (and waits, see `load`) or the whole header.
        try:
            fd = os.open(
                path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode
            )
        except FileExistsError:
            existing = cls.load(path)
            if existing is not None:
                return existing
            return cls.create(path, identity, mode=mode, replace=True)
        try:
            os.write(fd, header)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, IndexState(identity, {}, consumed=len(header)), fd)

    def mark(self) -> tuple[int, int]:
        """(inode, bytes parsed): the same only while nobody changed the file since (an
        append, or a compaction by any process, moves it)."""
        return os.fstat(self._fd).st_ino, self.state.consumed

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ---------------------------------------------------------------- reading

    def _reopen_if_replaced(self) -> bool:
        """Follow a compaction by another process; True when the file was re-read."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        if (on_disk.st_ino, on_disk.st_dev) == (mine.st_ino, mine.st_dev):
            return False
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            state = parse_index(_read_from(fd, 0))
        except IndexCorrupt:
            os.close(fd)
            raise
        if state.identity != self.state.identity:
            os.close(fd)
            raise IndexCorrupt("index was replaced by one for another object version")
        os.close(self._fd)
        self._fd, self.state = fd, state
        self.foreign_all = True
        return True

    def refresh(self) -> None:
        """Apply records other processes appended (or follow their compaction)."""
        if self._reopen_if_replaced():
            return
        tail = _read_from(self._fd, self.state.consumed)
        if tail:
            apply_records(self.state, tail, self.foreign_parts)

    # ---------------------------------------------------------------- writing

    @contextmanager
    def _locked(self) -> Iterator[None]:
        while True:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            # A compaction may have renamed a new file over the one we locked; then
            # the old descriptor is closed (which drops its lock) and we lock anew.
            if not self._reopen_if_replaced():
                break
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _append(self, data: bytes) -> None:
        """Append the complete records *data* and apply them, after the records other
        processes appended since the last look. Under `_locked` (so the file is not
        replaced meanwhile, and nobody else appends)."""
        size = os.fstat(self._fd).st_size
        if size != self.state.consumed:
            apply_records(self.state, _read_from(self._fd, self.state.consumed), self.foreign_parts)
        if size == self.state.consumed:
            # (The common case: one fstat, no read. The file ends with a whole line.)
            _write_all(self._fd, data)
            apply_records(self.state, data)
            return
        # A crash (or a full disk) tore the last record: end it with a byte that no
        # record ends with, so that it stays a bad line even if all that is missing
        # is its newline, and start ours on a new line: only the torn one is lost.
        _write_all(self._fd, _TORN_END + data)
        apply_records(self.state, _read_from(self._fd, self.state.consumed))

    def add(self, part: int, record: PartRecord) -> None:
        """Record that *part* is complete (its bytes must already be written)."""
        with self._locked():
            self._append(format_add(part, record))
        self.state.parts[part] = record

    def drop(self, parts: list[int]) -> None:
        """Record that *parts* are no longer present."""
        if not parts:
            return
        with self._locked():
            self._append(b"".join(format_drop(p) for p in parts))
        for p in parts:
            self.state.parts.pop(p, None)

    def compact_if_worthwhile(self) -> bool:
        """Rewrite the index without superseded records when they dominate it."""
        live = len(self.state.parts)
        if self.state.records + self.state.bad_lines <= 2 * live + 64:
            return False
        with self._locked():
            self.refresh()
            body = format_header(self.state.identity) + b"".join(
                format_add(p, r) for p, r in sorted(self.state.parts.items())
            )
            write_atomically(self.path, body, 0o600)
            # Our fd still points at the old inode; the next operation follows the rename.
        self.refresh()
        return True


# Ends a torn last line before an append (see `IndexFile._append`).
_TORN_END = b"#\n"


def _write_all(fd: int, data: bytes) -> None:
    """Append all of *data* (a short write goes on; a full disk raises, and the line
    it leaves torn is skipped by every reader, as a crash's)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_from(fd: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)
