"""Each credentials provider against a local fake, and temporary keys during long reads.

The fakes (tests/integration/credfakes.py) play the ECS and EC2 metadata
services and both STS services on 127.0.0.1; a credential process is a small
Python script. For OSS, the fakes register every key they issue with the
package's test server, which then accepts it (signature, session token) only
until it expires: a download that goes on past the first key's life passes
only if the client moved to a new key in time.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ossfs.client import ClientConfig, HttpObjectClient
from ossfs.credentials import AssumeRoleWithToken, InstanceRole, Issued, Process
from ossfs.errors import CredentialError
from ossfs.protocol.signing import Credentials
from ossfs.refresh import RefreshingCredentials, for_source
from ossfs.testing import OssTestServer
from tests.helpers import run_ossfs
from tests.integration.credfakes import ROLE, FakeIdentity

BUCKET = "creds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def no_secrets(text: str, fake: FakeIdentity) -> None:
    for issue in fake.issued:
        assert issue.secret not in text and issue.token not in text


# ------------------------------------------------------------------ each provider


async def test_ecs_role_hardened_mode_discovers_the_role() -> None:
    with FakeIdentity(require_token=True) as fake:
        source = InstanceRole(flavor="ecs", endpoint=fake.url, require_token=True)
        got = await for_source(source).get()
        issue = fake.issued[0]
        assert (got.access_key_id, got.access_key_secret, got.session_token) == (
            issue.access_key_id,
            issue.secret,
            issue.token,
        )
        (m1, p1, h1), (m2, p2, h2), (m3, p3, h3) = fake.requests
        assert (m1, p1) == ("PUT", "/latest/api/token")
        assert h1["X-aliyun-ecs-metadata-token-ttl-seconds"] == "21600"
        assert (m2, p2) == ("GET", "/latest/meta-data/ram/security-credentials/")
        assert (m3, p3) == ("GET", f"/latest/meta-data/ram/security-credentials/{ROLE}")
        assert (
            h2["X-aliyun-ecs-metadata-token"] == h3["X-aliyun-ecs-metadata-token"] == "md-token-0"
        )


async def test_ecs_role_without_the_token_mode() -> None:
    with FakeIdentity(refuse_token=True) as fake:
        # A service without the hardened mode is asked without a token ...
        got = await for_source(InstanceRole(flavor="ecs", endpoint=fake.url, role=ROLE)).get()
        assert got.access_key_id == fake.issued[0].access_key_id
        assert [p for _, p, _ in fake.requests] == [
            "/latest/api/token",
            f"/latest/meta-data/ram/security-credentials/{ROLE}",
        ]
        # ... unless the token is required (ALIBABA_CLOUD_IMDSV1_DISABLED).
        from ossfs.errors import CredentialError

        with pytest.raises(
            CredentialError,
            match=r"ECS RAM role 'ossfs-test-role' \(metadata "
            r"service http://127.0.0.1:\d+\): PUT .*/latest/api/token answered "
            r"404: not found \(a metadata token is required\)",
        ):
            await for_source(
                InstanceRole(flavor="ecs", endpoint=fake.url, role=ROLE, require_token=True)
            ).get()


async def test_ec2_imdsv2() -> None:
    with FakeIdentity(require_token=True) as fake:
        got = await for_source(InstanceRole(flavor="ec2", endpoint=fake.url)).get()
        assert got.access_key_id == fake.issued[0].access_key_id
        assert got.session_token == fake.issued[0].token
        put, listing, role = fake.requests
        assert put[2]["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
        assert listing[1] == "/latest/meta-data/iam/security-credentials/"
        assert role[2]["X-aws-ec2-metadata-token"] == "md-token-0"


async def test_rrsa_oidc_reads_the_rotated_token_each_time(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("oidc-token-from-the-cluster\n")
    with FakeIdentity(lifetime=1.0) as fake:
        source = AssumeRoleWithToken(
            flavor="oidc",
            role_arn="acs:ram::1:role/r",
            provider_arn="acs:ram::1:oidc-provider/p",
            token_file=str(token),
            sts_endpoint=fake.url,
            session_name="s1",
            where="test",
        )
        creds = for_source(source)
        first = await creds.get()
        form = fake.forms[0]
        assert form["Action"] == "AssumeRoleWithOIDC" and form["Version"] == "2015-04-01"
        assert form["Format"] == "JSON" and form["RoleArn"] == "acs:ram::1:role/r"
        assert form["OIDCProviderArn"] == "acs:ram::1:oidc-provider/p"
        assert form["OIDCToken"] == "oidc-token-from-the-cluster"
        assert form["RoleSessionName"] == "s1" and form["DurationSeconds"] == "3600"
        # Kubernetes rotates the token file: the next exchange sends the new token.
        fake.oidc_token = "rotated"
        token.write_text("rotated")
        while time.time() < fake.issued[0].expiration:
            time.sleep(0.1)
        second = await creds.get()
        assert second.access_key_id != first.access_key_id
        assert fake.forms[-1]["OIDCToken"] == "rotated"
        # A refused token: one line with STS's code.
        token.write_text("stolen")
        from ossfs.errors import CredentialError

        with pytest.raises(
            CredentialError,
            match="AssumeRoleWithOIDC of role acs:ram::1:role/r"
            ".*STS answered 400 AuthenticationFail.OIDCToken.Invalid",
        ):
            await for_source(source).get()


async def test_web_identity(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("oidc-token-from-the-cluster")
    with FakeIdentity() as fake:
        source = AssumeRoleWithToken(
            flavor="web_identity",
            role_arn="arn:aws:iam::1:role/w",
            token_file=str(token),
            sts_endpoint=fake.url,
            session_name="ossfs",
            where="test",
        )
        got = await for_source(source).get()
        assert got.access_key_id == fake.issued[0].access_key_id
        form = fake.forms[0]
        assert form["Action"] == "AssumeRoleWithWebIdentity"
        assert form["Version"] == "2011-06-15" and form["WebIdentityToken"] == token.read_text()


PROCESS = """\
import json, sys, time
counter = sys.argv[1]
try:
    n = int(open(counter).read())
except FileNotFoundError:
    n = 0
open(counter, "w").write(str(n + 1))
mode, lifetime = sys.argv[2], float(sys.argv[3])
if mode == "fail":
    print("token service said no", file=sys.stderr)
    sys.exit(3)
when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(time.time() + lifetime) + 1))
if mode == "aws":
    doc = {"Version": 1, "AccessKeyId": f"proc-{n}", "SecretAccessKey": f"proc-secret-{n}",
           "SessionToken": f"proc-token-{n}", "Expiration": when}
else:
    doc = {"mode": "StsToken", "access_key_id": f"proc-{n}",
           "access_key_secret": f"proc-secret-{n}", "sts_token": f"proc-token-{n}",
           "expiration": when}
print(json.dumps(doc))
"""


@pytest.fixture
def process_script(tmp_path: Path) -> Path:
    script = tmp_path / "creds.py"
    script.write_text(PROCESS)
    return script


def process_command(script: Path, mode: str, lifetime: float) -> str:
    return f"{sys.executable} {script} {script.parent / 'count'} {mode} {lifetime}"


@pytest.mark.parametrize("mode", ["aws", "alibaba"])
async def test_credential_process_is_run_again_on_expiry(process_script: Path, mode: str) -> None:
    creds = for_source(Process(process_command(process_script, mode, 1.0), "test"))
    first = await creds.get()
    assert (first.access_key_id, first.session_token) == ("proc-0", "proc-token-0")
    assert await creds.get() is first
    time.sleep(2.1)
    second = await creds.get()
    assert second.access_key_id == "proc-1"


async def test_credential_process_failure_is_one_line(process_script: Path) -> None:
    from ossfs.errors import CredentialError

    creds = for_source(Process(process_command(process_script, "fail", 1.0), "profile 'p'"))
    with pytest.raises(CredentialError) as caught:
        await creds.get()
    assert str(caught.value) == (
        f"cannot get credentials from credential_process {sys.executable} (profile 'p'): "
        f"{sys.executable} exited with status 3: token service said no"
    )


# ------------------------------------------------------------------ long reads


@pytest.fixture
def oss_sts() -> Any:
    """The OSS test server accepting only keys the fakes issue (none at first)."""
    server = OssTestServer(credentials={})
    server.start()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


def ecs_env(cli_env: dict[str, str], fake: FakeIdentity) -> dict[str, str]:
    env = dict(cli_env)
    del env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"]
    env["OSSFS_ECS_METADATA_ENDPOINT"] = fake.url
    return env


SIZE = 6 << 20


def slow_object(server: OssTestServer) -> bytes:
    data = os.urandom(SIZE)
    server.put(BUCKET, "big.bin", data)
    # 2 connections x 512 KiB/s: about 6 s for the object, several key lives; a GET
    # of a 256 KiB part every half second on each connection.
    server.faults.bandwidth = 512 * 1024
    return data


def download(env: dict[str, str], server: OssTestServer, out: Path) -> Any:
    return run_ossfs(
        "download",
        f"oss://{BUCKET}/big.bin",
        str(out),
        "--endpoint",
        server.url,
        "--threads",
        "2",
        "--part-size",
        "256KiB",
        "--no-progress",
        "-v",
        env=env,
    )


async def skewed_client(
    server: OssTestServer, *, second_key: bool
) -> tuple[HttpObjectClient, list[str]]:
    """A client whose first key the server already holds expired while this
    machine's clock gives it an hour (clocks apart); the source's next fetch gives
    a good key, or fails when *second_key* is False."""
    fetched: list[str] = []
    server.add_key("skew-1", "skew-secret-1", "skew-token-1", expires=time.time() - 1)
    server.add_key("skew-2", "skew-secret-2", "skew-token-2")

    async def fetch() -> Issued:
        n = len(fetched) + 1
        fetched.append(f"skew-{n}")
        if n > 1 and not second_key:
            raise CredentialError("the fake metadata service answered 500")
        creds = Credentials(f"skew-{n}", f"skew-secret-{n}", f"skew-token-{n}")
        return Issued(creds, time.time() + 3600)

    source = RefreshingCredentials(fetch, name="the skewed fake")
    return HttpObjectClient(server.endpoint(), ClientConfig(), credentials=source), fetched


async def test_a_key_the_service_calls_expired_is_replaced_and_the_request_sent_again(
    oss_sts: OssTestServer,
) -> None:
    data = os.urandom(300_000)
    oss_sts.put(BUCKET, "small.bin", data)
    client, fetched = await skewed_client(oss_sts, second_key=True)
    async with client:
        got = bytearray()
        await client.get_range(BUCKET, "small.bin", 0, len(data), None, lambda _, b: got.extend(b))
        assert bytes(got) == data
        meta = await client.head(BUCKET, "small.bin")
        assert meta.size == len(data)
    assert fetched == ["skew-1", "skew-2"]  # one new key, not one per request
    assert oss_sts.keys_used.get("skew-2", 0) == 2 and "skew-1" not in oss_sts.keys_used


async def test_a_key_the_service_calls_expired_with_no_new_one_is_one_clear_error(
    oss_sts: OssTestServer,
) -> None:
    oss_sts.put(BUCKET, "small.bin", b"x" * 1000)
    client, fetched = await skewed_client(oss_sts, second_key=False)
    async with client:
        with pytest.raises(CredentialError) as info:
            await client.get_range(BUCKET, "small.bin", 0, 1000, None, lambda _, b: None)
        # Later requests fail at once with the same line; the source is not asked again.
        with pytest.raises(CredentialError):
            await client.head(BUCKET, "small.bin")
    assert "credentials from the skewed fake expired at" in str(info.value)
    assert "answered 500" in str(info.value)
    assert fetched == ["skew-1", "skew-2"]


@pytest.mark.slow
def test_download_moves_to_new_ecs_keys_before_the_old_expire(
    oss_sts: OssTestServer, cli_env: dict[str, str], tmp_path: Path
) -> None:
    data = slow_object(oss_sts)
    with FakeIdentity(lifetime=4.0, oss=oss_sts) as fake:
        out = tmp_path / "big.bin"
        result = download(ecs_env(cli_env, fake), oss_sts, out)
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
        issued = fake.issued
        assert len(issued) >= 2
        # Each key was replaced before it expired (refreshed ahead, not on failure) ...
        for old, new in zip(issued, issued[1:], strict=False):
            assert new.issued_at < old.expiration
        # ... and requests were signed with more than one of them, none refused.
        used = [i.access_key_id for i in issued if oss_sts.keys_used.get(i.access_key_id)]
        assert len(used) >= 2
        assert oss_sts.refused == []
        assert "answered 403" not in result.stderr and "Traceback" not in result.stderr
        no_secrets(result.stdout + result.stderr, fake)


@pytest.mark.slow
def test_download_with_credential_process_profile(
    oss_sts: OssTestServer, cli_env: dict[str, str], tmp_path: Path, process_script: Path
) -> None:
    data = slow_object(oss_sts)
    # The script's keys are registered up front (it cannot reach the server).
    for n in range(20):
        oss_sts.add_key(f"proc-{n}", f"proc-secret-{n}", f"proc-token-{n}")
    config = tmp_path / "config.toml"
    config.write_text(
        f"[default]\ncredential_process = "
        f"{json.dumps(process_command(process_script, 'aws', 3.0))}\n"
    )
    env = dict(cli_env, OSSFS_CONFIG=str(config))
    out = tmp_path / "big.bin"
    result = download(env, oss_sts, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == data
    runs = int((process_script.parent / "count").read_text())
    assert runs >= 2
    assert sum(1 for k, v in oss_sts.keys_used.items() if k.startswith("proc-") and v) >= 2


@pytest.mark.slow
def test_expired_keys_end_a_download_with_one_line(
    oss_sts: OssTestServer, cli_env: dict[str, str], tmp_path: Path
) -> None:
    slow_object(oss_sts)
    with FakeIdentity(lifetime=2.0, oss=oss_sts) as fake:
        original = fake._issue

        def issue_then_break(via: str) -> Any:
            got = original(via)
            fake.broken = True  # the metadata service goes down after the first key
            return got

        fake._issue = issue_then_break  # type: ignore[method-assign]
        result = download(ecs_env(cli_env, fake), oss_sts, tmp_path / "big.bin")
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, result.stderr
        assert (
            f"credentials from the ECS RAM role (metadata service {fake.url}) expired at"
            in errors[0]
        )
        assert "answered 500" in errors[0]
        # The failed refreshes before expiry were logged once, not per retry.
        assert result.stderr.count("cannot refresh credentials") == 1
        no_secrets(result.stdout + result.stderr, fake)


# ------------------------------------------------------------------ the command line


def test_provider_failures_are_one_line(
    cli_env: dict[str, str], tmp_path: Path, process_script: Path
) -> None:
    url = f"oss://{BUCKET}/"
    endpoint = ["--endpoint", "http://127.0.0.1:9"]
    # Nothing configured and no metadata service: the old message, plus what the
    # last resort said.
    dead = f"http://127.0.0.1:{free_port()}"
    env = dict(cli_env, OSSFS_ECS_METADATA_ENDPOINT=dead)
    del env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"]
    result = run_ossfs("ls", url, *endpoint, env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("ossfs: error: no credentials found (OSS_ACCESS_KEY_ID")
    assert f"and the ECS RAM role (metadata service {dead}) gave none: PUT {dead}" in result.stderr
    assert result.stderr.rstrip().endswith("use --anonymous for a public bucket")
    assert len(result.stderr.splitlines()) == 1
    # A credential process that fails.
    config = tmp_path / "config.toml"
    config.write_text(
        f"[default]\ncredential_process = "
        f"{json.dumps(process_command(process_script, 'fail', 1))}\n"
    )
    result = run_ossfs("ls", url, *endpoint, env=dict(cli_env, OSSFS_CONFIG=str(config)))
    assert result.returncode == 1
    assert result.stderr == (
        f"ossfs: error: cannot get credentials from credential_process {sys.executable} "
        f"(profile 'default' of {config}): {sys.executable} exited with status 3: token "
        "service said no\n"
    )
    # RRSA with a token file that is not there.
    env = dict(
        cli_env,
        ALIBABA_CLOUD_ROLE_ARN="acs:ram::1:role/r",
        ALIBABA_CLOUD_OIDC_PROVIDER_ARN="acs:ram::1:oidc-provider/p",
        ALIBABA_CLOUD_OIDC_TOKEN_FILE=str(tmp_path / "missing"),
        ALIBABA_CLOUD_STS_ENDPOINT=dead,
    )
    result = run_ossfs("ls", url, *endpoint, env=env)
    assert result.returncode == 1
    assert result.stderr == (
        f"ossfs: error: cannot get credentials from AssumeRoleWithOIDC of role "
        f"acs:ram::1:role/r at {dead} (RRSA: ALIBABA_CLOUD_ROLE_ARN): cannot read the token "
        f"file {tmp_path / 'missing'}: No such file or directory\n"
    )


def test_ls_with_rrsa_and_with_the_ecs_role(
    oss_sts: OssTestServer, cli_env: dict[str, str], tmp_path: Path
) -> None:
    oss_sts.put(BUCKET, "a.txt", b"hello")
    token = tmp_path / "token"
    token.write_text("oidc-token-from-the-cluster")
    with FakeIdentity(oss=oss_sts) as fake:
        env = dict(
            cli_env,
            ALIBABA_CLOUD_ROLE_ARN="acs:ram::1:role/r",
            ALIBABA_CLOUD_OIDC_PROVIDER_ARN="acs:ram::1:oidc-provider/p",
            ALIBABA_CLOUD_OIDC_TOKEN_FILE=str(token),
            ALIBABA_CLOUD_STS_ENDPOINT=fake.url,
        )
        result = run_ossfs("ls", f"oss://{BUCKET}/", "--endpoint", oss_sts.url, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["a.txt"]
        assert fake.issued[-1].via == "oidc"
        result = run_ossfs(
            "ls", f"oss://{BUCKET}/", "--endpoint", oss_sts.url, env=ecs_env(cli_env, fake)
        )
        assert result.returncode == 0, result.stderr
        assert fake.issued[-1].via == "ecs"
        assert oss_sts.keys_used[fake.issued[-1].access_key_id] >= 1


def test_s3_web_identity_and_imds_against_moto(
    moto_endpoint: str, s3: Any, cli_env: dict[str, str], tmp_path: Path
) -> None:
    s3.create_bucket(Bucket="creds-s3")
    s3.put_object(Bucket="creds-s3", Key="k.txt", Body=b"x")
    token = tmp_path / "token"
    token.write_text("oidc-token-from-the-cluster")
    base = {
        k: v
        for k, v in cli_env.items()
        if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")
    }
    with FakeIdentity() as fake:
        env = dict(
            base,
            AWS_ROLE_ARN="arn:aws:iam::1:role/w",
            AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
            AWS_ENDPOINT_URL_STS=fake.url,
        )
        result = run_ossfs("ls", "s3://creds-s3/", "--endpoint", moto_endpoint, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["k.txt"] and fake.issued[-1].via == "web_identity"
        env = dict(base, AWS_EC2_METADATA_SERVICE_ENDPOINT=fake.url)
        del env["AWS_EC2_METADATA_DISABLED"]
        result = run_ossfs("ls", "s3://creds-s3/", "--endpoint", moto_endpoint, env=env)
        assert result.returncode == 0, result.stderr
        assert fake.issued[-1].via == "ec2"


# ------------------------------------------------------------------ a mount


def wait_past(when: float) -> None:
    while time.time() < when + 0.2:
        time.sleep(0.1)


@pytest.mark.fuse
@pytest.mark.slow
def test_mount_keeps_reading_across_key_lives_and_fails_clearly_after(
    oss_sts: OssTestServer, cli_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.helpers import mounted

    data = slow_object(oss_sts)
    oss_sts.put(BUCKET, "small-1.txt", b"one")
    oss_sts.put(BUCKET, "small-2.txt", b"two")
    mnt, log = tmp_path / "mnt", tmp_path / "mount.log"
    with FakeIdentity(lifetime=3.0, oss=oss_sts) as fake:
        opts = [
            "--endpoint",
            oss_sts.url,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--part-size",
            "256KiB",
            "--threads",
            "2",
        ]
        with mounted(f"oss://{BUCKET}", mnt, *opts, env=ecs_env(cli_env, fake), log=log):
            # A read longer than a key's life: served whole, with no refusal.
            assert (
                hashlib.sha256((mnt / "big.bin").read_bytes()).digest()
                == hashlib.sha256(data).digest()
            )
            # After the keys in hand have expired, the next request gets a new one.
            wait_past(fake.issued[-1].expiration)
            assert (mnt / "small-1.txt").read_bytes() == b"one"
            assert oss_sts.keys_used.get(fake.issued[-1].access_key_id)
            assert len(fake.issued) >= 2
            # `ossfs status` names the provider and when the keys in hand expire.
            shown = run_ossfs("status", str(mnt), env=cli_env, check=True).stdout
            line = next(ln for ln in shown.splitlines() if ln.startswith("credentials:"))
            assert f"the ECS RAM role (metadata service {fake.url})" in line
            assert "(temporary, valid until 20" in line
            no_secrets(shown, fake)
            # The metadata service goes down and the key expires: reads fail with
            # EACCES, and the log says why in one line naming the provider.
            fake.broken = True
            wait_past(fake.issued[-1].expiration)
            with pytest.raises(OSError) as caught:
                (mnt / "small-2.txt").read_bytes()
            assert caught.value.errno == 13  # EACCES
        text = log.read_text()
        assert "Traceback" not in text
        assert f"credentials from the ECS RAM role (metadata service {fake.url}) expired at" in text
        # The expired key was never sent: the mount knew it had expired.
        assert oss_sts.refused == []
        assert "answered 403" not in text and "SecurityTokenExpired" not in text
        no_secrets(text, fake)
