#!/usr/bin/env python3
"""Shared pieces of the benchmark scripts (``scripts/bench-download``, ``scripts/bench-mount``).

- `ServerPair`: a fast local object server. nginx serves the files of a
  directory bucket (ranges, HEAD, ETag, If-Match); requests for a bucket
  itself (listings: any path with no key after the bucket) are passed to the
  package's OSS-dialect test server (``python -m ossfs.testing serve``)
  running in directory mode on the same directory, whose listing ETags equal
  nginx's (``"<mtime hex>-<size hex>"``). Path style:
  ``http://127.0.0.1:PORT/BUCKET/KEY`` is ``ROOT/BUCKET/KEY``.
- `Services`: background processes in their own sessions, stopped in
  ``finally`` (terminate, then kill); `Mounts`: FUSE mounts, unmounted in
  ``finally`` (lazily when busy) and their daemons stopped.
- Data: random files, small-file trees; SHA-256 of files.
- Measuring: `run_timed`, `run_with_rusage` (peak RSS of a child through
  ``wait4``), `vm_hwm` (peak RSS of a running daemon), `drop_caches`.
- Reporting: `Report` (markdown with date, machine and tool versions),
  `md_table`, ratio cells with targets.

This file is a library; it is not run by itself.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import http.client
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# ossfs.model is plain Python (no trio, no httpx): usable before the venv re-exec.
sys.path.insert(0, str(REPO))
from ossfs.model import format_size as format_size  # noqa: E402  (for the bench scripts)
from ossfs.model import parse_size  # noqa: E402

VENV = REPO / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
OSSFS = VENV / "bin" / "ossfs"
WORK = REPO / "bench-work"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class BenchError(Exception):
    """A step of a benchmark failed (a tool exited non-zero, wrong bytes, ...)."""


class Interrupted(BaseException):
    """SIGTERM, SIGHUP or the overall time limit: unwind and clean up."""


# ------------------------------------------------------------------ start-up


def reexec_in_venv() -> None:
    """Run again under the project's venv python (which has ossfs and the SDK)."""
    if not VENV_PYTHON.exists():
        return
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])


def size_arg(text: str) -> int:
    """argparse type for sizes."""
    import argparse

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def ensure_apt(packages: Mapping[str, str]) -> None:
    """Install the Debian packages whose command (the key) is missing."""
    missing = sorted({pkg for cmd, pkg in packages.items() if not find_command(cmd)})
    if not missing:
        return
    print(f"installing: {' '.join(missing)}", file=sys.stderr, flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    still = [cmd for cmd in packages if not find_command(cmd)]
    if still:
        raise BenchError(f"still missing after apt-get install: {', '.join(still)}")


def ensure_pip(module: str, requirement: str) -> bool:
    """Import *module*, installing *requirement* into the venv if needed; False if impossible."""
    import importlib

    try:
        importlib.import_module(module)
        return True
    except ImportError:
        pass
    print(f"installing {requirement} into {VENV}", file=sys.stderr, flush=True)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", requirement],
        check=False,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        print(f"cannot install {requirement}: {r.stderr.strip()[-300:]}", file=sys.stderr)
        return False
    importlib.invalidate_caches()
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def find_command(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def tool_version(cmd: Sequence[str], pattern: str = r"\d+\.\d+(?:\.\d+)?") -> str:
    """First version-looking string printed by *cmd* (stdout or stderr)."""
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(pattern, r.stdout + r.stderr)
    return m.group(0) if m else "?"


def become_subreaper() -> None:
    """Adopt orphaned descendants (daemonized mounts), so their exit can be seen and reaped."""
    import ctypes

    pr_set_child_subreaper = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def reap_orphans() -> None:
    """Collect exited adopted daemons (call after every `Service` has been stopped)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def install_signal_handlers(timeout: float) -> None:
    """SIGTERM/SIGHUP and running past *timeout* seconds raise `Interrupted`."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = "time limit" if signum == signal.SIGALRM else signal.Signals(signum).name
        raise Interrupted(f"stopped by {name}")

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, on_signal)
    if timeout > 0:
        signal.alarm(int(timeout))


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and the alarm while cleaning up."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listening on port {port}")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the benchmark dies, even by SIGKILL."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


@dataclass
class Service:
    """A background process (own session, output to a log file)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 5) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait()


@dataclass
class Services:
    """Every background process a benchmark starts; `stop_all` in ``finally``."""

    tmp: Path
    items: list[Service] = field(default_factory=list)

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Service:
        log = self.tmp / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        svc = Service(name, proc, log)
        self.items.append(svc)
        return svc

    def stop(self, svc: Service) -> None:
        svc.stop()
        if svc in self.items:
            self.items.remove(svc)

    def stop_all(self) -> None:
        for svc in reversed(self.items):
            svc.stop()
        self.items.clear()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for the tools: no CA bundle override (plain HTTP), no proxies."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_CA_BUNDLE",) and not k.lower().endswith("_proxy")
    }
    env.update(extra)
    return env


def run_checked(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
    stdout: Any = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[bytes]:
    """Run *cmd*; a non-zero exit or a timeout is a `BenchError` with stderr's tail."""
    try:
        r = subprocess.run(
            list(cmd),
            stdout=stdout,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env else None,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from e
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip()[-2000:]
        raise BenchError(f"exit {r.returncode}: {shlex.join(cmd)}\n{err}")
    return r


def run_timed(cmd: Sequence[str], **kw: Any) -> float:
    """Seconds *cmd* took (wall clock); see `run_checked`."""
    t0 = time.perf_counter()
    run_checked(cmd, **kw)
    return time.perf_counter() - t0


@dataclass
class Usage:
    seconds: float
    max_rss_kib: int


def run_with_rusage(
    cmd: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 900
) -> Usage:
    """Run *cmd*; wall seconds and its peak RSS (``ru_maxrss`` of ``wait4``)."""
    t0 = time.perf_counter()
    err_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-rusage-{os.getpid()}.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env else None,
        )
    deadline = time.monotonic() + timeout
    try:
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}")
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise BenchError(
                f"exit {proc.returncode}: {shlex.join(cmd)}\n"
                f"{err_path.read_text(errors='replace')[-2000:]}"
            )
        return Usage(seconds, int(ru.ru_maxrss))
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
        err_path.unlink(missing_ok=True)


def proc_status(pid: int, field_name: str) -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def vm_hwm(pid: int) -> int | None:
    """Peak resident set (KiB) of a running process."""
    return proc_status(pid, "VmHWM")


def pids_with_arg(arg: str, exe_hint: str | None = None) -> list[int]:
    """Processes with *arg* as one of their command-line arguments."""
    found = []
    want = arg.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if want in argv and (exe_hint is None or any(exe_hint.encode() in a for a in argv[:2])):
            found.append(int(entry))
    return found


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def sync() -> None:
    os.sync()


# ------------------------------------------------------------------ mounts


def mounted(path: str | Path) -> bool:
    """Whether *path* is a mount point (from /proc/self/mounts; safe on dead FUSE mounts)."""
    p = os.path.abspath(path)
    return p in mount_points()


def mount_points() -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                out.append(parts[1].replace("\\040", " "))
    return out


def unmount(path: str | Path, pids: Sequence[int] = (), wait: float = 20) -> str:
    """Unmount a FUSE mount (lazily when busy) and make sure its daemon exits.

    Returns how it went: ``""`` when cleanly, otherwise a short note.
    """
    p = os.path.abspath(path)
    note = ""
    if mounted(p):
        fm = find_command("fusermount3") or find_command("fusermount")
        tries = ([[fm, "-u", p], [fm, "-u", "-z", p]] if fm else []) + [
            ["umount", p],
            ["umount", "-l", p],
        ]
        for i, cmd in enumerate(tries):
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode == 0 and not mounted(p):
                if "-z" in cmd or "-l" in cmd:
                    note = "lazy unmount (busy)"
                break
            if i == len(tries) - 1:
                note = f"could not unmount: {r.stderr.strip()}"
    deadline = time.monotonic() + wait
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            note = (note + "; " if note else "") + f"daemon {pid} still running: SIGTERM"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            t = time.monotonic() + 5
            while time.monotonic() < t and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return note


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


@dataclass
class Mounts:
    """FUSE mounts made by a benchmark; every one is unmounted by `unmount_all`."""

    active: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, mountpoint: Path, pids: Sequence[int]) -> None:
        self.active[os.path.abspath(mountpoint)] = list(pids)

    def remove(self, mountpoint: Path) -> None:
        p = os.path.abspath(mountpoint)
        pids = self.active.pop(p, [])
        note = unmount(p, pids)
        if note:
            self.notes.append(f"{p}: {note}")
            print(f"  note: {p}: {note}", file=sys.stderr, flush=True)

    def unmount_all(self) -> None:
        for p in list(self.active):
            self.remove(Path(p))


def clear_stale_mounts(under: Path, prefix: str) -> None:
    """Unmount leftovers of earlier runs that were killed (SIGKILL).

    Only mounts below ``under/PREFIX<pid>/`` whose run (that pid) is gone.
    """
    root = os.path.abspath(under) + os.sep
    for p in mount_points():
        if not p.startswith(root):
            continue
        top = p[len(root) :].split(os.sep, 1)[0]
        pid = top[len(prefix) :]
        if not top.startswith(prefix) or not pid.isdigit() or _alive(int(pid)):
            continue
        print(f"unmounting a stale mount of an earlier run: {p}", file=sys.stderr)
        unmount(p, pids_with_arg(p), wait=5)


def clear_stale_dirs(under: Path, prefix: str) -> None:
    """Remove the big files that killed earlier runs left in ``under/PREFIX<pid>/``.

    Their ``logs`` directories stay.
    """
    if not under.is_dir():
        return
    for d in under.iterdir():
        pid = d.name[len(prefix) :]
        if not (d.name.startswith(prefix) and pid.isdigit()) or _alive(int(pid)):
            continue
        if any(m.startswith(str(d) + os.sep) for m in mount_points()):
            continue
        for sub in d.iterdir():
            if sub.is_dir() and sub.name != "logs":
                print(f"removing files of an earlier run: {sub}", file=sys.stderr)
                shutil.rmtree(sub, ignore_errors=True)


# ------------------------------------------------------------------ data


def write_random(path: Path, size: int, chunk: int = 16 * MiB) -> None:
    """*size* random bytes (``os.urandom``) to *path*."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_file(path: str | Path, size: int, digest: str) -> None:
    """Raise `BenchError` unless *path* has *size* bytes hashing to *digest*."""
    try:
        got = os.stat(path).st_size
    except OSError as e:
        raise BenchError(f"{path}: {e.strerror}") from None
    if got != size:
        raise BenchError(f"{path}: {got} bytes, expected {size}")
    if sha256_file(path) != digest:
        raise BenchError(f"{path}: wrong content (SHA-256 differs from the source)")


NEEDLE = "needle-0f5e2b"


def write_text_tree(
    root: Path,
    count: int,
    *,
    dirs: int = 10,
    size: int = 4096,
    needle_every: int = 10,
    seed: int = 1,
) -> int:
    """*count* text files of about *size* bytes in *dirs* subdirectories under *root*.

    Every *needle_every*-th file contains `NEEDLE` once; returns how many do.
    """
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz      \n"
    with_needle = 0
    for i in range(count):
        d = root / f"d{i % dirs:02d}"
        d.mkdir(parents=True, exist_ok=True)
        n = rng.randint(size // 2, size + size // 2)
        text = "".join(rng.choices(alphabet, k=n))
        if i % needle_every == 0:
            pos = rng.randrange(len(text))
            text = text[:pos] + NEEDLE + text[pos:]
            with_needle += 1
        (d / f"f{i:05d}.txt").write_text(text)
    return with_needle


def write_many(root: Path, count: int, size: int = 100) -> None:
    """*count* small files in one directory."""
    root.mkdir(parents=True, exist_ok=True)
    blob = b"x" * size
    for i in range(count):
        (root / f"obj{i:05d}.dat").write_bytes(blob)


# ------------------------------------------------------------------ servers


def start_test_server(
    services: Services, name: str, bucket: str, directory: Path, *extra: str
) -> str:
    """The package's OSS-dialect test server over *directory*; returns its base URL."""
    port_file = services.tmp / f"{name}.port"
    port_file.unlink(missing_ok=True)
    cmd = [
        str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable),
        "-m",
        "ossfs.testing",
        "serve",
        "--bucket",
        f"{bucket}={directory}",
        "--port-file",
        str(port_file),
        *extra,
    ]
    svc = services.start(name, cmd, cwd=REPO)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if svc.proc.poll() is not None:
            raise BenchError(f"test server exited: {log_tail(svc.log)}")
        if time.monotonic() > deadline:
            raise BenchError("test server did not start")
        time.sleep(0.05)
    port = int(port_file.read_text().strip())
    wait_for_port(port, svc.proc)
    return f"http://127.0.0.1:{port}"


def ranged_curls(url: str, size: int, n: int) -> list[list[str]]:
    """*n* curl commands that fetch one 1/n range each of the object at *url* to
    /dev/null: run at once, the server's (or the link's) limit."""
    span = -(-size // n)
    ranges = [f"{i * span}-{min(size, (i + 1) * span) - 1}" for i in range(n)]
    return [["curl", "-s", "-f", "-o", "/dev/null", "-r", r, url] for r in ranges]


def run_at_once(cmds: Sequence[Sequence[str]], timeout: float) -> float:
    """Seconds for *cmds* run all at once (BenchError if one fails)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(list(c), stdin=subprocess.DEVNULL) for c in cmds]
    try:
        codes = [p.wait(timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        raise BenchError(f"{cmds[0][0]} failed: exit codes {codes}")
    return time.perf_counter() - t0


class ServerPair:
    """nginx for the objects, the test server for the listings, on one directory.

    *root* holds one directory per bucket; ``root/BUCKET/KEY`` is the object
    ``BUCKET/KEY``.
    """

    def __init__(
        self,
        services: Services,
        root: Path,
        bucket: str,
        *,
        workers: int = 2,
        count_requests: bool = False,
        limit_rate: str | None = None,
        name: str = "nginx",
    ) -> None:
        """*limit_rate*: nginx's ``limit_rate`` for object answers (bytes per second
        per connection, e.g. ``25m``: a simulated WAN link); *name* tells two pairs'
        files and logs apart."""
        self.services = services
        self.limit_rate = limit_rate
        self.name = name
        self.root = root
        self.bucket = bucket
        self.workers = workers
        # With count_requests, nginx logs one short line per request (`requests_since`).
        self.access_log = services.tmp / name / "requests.log" if count_requests else None
        self.port = 0
        self.listing_url = ""
        self.nginx_conf = services.tmp / name / "nginx.conf"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def object_url(self, key: str) -> str:
        return f"{self.url}/{self.bucket}/{key}"

    def start(self) -> ServerPair:
        self.listing_url = start_test_server(
            self.services,
            f"{self.name}-listing-server",
            self.bucket,
            self.root / self.bucket,
            "--anonymous",
            "--no-crc",
        )
        nginx = find_command("nginx")
        if nginx is None:
            raise BenchError("nginx not found (apt-get install nginx-light)")
        t = self.nginx_conf.parent
        t.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        lport = self.listing_url.rsplit(":", 1)[1]
        user = "user root;\n" if os.geteuid() == 0 else ""
        temps = "".join(
            f"    {kind}_temp_path {t}/{kind}_temp;\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.nginx_conf.write_text(
            f"daemon off;\n{user}worker_processes {self.workers};\npid {t}/nginx.pid;\n"
            f"error_log {t}/error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "http {\n"
            + (
                "    access_log off;\n"
                if self.access_log is None
                else "    log_format counts '$request_method $uri $status';\n"
                f"    access_log {self.access_log} counts;\n"
            )
            + "    sendfile on;\n    tcp_nopush on;\n"
            "    keepalive_requests 1000000;\n    keepalive_timeout 300s;\n"
            "    default_type application/octet-stream;\n"
            f"{temps}"
            f"    upstream listing {{ server 127.0.0.1:{lport}; keepalive 32; }}\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.port} backlog=4096;\n"
            f"        root {self.root};\n"
            "        # A bucket itself (no key after it): listings etc. -> the test server.\n"
            '        location ~ "^/[^/]*/?$" {\n'
            "            proxy_pass http://listing;\n"
            "            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";\n'
            "            proxy_set_header Host $http_host;\n"
            "            proxy_read_timeout 300s;\n"
            "        }\n"
            "        # Objects: files only (a directory is a missing key, not a 403/301).\n"
            "        location / { try_files $uri =404; "
            + (f"limit_rate {self.limit_rate}; " if self.limit_rate else "")
            + "}\n"
            "    }\n"
            "}\n"
        )
        svc = self.services.start(
            self.name, [nginx, "-p", str(t), "-c", str(self.nginx_conf), "-e", str(t / "error.log")]
        )
        wait_for_port(self.port, svc.proc)
        return self

    def log_position(self) -> int:
        """Where the request log ends now (for `requests_since`)."""
        if self.access_log is None or not self.access_log.exists():
            return 0
        return self.access_log.stat().st_size

    def requests_since(self, position: int) -> dict[str, int]:
        """Requests logged after *position*: ``{"list": n, "head": n, "get": n, "other": n}``.

        A listing is a GET of the bucket itself; a GET or HEAD of a key is an object request.
        """
        counts = {"list": 0, "head": 0, "get": 0, "other": 0}
        if self.access_log is None or not self.access_log.exists():
            return counts
        with open(self.access_log, "rb") as f:
            f.seek(position)
            for line in f.read().decode(errors="replace").splitlines():
                method, _, rest = line.partition(" ")
                uri = rest.rpartition(" ")[0]
                is_bucket = uri.strip("/") == self.bucket
                if method == "GET" and is_bucket:
                    counts["list"] += 1
                elif method == "GET":
                    counts["get"] += 1
                elif method == "HEAD" and not is_bucket:
                    counts["head"] += 1
                else:
                    counts["other"] += 1
        return counts

    def check(self, key: str) -> None:
        """HEAD, a range, If-Match (206 / 412) and a listing work through nginx."""
        path = self.root / self.bucket / key
        size = path.stat().st_size
        with open(path, "rb") as f:
            head_bytes = f.read(100)

        def req(method: str, url: str, headers: dict[str, str]) -> tuple[int, Any, bytes]:
            # A new connection each time: nginx closes the connection after a 412.
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request(method, url, headers=headers)
                r = conn.getresponse()
                return r.status, r.headers, r.read()
            finally:
                conn.close()

        url = f"/{self.bucket}/{key}"
        status, h, _ = req("HEAD", url, {"Authorization": "ignored"})
        etag = h.get("ETag", "")
        if status != 200 or int(h.get("Content-Length", -1)) != size or not etag:
            raise BenchError(f"HEAD {url}: {status} {dict(h)}")
        status, h, body = req("GET", url, {"Range": "bytes=0-99"})
        if status != 206 or body != head_bytes[:100]:
            raise BenchError(f"GET {url} bytes=0-99: {status}, {len(body)} bytes")
        status, _, body = req("GET", url, {"Range": "bytes=0-99", "If-Match": etag})
        if status != 206 or body != head_bytes[:100]:
            raise BenchError(f"If-Match {etag}: expected 206, got {status}")
        status, _, _ = req("GET", url, {"Range": "bytes=0-99", "If-Match": '"0-0"'})
        if status != 412:
            raise BenchError(f"If-Match with a wrong ETag: expected 412, got {status}")
        status, _, body = req("GET", f"/{self.bucket}/?list-type=2&prefix={key}", {})
        text = body.decode(errors="replace")
        if status != 200 or f"<Key>{key}</Key>" not in text:
            raise BenchError(f"listing through nginx: {status} {text[:300]}")
        listed = re.search(r"<ETag>([^<]*)</ETag>", text)
        if not listed or listed.group(1).replace("&quot;", '"').strip('"') != etag.strip('"'):
            raise BenchError(f"listing ETag {listed and listed.group(1)} != HEAD ETag {etag}")
        status, _, body = req("GET", f"/{self.bucket}?prefix={key}", {})
        if status != 200 or f"<Key>{key}</Key>" not in body.decode(errors="replace"):
            raise BenchError(f"V1 listing through nginx: {status}")


# ------------------------------------------------------------------ statistics


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float], digits: int = 2) -> str:
    """``median (min-max)`` of a few runs."""
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def rotations(items: Sequence[Any], n: int) -> list[list[Any]]:
    """*n* orders of *items*, each rotated by one more (ABC, BCA, CAB, ABC...).

    Over len(items) rounds every item runs once in every position.
    """
    out = []
    for i in range(n):
        k = i % len(items)
        out.append(list(items[k:]) + list(items[:k]))
    return out


def target_cell(
    ratio: float | None, target: float, *, at_most: bool = False, unit: str = "x", digits: int = 2
) -> tuple[str, str]:
    """(``"1.35x"``, ``">= 1.2x: met"``) for a measured ratio against a target."""
    sign = "<" if at_most else ">="
    if ratio is None:
        return "-", f"{sign} {target:g}{unit}: not measured"
    ok = ratio < target if at_most else ratio >= target
    return (
        f"{ratio:.{digits}f}{unit}",
        f"{sign} {target:g}{unit}: {'met' if ok else '**not met**'}",
    )


# ------------------------------------------------------------------ report


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_info(paths: Sequence[Path] = ()) -> list[str]:
    """Markdown bullet lines: date, kernel, CPU, nproc, memory, disks."""

    def out(cmd: Sequence[str]) -> str:
        try:
            return subprocess.run(
                list(cmd), capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except OSError:
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = next((ln for ln in out(["free", "-h"]).splitlines() if ln.startswith("Mem:")), "?")
    lines = [
        f"- date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {platform.system()} {platform.release()}, {cpu}, nproc {out(['nproc'])}",
        f"- memory (`free -h`): `{' '.join(mem.split())}`",
    ]
    for p in paths:
        df = out(["df", "-h", "--output=source,fstype,size,avail", str(p)]).splitlines()
        if len(df) > 1:
            lines.append(f"- disk of `{p}`: `{' '.join(df[1].split())}`")
    return lines


def ossfs_revision() -> str:
    """The commit of the code measured, and whether ossfs/ had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
        except OSError:
            return ""

    head = git("log", "-1", "--format=%h %ad", "--date=format:%Y-%m-%d %H:%M")
    if not head:
        return "unknown (not a git checkout)"
    dirty = [ln for ln in git("status", "--porcelain", "--", "ossfs").splitlines() if ln]
    return f"commit {head}" + (
        f" with {len(dirty)} uncommitted change(s) under ossfs/" if dirty else ""
    )


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    try:
        with open("/proc/loadavg") as f:
            return " / ".join(f.read().split()[:3])
    except OSError:
        return "?"


@dataclass
class Report:
    """A markdown document built while a benchmark runs; `write` saves it."""

    title: str
    parts: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.parts.append(text.rstrip() + "\n")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.add(md_table(header, rows))

    def text(self) -> str:
        return re.sub(r"\n{3,}", "\n\n", f"# {self.title}\n\n" + "\n".join(self.parts))

    def write(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.text())


def say(*args: Any) -> None:
    print(*args, flush=True)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
