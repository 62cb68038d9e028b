"""``python -m ossfs.testing serve``: run the OSS-dialect test server as a process.

Serves until SIGTERM or SIGINT, then exits 0. Prints
``listening on http://HOST:PORT`` once it accepts connections (and writes the
port to ``--port-file``, atomically, for scripts that wait for it). The access
key secret is never printed; it may come from ``OSS_ACCESS_KEY_SECRET``
instead of the command line, where other users could see it.

Must not import: trio, httpx.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import threading
from types import FrameType

from ossfs.fsutil import write_atomically
from ossfs.model import parse_size
from ossfs.testing.server import OssTestServer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ossfs.testing",
        description="A local OSS-dialect object server with fault injection.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve buckets until SIGTERM/SIGINT")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    serve.add_argument(
        "--bucket",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve the files under DIR as bucket NAME (repeatable)",
    )
    serve.add_argument(
        "--memory-bucket",
        action="append",
        default=[],
        metavar="NAME",
        help="an empty in-memory bucket (repeatable)",
    )
    serve.add_argument(
        "--random-object",
        action="append",
        default=[],
        metavar="BUCKET/KEY=SIZE",
        help="an in-memory object of SIZE pseudo-random bytes, e.g. "
        "mem/big.bin=256MiB (repeatable)",
    )
    serve.add_argument("--access-key-id", help="require requests signed with this key")
    serve.add_argument("--access-key-secret", help="its secret (default: $OSS_ACCESS_KEY_SECRET)")
    serve.add_argument(
        "--anonymous", action="store_true", help="with a key: also serve unsigned requests"
    )
    serve.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds before the first byte of every answer",
    )
    serve.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        metavar="BYTES_PER_SEC",
        help="cap each connection's body rate",
    )
    serve.add_argument(
        "--error-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="fraction of requests answered with --error-status",
    )
    serve.add_argument("--error-status", type=int, default=503, metavar="S")
    serve.add_argument("--seed", type=int, default=0, help="seed of the random errors")
    serve.add_argument(
        "--no-crc",
        action="store_true",
        help="no x-oss-hash-crc64ecma for directory buckets (no hashing of big files)",
    )
    serve.add_argument("--port-file", metavar="PATH", help="write the port number here")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def _random_bytes(rng: random.Random, n: int) -> bytes:
    # randbytes goes through one integer of n*8 bits, which overflows past 256 MiB.
    step = 16 * 1024 * 1024
    return b"".join(rng.randbytes(min(step, n - i)) for i in range(0, n, step))


def _write_port_file(path: str, port: int) -> None:
    write_atomically(path, f"{port}\n".encode(), 0o644, durable=False)


def serve(args: argparse.Namespace) -> int:
    credentials: dict[str, str] | None = None
    if args.access_key_id:
        secret = args.access_key_secret or os.environ.get("OSS_ACCESS_KEY_SECRET")
        if not secret:
            print(
                "error: --access-key-id needs --access-key-secret or $OSS_ACCESS_KEY_SECRET",
                file=sys.stderr,
            )
            return 2
        credentials = {args.access_key_id: secret}
    elif args.access_key_secret:
        print("error: --access-key-secret needs --access-key-id", file=sys.stderr)
        return 2
    server = OssTestServer(
        host=args.host,
        port=args.port,
        credentials=credentials,
        allow_anonymous=args.anonymous,
        crc=not args.no_crc,
        seed=args.seed,
    )
    server.faults.latency = args.latency
    server.faults.bandwidth = args.bandwidth
    server.faults.error_rate = args.error_rate
    server.faults.error_status = args.error_status
    try:
        for spec in args.bucket:
            name, sep, directory = spec.partition("=")
            if not sep or not name or not directory:
                raise ValueError(f"--bucket wants NAME=DIR, not {spec!r}")
            server.add_directory_bucket(name, directory)
        for name in args.memory_bucket:
            server.create_bucket(name)
        rng = random.Random(args.seed)
        for spec in args.random_object:
            path, sep, size = spec.rpartition("=")
            bucket, slash, key = path.partition("/")
            if not sep or not slash or not bucket or not key:
                raise ValueError(f"--random-object wants BUCKET/KEY=SIZE, not {spec!r}")
            server.put(bucket, key, _random_bytes(rng, parse_size(size)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    try:
        if args.port_file:
            _write_port_file(args.port_file, server.port)
        print(f"listening on {server.url}", flush=True)
        # Wait in short slices: the signal handler runs between them.
        while not done.wait(0.2):
            pass
    finally:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        return serve(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
