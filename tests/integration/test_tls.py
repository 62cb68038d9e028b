"""HTTPS: both network paths (httpx for HEAD/LIST, wire for object bytes) over real TLS.

Real OSS endpoints are HTTPS. The test server serves TLS with a certificate
from a test CA (trustme); the client trusts it through SSL_CERT_FILE, as a
user with a private CA would, and refuses it without.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from ossfs.client import ClientConfig, HttpObjectClient
from ossfs.errors import TransferError
from ossfs.testing import OssTestServer
from tests.helpers import mounted, run_ossfs

BUCKET = "secure"
MiB = 1 << 20


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[OssTestServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with OssTestServer(credentials={"tls-ak": "tls-sk"}, tls=context) as srv:
        srv.put(BUCKET, "data/blob.bin", os.urandom(5 * MiB + 3))
        srv.put(BUCKET, "data/small.txt", b"over tls\n")
        yield srv


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def test_client_over_tls(
    tls_server: OssTestServer, ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    want = tls_server.get(BUCKET, "data/blob.bin")

    async def main() -> None:
        async with HttpObjectClient(tls_server.endpoint()) as client:
            meta = await client.head(BUCKET, "data/blob.bin")
            page = await client.list_page(BUCKET, prefix="data/")
            got = bytearray()

            def sink(offset: int, data: memoryview) -> None:
                assert offset == 1000 + len(got)
                got.extend(data)

            result = await client.get_range(
                BUCKET, "data/blob.bin", 1000, meta.size, meta.etag, sink
            )
        assert tls_server.url.startswith("https://")
        assert meta.size == len(want) and len(page.objects) == 2
        assert bytes(got) == want[1000:] and result.nbytes == len(want) - 1000

    trio.run(main)


def test_untrusted_certificate_fails_at_once(
    tls_server: OssTestServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = trustme.CA()
    path = tmp_path / "other.pem"
    other.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))

    async def main() -> None:
        config = ClientConfig(attempts=6, backoff_base=5.0)  # a retry would be slow
        async with HttpObjectClient(tls_server.endpoint(), config) as client:
            with trio.fail_after(3):
                with pytest.raises(TransferError, match="not trusted"):
                    await client.head(BUCKET, "data/small.txt")
                with pytest.raises(TransferError, match="not trusted"):
                    await client.get_range(BUCKET, "data/small.txt", 0, 3, None, lambda o, d: None)

    trio.run(main)


def test_download_and_mount_over_tls(
    tls_server: OssTestServer, ca_file: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(
        cli_env, SSL_CERT_FILE=ca_file, OSS_ACCESS_KEY_ID="tls-ak", OSS_ACCESS_KEY_SECRET="tls-sk"
    )
    want = tls_server.get(BUCKET, "data/blob.bin")
    out = tmp_path / "blob.bin"
    result = run_ossfs(
        "download",
        f"oss://{BUCKET}/data/blob.bin",
        str(out),
        "--endpoint",
        tls_server.url,
        "--part-size",
        "1MiB",
        "--threads",
        "4",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(want).digest()

    bad = dict(env)
    del bad["SSL_CERT_FILE"]
    result = run_ossfs(
        "stat", f"oss://{BUCKET}/data/small.txt", "--endpoint", tls_server.url, env=bad
    )
    assert result.returncode == 1 and "not trusted" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.fuse
def test_mount_over_tls(
    tls_server: OssTestServer, ca_file: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(
        cli_env, SSL_CERT_FILE=ca_file, OSS_ACCESS_KEY_ID="tls-ak", OSS_ACCESS_KEY_SECRET="tls-sk"
    )
    mnt = tmp_path / "mnt"
    with mounted(
        f"oss://{BUCKET}",
        mnt,
        "--endpoint",
        tls_server.url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--part-size",
        "1MiB",
        env=env,
    ):
        assert (mnt / "data" / "small.txt").read_bytes() == b"over tls\n"
        assert (mnt / "data" / "blob.bin").read_bytes() == tls_server.get(BUCKET, "data/blob.bin")
