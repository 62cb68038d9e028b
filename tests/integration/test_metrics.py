"""``--metrics ADDR:PORT``: Prometheus text scraped from a real mount while it reads.

The counters must move by what the test server counted: bytes fetched equal
the body bytes it sent, GETs by status equal the GETs it answered, a read of a
cold file is all cache misses and the same read after the page cache is
dropped all hits; the numbers are the ones ``ossfs status`` shows. A bad
address or a port in use ends the command with one line.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ossfs.testing import Fault, OssTestServer
from tests.helpers import is_mounted, mounted, run_ossfs
from tests.integration.conftest import settled_stats

MiB = 1 << 20
BUCKET = "metrics"
SIZE = 6 * MiB + 12345

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def server() -> Iterator[OssTestServer]:
    with OssTestServer(credentials={"m-ak": "m-sk"}) as srv:
        srv.put(BUCKET, "data/one.bin", os.urandom(SIZE))
        srv.put(BUCKET, "data/two.bin", os.urandom(3 * MiB))
        yield srv


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return {**cli_env, "OSS_ACCESS_KEY_ID": "m-ak", "OSS_ACCESS_KEY_SECRET": "m-sk"}


def scrape(where: str) -> Samples:
    with urllib.request.urlopen(f"http://{where}/metrics", timeout=30) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def read_all(path: Path) -> bytes:
    """Read a file through the mount, after dropping its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, MiB):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def settle(where: str) -> Samples:
    """A scrape once no GET is running any more (read-ahead may end after the read)."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(where)
        if value(samples, "ossfs_gets_in_flight") == 0:
            return samples
        assert time.monotonic() < deadline, "GETs still in flight after 30 s"
        time.sleep(0.05)


@pytest.mark.fuse
def test_counters_move_by_what_the_server_sent(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        "--endpoint",
        server.url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--part-size",
        "1MiB",
        "--metrics",
        "127.0.0.1:0",
        env=env,
    ) as info:
        where = str(info["metrics"])
        assert where.startswith("127.0.0.1:") and not where.endswith(":0")
        before = settle(where)
        sent_before = settled_stats(server)

        # A cold read, with one 503 on the way (retried).
        server.faults.add(Fault("status", status=503, op="get", key="data/one.bin"))
        assert read_all(mnt / "data" / "one.bin") == server.get(BUCKET, "data/one.bin")
        cold = settle(where)
        sent = settled_stats(server)
        body_bytes = sent.bytes_sent - sent_before.bytes_sent
        new_gets = sent.gets[len(sent_before.gets) :]

        def moved(
            name: str, samples: Samples = cold, base: Samples = before, **labels: str
        ) -> float:
            return value(samples, name, **labels) - value(base, name, **labels)

        assert body_bytes == SIZE  # the object once
        assert moved("ossfs_fetched_bytes_total") == body_bytes
        assert moved("ossfs_received_bytes_total") == body_bytes
        assert moved("ossfs_requests_total", kind="get", status="206") == sum(
            g.status == 206 for g in new_gets
        )
        assert (
            moved("ossfs_requests_total", kind="get", status="503")
            == sum(g.status == 503 for g in new_gets)
            == 1
        )
        assert moved("ossfs_request_retries_total") == 1
        assert moved("ossfs_cache_miss_bytes_total") + moved("ossfs_cache_hit_bytes_total") == SIZE
        assert moved("ossfs_cache_miss_bytes_total") > 0
        assert value(cold, "ossfs_cache_used_bytes") >= SIZE
        reads = moved("ossfs_fuse_requests_total", op="read")
        assert reads > 0
        assert moved("ossfs_fuse_request_duration_seconds_count", op="read") == reads
        assert moved("ossfs_fuse_request_duration_seconds_bucket", op="read", le="+Inf") == reads
        assert moved("ossfs_fuse_request_duration_seconds_count", op="open") >= 1
        # Idle connections keep their 1 MiB receive buffer.
        buffered = value(cold, "ossfs_buffered_bytes")
        assert buffered > 0 and buffered % MiB == 0

        # The same file again, its pages dropped: every read byte from the cache.
        assert read_all(mnt / "data" / "one.bin") == server.get(BUCKET, "data/one.bin")
        warm = settle(where)
        assert len(settled_stats(server).gets) == len(sent.gets)
        assert moved("ossfs_cache_hit_bytes_total", warm, cold) == SIZE
        assert moved("ossfs_cache_miss_bytes_total", warm, cold) == 0
        assert moved("ossfs_fetched_bytes_total", warm, cold) == 0

        # `ossfs status` shows the same counters.
        result = run_ossfs("status", str(mnt), "--json", env=env, check=True)
        status = json.loads(result.stdout)
        after = scrape(where)
        assert status["bytes_fetched"] == value(after, "ossfs_fetched_bytes_total")
        assert status["cache_hit_bytes"] == value(after, "ossfs_cache_hit_bytes_total")
        assert status["cache_miss_bytes"] == value(after, "ossfs_cache_miss_bytes_total")
        assert status["requests"]["bytes_received"] == value(after, "ossfs_received_bytes_total")
        assert status["requests"]["retries"] == value(after, "ossfs_request_retries_total")
        assert status["cache_used_bytes"] == value(after, "ossfs_cache_used_bytes")
        assert ("ossfs_cache_disk_behind", ()) in after
        assert value(after, "ossfs_cache_disk_behind") == int(status["cache_disk_behind"])
        assert status["metrics"] == where
        text = run_ossfs("status", str(mnt), env=env, check=True).stdout
        assert f"metrics:     http://{where}/metrics" in text


@pytest.mark.fuse
def test_gets_in_flight_while_a_get_is_held(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    gate = threading.Event()

    def hold(_info: object) -> bool:
        gate.wait(60)
        return False  # the fault never fires: the GET only waits for the gate

    server.faults.add(Fault("status", op="get", when=hold), times=None)
    mnt = tmp_path / "mnt"
    got: list[bytes] = []
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        "--endpoint",
        server.url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--metrics",
        "127.0.0.1:0",
        env=env,
    ) as info:
        where = str(info["metrics"])
        reader = threading.Thread(target=lambda: got.append(read_all(mnt / "data" / "two.bin")))
        reader.start()
        try:
            deadline = time.monotonic() + 60
            while value(scrape(where), "ossfs_gets_in_flight") < 1:
                assert time.monotonic() < deadline, "no GET in flight seen"
                time.sleep(0.05)
        finally:
            gate.set()
            reader.join(120)
        assert got == [server.get(BUCKET, "data/two.bin")]
        assert value(settle(where), "ossfs_gets_in_flight") == 0


def test_bad_addresses_are_one_line(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        cases = {
            f"127.0.0.1:{port}": "another process listens there",
            f":{port}": "give where to listen",
            "127.0.0.1": "not ADDR:PORT",
            "127.0.0.1:70000": "not ADDR:PORT",
            "::1:9100": "in brackets",
            # Not an address of this machine (TEST-NET-1): only bound, never sent to.
            "192.0.2.1:9100": "cannot listen there",
        }
        for listen, says in cases.items():
            for command in (
                ["mount", f"oss://{BUCKET}", str(mnt), "-f"],
                ["materialize", f"oss://{BUCKET}/data/"],
            ):
                result = run_ossfs(
                    *command,
                    "--endpoint",
                    server.url,
                    "--cache-dir",
                    str(tmp_path / "cache"),
                    "--metrics",
                    listen,
                    env=env,
                )
                assert result.returncode == 2, (listen, result.stderr)
                errors = [ln for ln in result.stderr.splitlines() if "error" in ln]
                assert len(errors) == 1 and says in errors[0], (listen, result.stderr)
                assert "Traceback" not in result.stderr
                assert not is_mounted(mnt)
        assert server.stats.count(op="get") == 0
    finally:
        busy.close()


def test_materialize_serves_metrics_while_it_runs(
    server: OssTestServer, env: dict[str, str], tmp_path: Path
) -> None:
    """A long materialize run (held here at its first GET) shows its counters."""
    import subprocess

    from tests.helpers import OSSFS

    gate = threading.Event()
    server.faults.add(
        Fault("status", op="get", when=lambda _i: not gate.wait(60) and False), times=None
    )
    with socket.socket() as s:  # a free port (materialize does not report port 0)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            *OSSFS,
            "materialize",
            f"oss://{BUCKET}/data/",
            "--endpoint",
            server.url,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--metrics",
            f"127.0.0.1:{port}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                samples = scrape(f"127.0.0.1:{port}")
            except OSError:
                samples = {}
            if value(samples, "ossfs_gets_in_flight") >= 1:
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no GET in flight seen"
            time.sleep(0.05)
        assert value(samples, "ossfs_requests_total", kind="list", status="200") >= 1
        assert value(samples, "ossfs_fetched_bytes_total") == 0
    finally:
        gate.set()
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
