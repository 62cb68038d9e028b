"""The ``ossfs`` command line: argument parsing, messages and exit codes.

Each subcommand turns its arguments into configuration objects and calls the
module that does the work under ``trio.run``. Errors a user can cause end as
one line on stderr and a non-zero exit (2 for usage errors, 1 for failures,
130 when interrupted); a traceback means a bug.

Must not import: pyfuse3 (the mount module is imported only by ``mount``).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import trio

from ossfs import __version__
from ossfs.cache.memory import DEFAULT_MEMORY_BUDGET
from ossfs.client import ClientConfig, CredentialSource, HttpObjectClient
from ossfs.config import (
    ConnectionOptions,
    ObjectUrl,
    connect_as_mount,
    default_cache_dir,
    parse_object_url,
    resolve_connection,
)
from ossfs.credentials import Source, Static
from ossfs.errors import (
    IntegrityError,
    ObjectChangedError,
    OssfsError,
    UsageError,
    unwrap_groups,
)
from ossfs.escape import SafeFormatter, printable
from ossfs.model import (
    DEFAULT_CACHE_PART_SIZE,
    DEFAULT_PART_SIZE,
    GiB,
    format_size,
    object_url,
    parse_range,
    parse_size,
    utc_stamp,
    validate_part_size,
)
from ossfs.namespace import DEFAULT_MAX_DIR_ENTRIES, ListingGuard

if TYPE_CHECKING:
    from ossfs.cache.cachedir import CacheDir  # imported by the commands that use them
    from ossfs.download import DownloadResult
    from ossfs.materialize import MaterializeResult
    from ossfs.protocol.ops import Endpoint

__all__ = ["main", "build_parser"]


T = TypeVar("T")
N = TypeVar("N", int, float)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_CACHE_SIZE = 10 * GiB


# ------------------------------------------------------------------ argument types


def _argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser whose ValueError is a readable message."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


_size = _argument_type(parse_size)
_byte_range = _argument_type(parse_range)


def _number(
    convert: Callable[[str], N], what: str, bad: Callable[[N], bool], rule: str
) -> Callable[[str], N]:
    """An argparse type: *convert* the text (a ValueError says it is not *what*), then
    refuse the values that are *bad* (saying the *rule*)."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if bad(value):
            raise argparse.ArgumentTypeError(f"{rule}: {text!r}")
        return value

    return parse


_positive_int = _number(int, "a whole number", lambda v: v < 1, "must be at least 1")
_seconds = _number(float, "a number of seconds", lambda v: v < 0, "must not be negative")
_positive_seconds = _number(float, "a number of seconds", lambda v: v <= 0, "must be more than 0")
_fraction = _number(
    float, "a number", lambda v: not 0 <= v < 1, "must be from 0 up to (not including) 1"
)
_octal = _number(
    lambda t: int(t, 8), "an octal number", lambda v: not 0 <= v <= 0o777, "not a umask"
)


def _shard(text: str) -> tuple[int, int] | str:
    from ossfs.materialize import check_shard

    if text == "auto":
        return text  # resolved from the environment by the command
    index, _, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a shard: {text!r} (use I/N, e.g. 0/4, or auto)"
        ) from None
    try:
        check_shard(shard)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return shard


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"ossfs: error: {message}\n")


def _add_connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument(
        "--endpoint",
        metavar="URL",
        help="service endpoint, e.g. https://oss-cn-hangzhou.aliyuncs.com or "
        "http://127.0.0.1:9000 (default: from the profile, or the region's "
        "public endpoint)",
    )
    g.add_argument(
        "--region",
        help="region for signing (default: from the endpoint, or cn-hangzhou / us-east-1)",
    )
    g.add_argument(
        "--dialect",
        choices=("oss", "s3"),
        help="protocol dialect (default: from the URL scheme oss:// or s3://)",
    )
    g.add_argument(
        "--signature-version", choices=("v1", "v4"), help="OSS signature version (default v4)"
    )
    style = g.add_mutually_exclusive_group()
    style.add_argument(
        "--path-style",
        dest="path_style",
        action="store_const",
        const=True,
        help="address buckets as http://host/BUCKET (default for IP and localhost endpoints)",
    )
    style.add_argument(
        "--virtual-host",
        dest="path_style",
        action="store_const",
        const=False,
        help="address buckets as http://BUCKET.host",
    )
    g.add_argument(
        "--profile", help="profile of the config file to use (default: $OSSFS_PROFILE or 'default')"
    )
    g.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default: $OSSFS_CONFIG or ~/.config/ossfs/config.toml)",
    )
    g.add_argument(
        "--anonymous",
        action="store_true",
        help="send unsigned requests (public buckets), ignoring any credentials",
    )
    g.add_argument(
        "--attempts",
        "--retries",
        dest="attempts",
        type=_positive_int,
        default=6,
        metavar="N",
        help="attempts per request that deliver nothing before giving "
        "up (default 6; --retries is its old name)",
    )
    g.add_argument(
        "--stall-timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds without a byte before a transfer is retried (default 30)",
    )
    g.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="seconds one request may take with all its retries, plus 1 s per "
        "64KiB it received (default 60)",
    )


def _add_logging_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ossfs",
        description="Read Alibaba Cloud OSS and S3-compatible buckets as files: a read-only "
        "FUSE mount backed by a resumable part cache, and a resumable parallel "
        "downloader.",
    )
    parser.add_argument("--version", action="version", version=f"ossfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "ls",
        help="list objects and prefixes",
        description="List the objects and prefixes under oss://BUCKET/PREFIX "
        "(one level, like ls; -r for everything below).",
    )
    p.add_argument("url", metavar="oss://BUCKET[/PREFIX]")
    p.add_argument("-l", "--long", action="store_true", help="show size, date and ETag")
    p.add_argument("-r", "--recursive", action="store_true", help="list every key below")
    _add_connection_options(p)
    _add_logging_options(p)

    p = sub.add_parser(
        "stat",
        help="show one object's metadata",
        description="HEAD one object and print its metadata as JSON.",
    )
    p.add_argument("url", metavar="oss://BUCKET/KEY")
    _add_connection_options(p)
    _add_logging_options(p)

    p = sub.add_parser(
        "download",
        help="download one object to a file, resumably and in parallel",
        description="Download oss://BUCKET/KEY to FILE with parallel ranged GETs. An "
        "interrupted download (Ctrl-C, kill, network failure) resumes when the "
        "same command runs again; FILE is replaced only by a complete, verified "
        "file.",
    )
    p.add_argument("url", metavar="oss://BUCKET/KEY")
    p.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="destination (default: the object's base name in the current directory)",
    )
    p.add_argument(
        "--part-size",
        type=_size,
        default=DEFAULT_PART_SIZE,
        metavar="SIZE",
        help="bytes per part, 100KiB to 5GiB (default 8MiB)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=3,
        metavar="N",
        help="parts fetched at once (default 3)",
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="where to keep the checkpoint (default: FILE's directory)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="keep no checkpoint: an interrupted download starts over",
    )
    p.add_argument(
        "--range",
        type=_byte_range,
        metavar="START-END",
        help="download only bytes START to END (inclusive; END may be omitted)",
    )
    p.add_argument(
        "--limit-rate",
        type=_size,
        metavar="BYTES_PER_SEC",
        help="cap the bandwidth, e.g. 10M (also sent to OSS as x-oss-traffic-limit)",
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    _add_connection_options(p)
    _add_logging_options(p)

    _add_mount_commands(sub)
    return parser


def _add_cache_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cache")
    g.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="part cache directory (default: ~/.cache/ossfs/<host_port>/<bucket>, "
        "under $XDG_CACHE_HOME when set)",
    )
    g.add_argument(
        "--cache-size",
        type=_size,
        default=DEFAULT_CACHE_SIZE,
        metavar="SIZE",
        help="most bytes the cache may hold, e.g. 50G (default 10GiB)",
    )
    g.add_argument(
        "--cache-min-free",
        type=_fraction,
        default=0.05,
        metavar="FRACTION",
        help="keep at least this fraction of the cache's file system free (default 0.05)",
    )
    g.add_argument(
        "--part-size",
        type=_size,
        default=DEFAULT_CACHE_PART_SIZE,
        metavar="SIZE",
        help="bytes per cached part: the least a random read fetches "
        "(default 1MiB; objects of up to 8MiB are one part; sequential reads "
        "fetch runs of parts per GET)",
    )


def _listen(text: str) -> tuple[str, int]:
    from ossfs.metrics import parse_listen

    try:
        return parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_metrics_option(g: Any) -> None:
    g.add_argument(
        "--metrics",
        type=_listen,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (only there: "
        "127.0.0.1:9100 for this machine, 0.0.0.0:9100 for every interface)",
    )


def _add_mount_commands(sub: Any) -> None:
    p = sub.add_parser(
        "mount",
        help="mount a bucket (or a prefix of it) read-only",
        description="Mount oss://BUCKET[/PREFIX] (or s3://...) read-only on MOUNTPOINT. "
        "Objects are files, /-separated prefixes are directories. Without "
        "--foreground the command returns once the mount is ready.",
    )
    p.add_argument("url", metavar="oss://BUCKET[/PREFIX]")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    _add_cache_options(p)
    g = p.add_argument_group("mount")
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=16,
        metavar="N",
        help="connections for all reads together (default 16)",
    )
    g.add_argument(
        "--read-ahead",
        type=_size,
        default=128 << 20,
        metavar="SIZE",
        help="how far ahead of a sequential reader to fetch (default 128MiB)",
    )
    g.add_argument(
        "--kernel-read-ahead",
        type=_size,
        default=1 << 20,
        metavar="SIZE",
        help="the kernel's read-ahead for the mount, which sets the size of "
        "its read requests (default 1MiB, the most one request carries; "
        "0 leaves the kernel's default; needs root)",
    )
    g.add_argument(
        "--memory-budget",
        type=_size,
        default=DEFAULT_MEMORY_BUDGET,
        metavar="SIZE",
        help="while the cache disk is behind, readers are served from memory, "
        "not cached: at most this much (default 256MiB; 0: always wait for the "
        "cache disk)",
    )
    g.add_argument(
        "--ttl",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long listings and attributes are trusted (default 60)",
    )
    g.add_argument(
        "--negative-ttl",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how long a missing name is remembered (default 5)",
    )
    g.add_argument(
        "--max-dir-entries",
        type=_positive_int,
        default=DEFAULT_MAX_DIR_ENTRIES,
        metavar="N",
        help="most entries one directory may hold; a longer listing fails "
        "with EIO (default 1000000; each listed entry costs the mount about "
        "1.3KiB of memory)",
    )
    g.add_argument("--uid", type=int, default=os.getuid(), help="owner of every file")
    g.add_argument("--gid", type=int, default=os.getgid(), help="group of every file")
    g.add_argument(
        "--umask",
        type=_octal,
        default=0o222,
        metavar="OCTAL",
        help="permission bits to clear (default 0222: files 0444, dirs 0555)",
    )
    g.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users see the mount (needs user_allow_other in /etc/fuse.conf unless root)",
    )
    g.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground (logs go to stderr)"
    )
    g.add_argument("--log-file", metavar="FILE", help="write the log here")
    _add_metrics_option(g)
    _add_connection_options(p)
    _add_logging_options(p)

    p = sub.add_parser(
        "materialize",
        help="prefetch objects or prefixes into the cache (resumable)",
        description="Fetch whole objects into the part cache the mount uses, concurrently "
        "and resumably: run it again after an interruption and only what is "
        "missing is fetched. TARGET is oss://BUCKET/KEY, oss://BUCKET/PREFIX/ or "
        "a file or directory inside a running ossfs mount (its cache is filled).",
    )
    p.add_argument("target", metavar="TARGET")
    p.add_argument(
        "--to",
        metavar="DIR",
        help="also write the objects as files under DIR (created if missing; "
        "keys relative to the prefix), reusing cached parts",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N|auto",
        help="take only shard I of N (0 <= I < N): a deterministic split of the "
        "objects for a fleet of machines; 'auto' takes I/N from the job "
        "runner (Kubernetes Indexed Job, Slurm array, RANK/WORLD_SIZE)",
    )
    p.add_argument(
        "--shard-count",
        type=_positive_int,
        metavar="N",
        help="with --shard auto in a Kubernetes Indexed Job: the number of shards "
        "(the Job's completions; default $OSSFS_SHARD_COUNT)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=16,
        metavar="N",
        help="parts fetched at once across all objects (default 16)",
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    _add_metrics_option(p)
    _add_cache_options(p)
    _add_connection_options(p)
    _add_logging_options(p)

    p = sub.add_parser(
        "unmount",
        aliases=["umount"],
        help="unmount a mount",
        description="Unmount MOUNTPOINT (also a dead mount whose process was killed).",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "-z",
        "--lazy",
        action="store_true",
        help="detach now, finish when the mount is no longer busy",
    )
    _add_logging_options(p)

    p = sub.add_parser(
        "status",
        help="show a mount's cache use and request counters",
        description="Show what a running mount has cached and fetched.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--all", action="store_true", help="list every cached object")
    _add_logging_options(p)


# ------------------------------------------------------------------ helpers


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the path(s) involved and the reason."""
    reason = e.strerror or str(e)
    if e.filename is not None:
        where = os.fsdecode(e.filename)
        if e.filename2 is not None:
            where += f" -> {os.fsdecode(e.filename2)}"
        return f"{where}: {reason}"
    return reason


def setup_logging(verbose: int, quiet: bool, stream: Any = None) -> None:
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    # Keys and server text end up in log messages: one record is always one line.
    handler.setFormatter(
        SafeFormatter(
            "ossfs: %(message)s"
            if verbose == 0
            else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; that is only interesting when debugging.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def connection_options(args: argparse.Namespace) -> ConnectionOptions:
    return ConnectionOptions(
        endpoint=args.endpoint,
        region=args.region,
        dialect=args.dialect,
        signature_version=args.signature_version,
        path_style=args.path_style,
        profile=args.profile,
        config_path=args.config,
        anonymous=args.anonymous,
    )


def make_client(
    args: argparse.Namespace, url: ObjectUrl, *, connections: int, rate_limit: int | None = None
) -> HttpObjectClient:
    endpoint, source = resolve_connection(connection_options(args), url.scheme)
    config = client_config(args, connections, rate_limit=rate_limit)
    return HttpObjectClient(endpoint, config, credentials=credentials_from(source))


def client_config(
    args: argparse.Namespace, connections: int, *, rate_limit: int | None = None
) -> ClientConfig:
    """The client's limits from the command line (`--attempts`, `--stall-timeout`,
    `--timeout`)."""
    return ClientConfig(
        connections=connections,
        attempts=args.attempts,
        stall_timeout=args.stall_timeout,
        timeout=args.timeout,
        rate_limit=rate_limit,
    )


def credentials_from(source: Source | None) -> CredentialSource | None:
    """Credentials fetched from *source* and kept fresh (None: the endpoint has them,
    or none are used)."""
    if source is None or isinstance(source, Static):
        return None
    from ossfs.refresh import for_source

    return for_source(source)


class _Terminated(Exception):
    """SIGTERM or SIGHUP arrived: stop like Ctrl-C, leaving resumable state."""


def run_trio(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine; SIGTERM and SIGHUP end it as Ctrl-C does."""

    async def main() -> T:
        box: list[T] = []

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for _ in signals:
                    raise _Terminated()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            box.append(await fn())
            nursery.cancel_scope.cancel()
        return box[0]

    try:
        with unwrap_groups():
            return trio.run(main)
    except _Terminated:
        raise KeyboardInterrupt from None


# ------------------------------------------------------------------ commands


def _cmd_ls(args: argparse.Namespace) -> int:
    url = parse_object_url(args.url)

    async def run() -> None:
        async with make_client(args, url, connections=1) as client:
            token: str | None = None
            guard = ListingGuard(str(url))
            while True:
                page = await client.list_page(
                    url.bucket,
                    prefix=url.key,
                    delimiter="" if args.recursive else "/",
                    continuation_token=token,
                )
                guard.check(page, token)
                for prefix in map(printable, page.prefixes):
                    print(f"{'PRE':>12}  {'':19}  {prefix}" if args.long else prefix)
                for obj in page.objects:
                    if args.long:
                        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(obj.mtime))
                        print(printable(f"{obj.size:>12}  {stamp}  {obj.key}  {obj.etag}"))
                    else:
                        print(printable(obj.key))
                sys.stdout.flush()
                token = page.next_token
                if token is None:
                    break

    run_trio(run)
    return 0


def _cmd_stat(args: argparse.Namespace) -> int:
    url = parse_object_url(args.url)
    if not url.key:
        raise UsageError("stat needs an object key: oss://BUCKET/KEY")

    async def run() -> None:
        async with make_client(args, url, connections=1) as client:
            meta = await client.head(url.bucket, url.key)
        out: dict[str, Any] = {
            "url": str(url),
            "size": meta.size,
            "etag": meta.etag,
            "last_modified": utc_stamp(meta.mtime),
            "crc64ecma": str(meta.crc64) if meta.crc64 is not None else None,
            "object_type": meta.object_type,
            "storage_class": meta.storage_class,
        }
        print(json.dumps(out, indent=2))

    run_trio(run)
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from ossfs.download import DownloadRequest, checkpoint_path_for, download
    from ossfs.progress import ProgressBar

    url = parse_object_url(args.url)
    if not url.key or url.key.endswith("/"):
        raise UsageError(
            f"{args.url} names a prefix, not an object (use ossfs materialize for prefixes)"
        )
    validate_part_size(args.part_size)
    if args.limit_rate is not None and args.limit_rate < 1024:
        raise UsageError("--limit-rate must be at least 1K (bytes per second)")
    file_path = args.file or os.path.basename(url.key)
    if os.path.isdir(file_path):
        file_path = os.path.join(file_path, os.path.basename(url.key))
    range_start, range_end = args.range or (None, None)  # checked against the size later
    show = not args.no_progress and not args.quiet and sys.stderr.isatty()
    bar = ProgressBar(0, description=os.path.basename(file_path), enabled=show)

    request = DownloadRequest(
        bucket=url.bucket,
        key=url.key,
        file_path=file_path,
        part_size=args.part_size,
        threads=args.threads,
        checkpoint_dir=args.checkpoint_dir,
        enable_checkpoint=not args.no_resume,
        range_start=range_start,
        range_end=range_end,
        progress=bar.progress,
        on_part=bar.set_count,
        notice=lambda msg: bar.write(f"ossfs: {msg}") if not args.quiet else None,
        scheme=url.scheme,
    )

    async def run() -> Any:
        async with make_client(
            args, url, connections=args.threads, rate_limit=args.limit_rate
        ) as client:
            return await download(client, request)

    def resumable() -> bool:
        return not args.no_resume and os.path.exists(
            checkpoint_path_for(request, os.path.abspath(file_path))
        )

    try:
        result = run_trio(run)
    except OssfsError as e:
        if isinstance(e, (UsageError, IntegrityError, ObjectChangedError)) or not resumable():
            raise
        raise _with_hint(e) from None
    except KeyboardInterrupt:
        hint = "run the same command again to resume the download" if resumable() else None
        raise Interrupted(hint) from None
    finally:
        bar.close()
    if not args.quiet:
        print(_download_summary(url, result), file=sys.stderr)
    return 0


def _download_summary(url: ObjectUrl, result: DownloadResult) -> str:
    """The line a finished download prints: what, where, how fast, how it was checked."""
    rate = result.bytes_fetched / result.elapsed if result.elapsed > 0 else 0.0
    check = {
        "crc64": "CRC-64 verified",
        "md5": "MD5 verified",
        "parts": "per-part CRC-64 (ranged download)",
    }.get(
        result.verified_by or "",
        "per-part CRC-64 only (the service sent no checksum of the object)",
    )
    reuse = f", {result.parts_reused} reused from checkpoint" if result.parts_reused else ""
    return (
        f"downloaded {printable(url)} to {printable(result.path)}: "
        f"{format_size(result.size)} in {result.elapsed:.1f}s ({format_size(rate)}/s), "
        f"{result.parts} part(s){reuse}, {check}"
    )


def _make_directory(path: str, option: str, *, mode: int = 0o777) -> None:
    """Create directory *path* (given as *option*) if missing; a UsageError naming the
    option when it cannot be, or is not a directory."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{option} {path} is not a directory") from None
    except OSError as e:
        raise UsageError(f"{option} {path} cannot be created: {e.strerror}") from None
    if not os.path.isdir(path):
        raise UsageError(f"{option} {path} is not a directory")


def check_cache_dir(path: str) -> str:
    """The absolute cache directory, created if missing; a UsageError if it cannot be used."""
    path = os.path.abspath(path)
    _make_directory(path, "--cache-dir", mode=0o700)
    probe = os.path.join(path, f".ossfs-probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--cache-dir {path} is not writable: {e.strerror}") from None
    return path


def check_log_file(path: str) -> str:
    """The absolute log file, opened once for appending so a bad path fails here."""
    path = os.path.abspath(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"--log-file {path} cannot be written: {e.strerror}") from None
    return path


def _log_to_file(path: str | None) -> None:
    """Send the log to *path* (a daemonized mount has no terminal); None keeps stderr."""
    if path is None:
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]


def _cmd_mount(args: argparse.Namespace) -> int:
    from ossfs import mount
    from ossfs.mounttable import check_mountpoint

    url = parse_object_url(args.url)
    validate_part_size(args.part_size)
    mountpoint = check_mountpoint(args.mountpoint)
    endpoint, source = resolve_connection(connection_options(args), url.scheme)
    # Checked here, before the daemon forks: there a failure has no terminal to go to.
    cache_dir = check_cache_dir(args.cache_dir or default_cache_dir(endpoint.url, url.bucket))
    log_file = check_log_file(args.log_file) if args.log_file else None
    if log_file is None and not args.foreground:
        # A daemon has no terminal: its log lives beside its cache.
        log_file = check_log_file(os.path.join(cache_dir, "ossfs.log"))
    # Bound now, before the daemon forks: a port in use fails here, with a terminal.
    metrics = _metrics_server(args.metrics)
    prefix = url.key.strip("/")
    config = mount.MountConfig(
        source=object_url(url.scheme, url.bucket, prefix),
        bucket=url.bucket,
        prefix=prefix + "/" if prefix else "",
        mountpoint=mountpoint,
        cache_dir=os.path.abspath(cache_dir),
        cache_size=args.cache_size,
        cache_min_free=args.cache_min_free,
        part_size=args.part_size,
        threads=args.threads,
        read_ahead=args.read_ahead,
        kernel_read_ahead=args.kernel_read_ahead,
        memory_budget=args.memory_budget,
        ttl=args.ttl,
        negative_ttl=args.negative_ttl,
        uid=args.uid,
        gid=args.gid,
        umask=args.umask,
        allow_other=args.allow_other,
        foreground=args.foreground,
        log_file=log_file,
        profile=args.profile,
        endpoint=endpoint.url,
        dialect=endpoint.dialect,
        config_path=os.path.abspath(args.config) if args.config else None,
        region=args.region,
        signature_version=args.signature_version,
        path_style=args.path_style,
        anonymous=args.anonymous,
        max_dir_entries=args.max_dir_entries,
        metrics=metrics.where if metrics is not None else None,
        credentials=source.name if source is not None else "none (anonymous)",
    )
    settings = client_config(args, args.threads)

    def make() -> HttpObjectClient:
        # Made in the mount's own process (after the fork), where its refreshes run.
        return HttpObjectClient(endpoint, settings, credentials=credentials_from(source))

    return mount.run(config, make, _log_to_file, metrics)


def _metrics_server(listen: tuple[str, int] | None) -> Any:
    """A bound `ossfs.metrics.MetricsServer` for ``--metrics``, or None."""
    if listen is None:
        return None
    from ossfs.metrics import MetricsServer

    return MetricsServer(*listen)


def _cmd_unmount(args: argparse.Namespace) -> int:
    from ossfs.mounttable import unmount

    unmount(args.mountpoint, lazy=args.lazy)
    return 0


def read_mount_attr(path: str, name: str) -> dict[str, Any]:
    """A JSON extended attribute of a running mount's root."""
    try:
        raw = os.getxattr(path, f"user.ossfs.{name}")
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            raise UsageError(f"{path} is not an ossfs mount") from None
        if e.errno == errno.ENOTCONN:
            from ossfs.mounttable import dead_mount_message

            raise UsageError(dead_mount_message(path)) from None
        raise UsageError(f"cannot ask {path}: {e.strerror}") from None
    result: dict[str, Any] = json.loads(raw)
    return result


_STATUS_OBJECTS = 10


def _cmd_status(args: argparse.Namespace) -> int:
    from ossfs.cache.status import cached_objects_of
    from ossfs.mounttable import dead_mount_message, is_dead_mount

    path = os.path.abspath(args.mountpoint)
    if is_dead_mount(path):
        raise UsageError(dead_mount_message(path))
    if not os.path.ismount(path):
        raise UsageError(f"{path} is not a mount point")

    st = read_mount_attr(path, "status")
    st["objects_cached"] = cached_objects_of(st["cache_dir"], st.get("bucket"))
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    req = st["requests"]
    objects = st["objects_cached"]
    print(f"source:      {printable(st['source'])} (pid {st['pid']}, up {st['uptime']:.0f}s)")
    print(f"cache:       {st['cache_dir']}")
    if st.get("credentials"):
        until = st.get("credentials_expire")
        expires = f" (temporary, valid until {until})" if until else ""
        print(f"credentials: {printable(st['credentials'])}{expires}")
    print(
        f"cache use:   {format_size(st['cache_used_bytes'])} of "
        f"{format_size(st['cache_size_bytes'])}, {len(objects)} object(s), "
        f"{format_size(st['cache_evicted_bytes'])} evicted"
    )
    print(
        f"requests:    {req['requests']} ({req['retries']} retries, {req['errors']} errors), "
        f"{format_size(req['bytes_received'])} received"
    )
    print(f"parts:       {st['parts_fetched']} fetched, {format_size(st['bytes_fetched'])}")
    if "cache_hit_bytes" in st:
        print(
            f"reads:       {format_size(st['cache_hit_bytes'])} found in the cache, "
            f"{format_size(st['cache_miss_bytes'])} not"
        )
    if st.get("crc_mismatches"):
        print(
            f"integrity:   {st['crc_mismatches']} object(s) whose cached bytes did not match "
            "the service's CRC-64 (dropped and fetched again; see the log)"
        )
    if st.get("uncached_bytes"):
        print(
            f"uncached:    {format_size(st['uncached_bytes'])} served from the network "
            "because the cache disk was full"
        )
    if st.get("memory_bytes"):
        print(
            f"memory:      {format_size(st['memory_bytes'])} served from memory, not cached, "
            "because the cache disk was behind "
            f"(peak {format_size(st.get('memory_peak_bytes', 0))})"
        )
    if st.get("cache_disk_behind"):
        served = "; readers are served from memory" if st.get("memory_budget") else ""
        print(f"cache disk:  behind now (dirty pages near the kernel's ceiling){served}")
    if st.get("dirty_cgroup"):
        print(f"dirty pages: watched for the machine and the cgroup {st['dirty_cgroup']}")
    if st.get("log_file"):
        print(f"log:         {st['log_file']}")
    if st.get("metrics"):
        print(f"metrics:     http://{st['metrics']}/metrics")
    shown = (
        objects
        if args.all
        else sorted(objects, key=lambda o: o["cached_bytes"], reverse=True)[:_STATUS_OBJECTS]
    )
    versions: dict[str, int] = {}
    for o in objects:
        versions[o["key"]] = versions.get(o["key"], 0) + 1
    for o in shown:
        pct = 100.0 * o["cached_bytes"] / o["size"] if o["size"] else 100.0
        # The cache may hold more than one version of a key: the ETag tells them apart.
        etag = f"  (ETag {o['etag']})" if versions[o["key"]] > 1 else ""
        print(
            f"  {pct:5.1f}%  {format_size(o['cached_bytes']):>10} of "
            f"{format_size(o['size']):>10}  {printable(o['key'])}{etag}"
        )
    if len(shown) < len(objects):
        print(f"  ... and {len(objects) - len(shown)} more (--all lists every object)")
    return 0


def _mount_target(path: str) -> tuple[dict[str, Any], str]:
    """For a path inside a running mount: the mount's description and the object key."""
    from ossfs.mounttable import dead_mount_message, is_dead_mount, mounted_fstype

    path = os.path.abspath(path)
    root = path
    while mounted_fstype(root) != "fuse.ossfs":
        parent = os.path.dirname(root)
        if parent == root:
            raise UsageError(
                f"{path} is not inside an ossfs mount (give a path in a "
                "mount, or oss://BUCKET/PREFIX)"
            )
        root = parent
    if is_dead_mount(root):
        raise UsageError(dead_mount_message(root))
    if not os.path.exists(path):
        raise UsageError(f"{path} does not exist")
    info = read_mount_attr(root, "mount")
    rel = os.path.relpath(path, root)
    key = info["prefix"] + ("" if rel == "." else rel.replace(os.sep, "/"))
    if os.path.isdir(path) and key and not key.endswith("/"):
        key += "/"
    return info, key


def _materialize_shard(args: argparse.Namespace) -> tuple[int, int] | None:
    """The shard of ``--shard I/N`` or ``--shard auto`` (from the job runner's variables)."""
    from ossfs.materialize import shard_from_environment

    if args.shard != "auto":
        if args.shard_count is not None:
            raise UsageError("--shard-count goes with --shard auto")
        shard: tuple[int, int] | None = args.shard
        return shard
    found, why = shard_from_environment(os.environ, args.shard_count)
    if not args.quiet:
        print(f"ossfs: shard {found[0]}/{found[1]} (from {why})", file=sys.stderr)
    return found


@dataclasses.dataclass(frozen=True)
class _Target:
    """What `materialize` works on: an object URL, or a path in a mount."""

    url: ObjectUrl
    endpoint: Endpoint
    source: Source | None
    cache_dir: str
    part_size: int
    cache_size: int


def _materialize_target(args: argparse.Namespace) -> _Target:
    if "://" in args.target:
        url = parse_object_url(args.target)
        endpoint, source = resolve_connection(connection_options(args), url.scheme)
        cache_dir = args.cache_dir or default_cache_dir(endpoint.url, url.bucket)
        return _Target(url, endpoint, source, cache_dir, args.part_size, args.cache_size)
    info, key = _mount_target(args.target)
    # Connect as the mount does, unless the command line says otherwise.
    endpoint, source = resolve_connection(
        connect_as_mount(connection_options(args), info), info["dialect"]
    )
    url = ObjectUrl(info["dialect"], info["bucket"], key)
    return _Target(url, endpoint, source, info["cache_dir"], info["part_size"], info["cache_size"])


def _cmd_materialize(args: argparse.Namespace) -> int:
    from ossfs.cache.cachedir import CacheDir
    from ossfs.materialize import MaterializeRequest, materialize
    from ossfs.progress import ProgressBar

    target = _materialize_target(args)
    validate_part_size(target.part_size)
    shard = _materialize_shard(args)
    if args.to is not None:
        _make_directory(args.to, "--to")
    cache_dir = check_cache_dir(target.cache_dir)
    metrics = _metrics_server(args.metrics)
    show = not args.no_progress and not args.quiet and sys.stderr.isatty()
    bar = ProgressBar(0, description="materialize", counting="objects", enabled=show)
    # What --metrics shows besides the client's and the cache's counters.
    counts = {"fetched": 0, "cached": 0, "objects_done": 0}

    def progress(n: int, cached: int, total: int) -> None:
        counts["fetched"] += n
        counts["cached"] = cached
        bar.progress(n, cached, total)

    def on_object(done: int, total: int) -> None:
        counts["objects_done"] = done
        bar.set_count(done, total)

    request = MaterializeRequest(
        bucket=target.url.bucket,
        key=target.url.key,
        part_size=target.part_size,
        threads=args.threads,
        to_dir=args.to,
        shard=shard,
        progress=progress,
        on_object=on_object,
        notice=lambda msg: bar.write(f"ossfs: {msg}") if not args.quiet else None,
        scheme=target.url.scheme,
    )
    cache = CacheDir(cache_dir, max_bytes=target.cache_size, min_free_fraction=args.cache_min_free)
    config = client_config(args, args.threads)

    async def run() -> Any:
        credentials = credentials_from(target.source)
        async with HttpObjectClient(target.endpoint, config, credentials=credentials) as client:
            if metrics is not None:
                from ossfs.metrics import status_reader

                metrics.start(status_reader(lambda: _materialize_status(client, cache, counts)))
            return await materialize(client, cache, request)

    try:
        result = run_trio(run)
    except KeyboardInterrupt:
        raise Interrupted("run the same command again to continue where it stopped") from None
    finally:
        if metrics is not None:
            metrics.close()
        bar.close()
        cache.close()
    for line in result.failed:
        print(f"ossfs: failed: {printable(line)}", file=sys.stderr)
    if not args.quiet:
        print(_materialize_summary(result, target.url, args.to), file=sys.stderr)
    return EXIT_FAILURE if result.failed else 0


def _materialize_status(
    client: HttpObjectClient, cache: CacheDir, counts: dict[str, int]
) -> dict[str, Any]:
    """What `--metrics` shows during a materialize run."""
    return {
        "requests": client.stats.as_dict(),
        "bytes_fetched": counts["fetched"],
        "cache_hit_bytes": counts["cached"] - counts["fetched"],
        "cache_miss_bytes": counts["fetched"],
        "cache_used_bytes": cache.used_bytes,
        "cache_size_bytes": cache.max_bytes,
        "cache_evicted_bytes": cache.evicted_bytes,
        "buffered_bytes": client.buffered_bytes,
        "objects_done": counts["objects_done"],
    }


def _materialize_summary(result: MaterializeResult, url: ObjectUrl, to: str | None) -> str:
    rate = result.bytes_fetched / result.elapsed if result.elapsed > 0 else 0.0
    out = f", {result.written} written to {to}" if to else ""
    done = result.objects - len(result.failed)
    count = (
        f"{done} of {result.objects} object(s) ({len(result.failed)} failed)"
        if result.failed
        else f"{done} object(s)"
    )
    return (
        f"materialized {count} of {printable(url)} "
        f"({format_size(result.total_bytes)}) in {result.elapsed:.1f}s: "
        f"{format_size(result.bytes_fetched)} fetched ({format_size(rate)}/s), "
        f"{format_size(result.bytes_reused)} already cached{out}"
    )


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a command that can say how to go on: *hint*."""

    def __init__(self, hint: str | None) -> None:
        super().__init__(hint)
        self.hint = hint


def _with_hint(e: OssfsError) -> OssfsError:
    """Add the resume hint to a failed download's one-line message."""
    e.args = (f"{e}; the checkpoint is kept, run the same command again to resume",)
    return e


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ls": _cmd_ls,
    "stat": _cmd_stat,
    "download": _cmd_download,
    "mount": _cmd_mount,
    "unmount": _cmd_unmount,
    "umount": _cmd_unmount,
    "status": _cmd_status,
    "materialize": _cmd_materialize,
}


# Generic mount options that mount(8) and mount.fuse3 pass along; they mean
# nothing to a read-only network file system and are accepted silently.
_IGNORED_MOUNT_OPTIONS = frozenset(
    {
        "rw",
        "ro",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "group",
        "defaults",
        "nofail",
        "_netdev",
        "atime",
        "noatime",
        "relatime",
        "strictatime",
        "nodiratime",
        "async",
        "sync",
        "silent",
        "loud",
    }
)
_FLAG_MOUNT_OPTIONS = frozenset(
    {
        "allow_other",
        "foreground",
        "anonymous",
        "path_style",
        "virtual_host",
    }
)


def _mount_option_strings() -> set[str]:
    """Every --option that ``ossfs mount`` accepts."""
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices["mount"]._option_string_actions)
    return set()


def mount_helper_argv(argv: list[str]) -> list[str]:
    """Turn ``SOURCE MOUNTPOINT -o a=b,c`` (how mount.fuse3 and fstab call us) into ``mount``.

    ``-o cache_size=10G,allow_other`` becomes ``--cache-size 10G --allow-other``.
    Secrets are not accepted as options (they would show in ``ps``): use a
    profile of the config file (``-o config=/etc/ossfs.toml,profile=NAME``).
    """
    if len(argv) < 2 or "://" not in argv[0]:
        return argv
    source, mountpoint, rest = argv[0], argv[1], argv[2:]
    out = ["mount", source, mountpoint]
    known = _mount_option_strings()
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "-o" and i + 1 < len(rest):
            groups, i = [rest[i + 1]], i + 2
        elif arg.startswith("-o") and len(arg) > 2:
            groups, i = [arg[2:]], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        for group in groups:
            for opt in filter(None, group.split(",")):
                name, sep, value = opt.partition("=")
                if name in _IGNORED_MOUNT_OPTIONS or name.startswith(("x-", "comment")):
                    continue
                flag = "--" + name.replace("_", "-")
                if name in ("access_key_id", "access_key_secret", "session_token"):
                    raise UsageError(
                        f"mount option {name} is not accepted (it would show in "
                        "ps); use -o config=FILE,profile=NAME"
                    )
                if name in _FLAG_MOUNT_OPTIONS and not sep:
                    out.append("-f" if name == "foreground" else flag)
                elif sep and flag in known and name not in _FLAG_MOUNT_OPTIONS:
                    out += [flag, value]
                else:
                    raise UsageError(f"unknown mount option {opt!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = mount_helper_argv(argv)
    except UsageError as e:
        print(f"ossfs: error: {printable(e)}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    try:
        with unwrap_groups():
            return _COMMANDS[args.command](args)
    except UsageError as e:
        print(f"ossfs: error: {printable(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OssfsError as e:
        print(f"ossfs: error: {printable(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        # `ossfs ls | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        # A path the user gave cannot be used (read-only, missing directory, full disk).
        print(f"ossfs: error: {describe_os_error(e)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as e:
        print("ossfs: interrupted", file=sys.stderr)
        if isinstance(e, Interrupted) and e.hint:
            print(f"ossfs: {e.hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
