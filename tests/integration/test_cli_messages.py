"""What a user sees when something is wrong: one clear line, the right exit code.

Each case runs the ``ossfs`` command as a user would (a subprocess) and checks
its exit code and stderr: a path that cannot be written, a cache directory or
log file that cannot be used, a mount that fails in the daemon, TLS spoken to a
plain-HTTP port, a zero stall timeout, unknown fstab options, unmounting
nothing, dead mounts, and ``materialize``'s summary, retries and messages.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ossfs.testing import Fault, OssTestServer
from tests.helpers import OSSFS, force_unmount, is_mounted, mounted, run_ossfs

BUCKET = "bkt"
KiB = 1024


def one_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single ``ossfs: error:`` line of a failed run with exit *code*."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("ossfs: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def srv(oss_server: OssTestServer) -> OssTestServer:
    oss_server.put(BUCKET, "dir/a.bin", os.urandom(3 * 100 * KiB + 5))
    oss_server.put(BUCKET, "dir/b.txt", b"bee\n")
    oss_server.put(BUCKET, "dir/sub/c.txt", b"sea\n")
    return oss_server


def conn(server: OssTestServer, tmp_path: Path) -> list[str]:
    return [
        "--endpoint",
        server.url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--part-size",
        "100KiB",
    ]


@contextlib.contextmanager
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can write to, root included (a read-only tmpfs)."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        return
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "ossfs-test-ro", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


# ---------------------------------------------------------------- paths that cannot be used


def test_download_to_a_path_that_cannot_be_written(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    with read_only_dir(tmp_path) as ro:
        r = run_ossfs(
            "download",
            f"oss://{BUCKET}/dir/b.txt",
            str(ro / "x.txt"),
            "--endpoint",
            srv.url,
            env=oss_env,
        )
        line = one_error(r, 1)
        assert str(ro) in line and ("Read-only" in line or "Permission denied" in line)
    r = run_ossfs(
        "download", f"oss://{BUCKET}/dir/b.txt", "/proc/x.bin", "--endpoint", srv.url, env=oss_env
    )
    assert "/proc/x.bin" in one_error(r, 1)


def test_mount_log_file_that_cannot_be_written(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for extra in ([], ["-f"]):
        r = run_ossfs(
            "mount",
            f"oss://{BUCKET}",
            str(mnt),
            *conn(srv, tmp_path),
            "--log-file",
            str(tmp_path / "no" / "such" / "x.log"),
            *extra,
            env=oss_env,
            timeout=60,
        )
        line = one_error(r, 2)
        assert "--log-file" in line and "No such file or directory" in line
        assert "died" not in r.stderr and not is_mounted(mnt)


@pytest.mark.parametrize("command", ["mount", "materialize"])
def test_cache_dir_that_cannot_be_used(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path, command: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    args = [f"oss://{BUCKET}", str(mnt)] if command == "mount" else [f"oss://{BUCKET}/dir/"]
    with read_only_dir(tmp_path) as ro:
        for cache, reason in (
            (a_file, "not a directory"),
            (ro / "cache", "cannot be created"),
            (ro, "not writable"),
            (a_file / "sub", "cannot be created"),
        ):
            r = run_ossfs(
                command,
                *args,
                "--endpoint",
                srv.url,
                "--cache-dir",
                str(cache),
                env=oss_env,
                timeout=60,
            )
            line = one_error(r, 2)
            assert f"--cache-dir {cache}" in line and reason in line, line
            assert not is_mounted(mnt)


# ---------------------------------------------------------------- reasons, not symptoms


@pytest.mark.fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="runs the mount as another user")
def test_daemon_mount_failure_shows_the_reason(srv: OssTestServer, oss_env: dict[str, str]) -> None:
    # As an ordinary user, allow_other needs user_allow_other in /etc/fuse.conf (and
    # /dev/fuse may not be open to everyone); libfuse says why on stderr, which the
    # daemonized child must hand to the parent.
    with open("/etc/fuse.conf") as f:
        if any(ln.strip() == "user_allow_other" for ln in f):
            pytest.skip("/etc/fuse.conf allows allow_other for everyone")
    try:
        subprocess.run(
            [*OSSFS, "--version"], user=65534, group=65534, check=True, capture_output=True, cwd="/"
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("this Python cannot be run by another user")
    work = Path(tempfile.mkdtemp(prefix="ossfs-nobody-"))
    try:
        work.chmod(0o777)
        (work / "mnt").mkdir()
        os.chown(work / "mnt", 65534, 65534)
        env = dict(
            oss_env,
            HOME=str(work),
            XDG_CACHE_HOME=str(work / "cache"),
            XDG_CONFIG_HOME=str(work / "config"),
        )
        r = subprocess.run(
            [
                *OSSFS,
                "mount",
                f"oss://{BUCKET}",
                str(work / "mnt"),
                "--endpoint",
                srv.url,
                "--cache-dir",
                str(work / "cache"),
                "--allow-other",
            ],
            env=env,
            user=65534,
            group=65534,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=work,
        )
        line = one_error(r, 1)
        # Which check refuses first depends on the machine (/dev/fuse may be root's
        # only); either way libfuse's own words must be in the one line.
        assert "fuse_session_mount failed (" in line, line
        assert "user_allow_other" in line or "/dev/fuse: Permission denied" in line, line
        assert not is_mounted(work / "mnt")
    finally:
        force_unmount(work / "mnt")
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_https_to_a_plain_http_port_says_tls(srv: OssTestServer, oss_env: dict[str, str]) -> None:
    hostport = srv.url.removeprefix("http://")  # no scheme: https is assumed
    r = run_ossfs("ls", f"oss://{BUCKET}/", "--endpoint", hostport, env=oss_env)
    line = one_error(r, 1)
    assert "TLS" in line and "http://" in line, line
    assert "attempts" not in line  # no retry can help


def test_zero_stall_timeout_is_refused(srv: OssTestServer, oss_env: dict[str, str]) -> None:
    r = run_ossfs(
        "ls", f"oss://{BUCKET}/", "--endpoint", srv.url, "--stall-timeout", "0", env=oss_env
    )
    assert r.returncode == 2 and "--stall-timeout" in r.stderr
    assert "must be more than 0" in r.stderr and "Traceback" not in r.stderr


def test_one_attempt_is_singular(oss_env: dict[str, str]) -> None:
    with OssTestServer() as dead:
        url = dead.url
    # --retries is the old name of --attempts: both still work.
    r = run_ossfs("ls", f"oss://{BUCKET}/", "--endpoint", url, "--retries", "1", env=oss_env)
    line = one_error(r, 1)
    assert "after 1 attempt:" in line, line


def test_unknown_fstab_option_is_named_as_given(tmp_path: Path) -> None:
    r = run_ossfs(f"oss://{BUCKET}", str(tmp_path), "-o", "ro,bogus=1")
    assert "unknown mount option 'bogus=1'" in one_error(r, 2)
    r = run_ossfs(f"oss://{BUCKET}", str(tmp_path), "-o", "foreground=yes")
    assert "unknown mount option 'foreground=yes'" in one_error(r, 2)


def test_unmount_of_nothing_says_so(tmp_path: Path) -> None:
    r = run_ossfs("unmount", str(tmp_path))
    assert "nothing is mounted there" in one_error(r, 2)
    r = run_ossfs("unmount", str(tmp_path / "absent"))
    assert "does not exist" in one_error(r, 2)


def test_unmount_does_not_load_the_fuse_binding(tmp_path: Path) -> None:
    # ossfs unmount (status, materialize PATH) must work where pyfuse3 cannot load:
    # it needs the mount table, not the file system.
    code = (
        "import sys; from ossfs.cli import main\n"
        f"rc = main(['unmount', {str(tmp_path)!r}])\n"
        "print('LOADED' if 'pyfuse3' in sys.modules else 'NOT LOADED')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert "nothing is mounted there" in r.stderr, r.stderr
    assert r.stdout.strip() == "NOT LOADED", r.stdout + r.stderr


# ---------------------------------------------------------------- mounts


def kill_mount_process(pid: object) -> None:
    """SIGKILL a mount's process and wait (up to 5 s) until it is gone: its mount is dead."""
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(pid, 0)
            time.sleep(0.05)
            continue
        break


@pytest.mark.fuse
def test_dead_mount_is_named_and_cleaned_up(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    try:
        with mounted(f"oss://{BUCKET}", mnt, *conn(srv, tmp_path), env=oss_env) as info:
            assert (mnt / "dir" / "b.txt").read_bytes() == b"bee\n"
            kill_mount_process(info["pid"])
            r = run_ossfs("status", str(mnt), env=oss_env)
            line = one_error(r, 2)
            assert "dead mount" in line and f"ossfs unmount {mnt}" in line, line
            r = run_ossfs("materialize", str(mnt / "dir"), env=oss_env)
            assert "dead mount" in one_error(r, 2)
            # Mounting again on our own dead mount cleans it up and mounts.
            r = run_ossfs(
                "mount", f"oss://{BUCKET}", str(mnt), *conn(srv, tmp_path), env=oss_env, timeout=60
            )
            assert r.returncode == 0, r.stderr
            assert "dead ossfs mount" in r.stderr
            assert (mnt / "dir" / "sub" / "c.txt").read_bytes() == b"sea\n"
    finally:
        force_unmount(mnt)


@pytest.mark.fuse
def test_mount_replaces_a_dead_mount_that_is_still_in_use(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    """A mount process that died (a restarted DaemonSet pod) while a process held a file
    open in it: mounting again detaches the dead mount lazily and mounts anew."""
    mnt = tmp_path / "mnt"
    held: int | None = None
    try:
        with mounted(f"oss://{BUCKET}", mnt, *conn(srv, tmp_path), env=oss_env) as info:
            held = os.open(mnt / "dir" / "b.txt", os.O_RDONLY)
            kill_mount_process(info["pid"])
            with pytest.raises(OSError) as dead:
                os.statvfs(mnt)  # (stat may be answered from the kernel's cache)
            assert dead.value.errno == errno.ENOTCONN
            # Busy: a plain unmount of it fails.
            busy = subprocess.run(
                ["fusermount3", "-u", str(mnt)], capture_output=True, text=True, check=False
            )
            assert busy.returncode != 0
            r = run_ossfs(
                "mount", f"oss://{BUCKET}", str(mnt), *conn(srv, tmp_path), env=oss_env, timeout=60
            )
            assert r.returncode == 0, r.stderr
            assert "dead ossfs mount" in r.stderr and "lazily" in r.stderr
            assert (mnt / "dir" / "sub" / "c.txt").read_bytes() == b"sea\n"
            # What the old mount's file still gets: an error, never other bytes.
            with pytest.raises(OSError):
                os.pread(held, 4, 0)
    finally:
        if held is not None:
            with contextlib.suppress(OSError):  # closed, but its flush may fail
                os.close(held)
        force_unmount(mnt)


@pytest.mark.fuse
def test_foreground_mount_exits_130_on_ctrl_c(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [*OSSFS, "mount", f"oss://{BUCKET}", str(mnt), "-f", *conn(srv, tmp_path)],
        env=oss_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(200):
            if is_mounted(mnt):
                break
            time.sleep(0.05)
        assert is_mounted(mnt)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        force_unmount(mnt)


@pytest.mark.fuse
def test_status_all_tells_versions_apart(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        *conn(srv, tmp_path),
        "--ttl",
        "0",
        "--negative-ttl",
        "0",
        env=oss_env,
    ):
        assert (mnt / "dir" / "b.txt").read_bytes() == b"bee\n"
        srv.put(BUCKET, "dir/b.txt", b"a new bee\n")
        for _ in range(50):  # the kernel may still hold the old attributes briefly
            if (mnt / "dir" / "b.txt").read_bytes() == b"a new bee\n":
                break
            time.sleep(0.1)
        r = run_ossfs("status", str(mnt), "--all", env=oss_env, check=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.endswith(")") and "b.txt" in ln]
        assert len(lines) == 2, r.stdout
        assert len({ln.rsplit("(ETag ", 1)[1] for ln in lines}) == 2
        doc = json.loads(run_ossfs("status", str(mnt), "--json", env=oss_env, check=True).stdout)
        assert all("etag" in o for o in doc["objects_cached"])
        # Where the credentials come from (never the key itself), and no expiry for keys
        # that do not expire.
        assert doc["credentials"] == "OSS_ACCESS_KEY_ID"
        assert doc["credentials_expire"] is None
        assert "credentials: OSS_ACCESS_KEY_ID\n" in r.stdout


@pytest.mark.fuse
def test_materialize_in_a_mount_uses_the_mounts_config_file(
    srv: OssTestServer, cli_env: dict[str, str], tmp_path: Path
) -> None:
    # The credentials are only in a config file named at mount time (as an fstab
    # line does with -o config=...): materialize must find the same file.
    from tests.integration.conftest import OSS_ACCESS_KEY_ID, OSS_ACCESS_KEY_SECRET

    config = tmp_path / "elsewhere.toml"
    config.write_text(
        f'[default]\nendpoint = "{srv.url}"\n'
        f'access_key_id = "{OSS_ACCESS_KEY_ID}"\n'
        f'access_key_secret = "{OSS_ACCESS_KEY_SECRET}"\n'
    )
    config.chmod(0o600)
    mnt = tmp_path / "mnt"
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        "--config",
        str(config),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--part-size",
        "100KiB",
        env=cli_env,
    ):
        r = run_ossfs("materialize", str(mnt / "dir"), env=cli_env)
        assert r.returncode == 0, r.stderr
        assert "materialized 3 object(s)" in r.stderr


# ---------------------------------------------------------------- materialize


def materialize(
    server: OssTestServer, env: dict[str, str], tmp_path: Path, target: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return run_ossfs("materialize", target, *conn(server, tmp_path), *args, env=env)


def test_materialize_summary_counts_failures_apart(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    srv.faults.add(Fault("status", status=403, op="get", key="dir/b.txt"), times=None)
    r = materialize(srv, oss_env, tmp_path, f"oss://{BUCKET}/dir/", "--attempts", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"ossfs: failed: oss://{BUCKET}/dir/b.txt: " in r.stderr, r.stderr
    assert f"materialized 2 of 3 object(s) (1 failed) of oss://{BUCKET}/dir/" in r.stderr


def test_materialize_starts_a_replaced_object_over(
    srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path
) -> None:
    # More than one GET's run of parts (8 MiB), so that a GET follows the replacing one.
    srv.put(BUCKET, "dir/a.bin", os.urandom(9 * 1024 * KiB))
    new = os.urandom(9 * 1024 * KiB + 9)
    srv.faults.add(Fault("replace", op="get", key="dir/a.bin", after_bytes=1000, data=new))
    out = tmp_path / "out" / "deeper"  # --to creates what is missing
    # One connection: the GET after the replacing one is surely sent after the replace
    # (with several, a starved server thread may replace only once every old part was
    # served: a whole old version, also a right answer, but not this test's case).
    r = materialize(
        srv, oss_env, tmp_path, f"oss://{BUCKET}/dir/", "--to", str(out), "--threads", "1"
    )
    assert r.returncode == 0, r.stderr
    assert "changed while it was fetched: starting it over" in r.stderr
    assert "materialized 3 object(s)" in r.stderr
    assert (out / "a.bin").read_bytes() == new


def test_materialize_messages(srv: OssTestServer, oss_env: dict[str, str], tmp_path: Path) -> None:
    r = materialize(srv, oss_env, tmp_path, f"oss://{BUCKET}/nothing/")
    line = one_error(r, 1)
    assert f"no object under oss://{BUCKET}/nothing/" in line and "NoSuchKey" not in line
    r = materialize(srv, oss_env, tmp_path, f"oss://{BUCKET}/dir/nothing")
    assert f"oss://{BUCKET}/dir/nothing" in one_error(r, 1)
    # A path that is in no mount names itself, not "/".
    r = materialize(srv, oss_env, tmp_path, str(tmp_path))
    line = one_error(r, 2)
    assert f"{tmp_path} is not inside an ossfs mount" in line, line
    a_file = tmp_path / "f"
    a_file.write_text("x")
    r = materialize(srv, oss_env, tmp_path, f"oss://{BUCKET}/dir/", "--to", str(a_file))
    assert "is not a directory" in one_error(r, 2)
    # A shard that happens to hold none of the objects is done, not failed.
    from ossfs.materialize import in_shard

    keys = ["dir/a.bin", "dir/b.txt", "dir/sub/c.txt"]
    empty = next(i for i in range(100) if not any(in_shard(k, (i, 100)) for k in keys))
    r = materialize(srv, oss_env, tmp_path, f"oss://{BUCKET}/dir/", "--shard", f"{empty}/100")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"shard {empty}/100 holds none of the 3 object(s)" in r.stderr
    assert "materialized 0 object(s)" in r.stderr
