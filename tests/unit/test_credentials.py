"""The provider chain's order and the parsers of what providers answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ossfs.config import ConnectionOptions, resolve_connection
from ossfs.credentials import (
    AssumeRoleWithToken,
    InstanceRole,
    Process,
    Static,
    parse_metadata_credentials,
    parse_oidc_answer,
    parse_process_output,
    parse_time,
    parse_web_identity_answer,
    select_source,
)
from ossfs.errors import UsageError

RRSA = {
    "ALIBABA_CLOUD_ROLE_ARN": "acs:ram::1:role/r",
    "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": "acs:ram::1:oidc-provider/p",
    "ALIBABA_CLOUD_OIDC_TOKEN_FILE": "/var/run/secrets/token",
}
WHERE = "profile 'default' of /x.toml"


def oss(env: dict[str, str], profile: dict[str, object] | None = None) -> object:
    return select_source("oss", env, profile or {}, WHERE, region="cn-hangzhou")


def s3(env: dict[str, str], profile: dict[str, object] | None = None) -> object:
    return select_source("s3", env, profile or {}, WHERE, region="eu-west-1")


def test_oss_chain_order(tmp_path: Path) -> None:
    keys = {"OSS_ACCESS_KEY_ID": "a", "OSS_ACCESS_KEY_SECRET": "b"}
    alibaba = {
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "c",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "d",
        "ALIBABA_CLOUD_SECURITY_TOKEN": "t",
    }
    profile = {"credential_process": "/bin/creds --x"}
    got = oss({**keys, **alibaba, **RRSA}, profile)
    assert isinstance(got, Static) and got.credentials.access_key_id == "a"
    got = oss({**alibaba, **RRSA}, profile)
    assert isinstance(got, Static) and got.credentials.session_token == "t"
    got = oss(dict(RRSA), profile)
    assert isinstance(got, AssumeRoleWithToken) and got.flavor == "oidc"
    assert got.sts_endpoint == "https://sts.aliyuncs.com" and got.provider_arn
    got = oss({}, profile)
    assert isinstance(got, Process) and got.command == "/bin/creds --x"
    # Nothing configured: the ECS RAM role, discovered, as the last resort.
    got = oss({})
    assert isinstance(got, InstanceRole) and got.flavor == "ecs" and got.role is None
    assert got.endpoint == "http://100.100.100.200" and got.fallback
    assert oss({"ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true"}) is None
    got = oss(
        {
            "ALIBABA_CLOUD_ECS_METADATA": "my-role",
            "ALIBABA_CLOUD_IMDSV1_DISABLED": "1",
            "OSSFS_ECS_METADATA_ENDPOINT": "http://127.0.0.1:9",
        }
    )
    assert got == InstanceRole(
        flavor="ecs", endpoint="http://127.0.0.1:9", role="my-role", require_token=True
    )


def test_sts_endpoint_is_a_host_or_a_url() -> None:
    got = oss({**RRSA, "ALIBABA_CLOUD_STS_ENDPOINT": "sts-vpc.cn-beijing.aliyuncs.com"})
    assert isinstance(got, AssumeRoleWithToken)
    assert got.sts_endpoint == "https://sts-vpc.cn-beijing.aliyuncs.com"
    got = oss({**RRSA, "ALIBABA_CLOUD_STS_ENDPOINT": "http://127.0.0.1:5/"})
    assert isinstance(got, AssumeRoleWithToken) and got.sts_endpoint == "http://127.0.0.1:5"


def test_partial_configuration_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="ALIBABA_CLOUD_OIDC_TOKEN_FILE not set"):
        oss({k: v for k, v in RRSA.items() if "TOKEN" not in k})
    with pytest.raises(UsageError, match="AWS_WEB_IDENTITY_TOKEN_FILE is not set"):
        s3({"AWS_ROLE_ARN": "arn:aws:iam::1:role/r"})
    with pytest.raises(UsageError, match="choose one"):
        oss({}, {"access_key_id": "a", "access_key_secret": "b", "credential_process": "x"})
    with pytest.raises(UsageError, match="oidc_token_file"):
        oss({}, {"role_arn": "acs:ram::1:role/r"})
    with pytest.raises(UsageError, match="cannot be parsed"):
        oss({}, {"credential_process": "/bin/x 'unclosed"})


def test_s3_chain_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = fk\naws_secret_access_key = fs\n"
        "[other]\naws_access_key_id = ok\naws_secret_access_key = os\naws_session_token = ot\n"
    )
    (home / ".aws" / "config").write_text(
        "[default]\nregion = eu-west-1\n"
        "[profile proc]\ncredential_process = /opt/bin/awscreds --user helen\n"
        "[profile web]\nrole_arn = arn:aws:iam::1:role/w\n"
        "web_identity_token_file = /tmp/tok\nrole_session_name = mine\n"
        "[profile chained]\nrole_arn = arn:aws:iam::1:role/c\nsource_profile = default\n"
    )
    base = {"HOME": str(home)}
    env_keys = {"AWS_ACCESS_KEY_ID": "ek", "AWS_SECRET_ACCESS_KEY": "es"}
    web = {"AWS_ROLE_ARN": "arn:aws:iam::1:role/e", "AWS_WEB_IDENTITY_TOKEN_FILE": "/t"}
    got = s3({**base, **env_keys, **web})
    assert isinstance(got, Static) and got.credentials.access_key_id == "ek"
    got = s3({**base, **web})
    assert isinstance(got, AssumeRoleWithToken) and got.flavor == "web_identity"
    assert got.sts_endpoint == "https://sts.eu-west-1.amazonaws.com"
    got = s3({**base, **web, "AWS_ENDPOINT_URL_STS": "http://127.0.0.1:7"})
    assert isinstance(got, AssumeRoleWithToken) and got.sts_endpoint == "http://127.0.0.1:7"
    got = s3(base, {"access_key_id": "pk", "access_key_secret": "ps"})
    assert isinstance(got, Static) and got.credentials.access_key_id == "pk"
    got = s3(base)
    assert isinstance(got, Static) and got.credentials.access_key_id == "fk"
    got = s3({**base, "AWS_PROFILE": "other"})
    assert isinstance(got, Static) and got.credentials.session_token == "ot"
    got = s3({**base, "AWS_PROFILE": "proc"})
    assert isinstance(got, Process) and "awscreds" in got.name and "helen" not in got.name
    got = s3({**base, "AWS_PROFILE": "web"})
    assert isinstance(got, AssumeRoleWithToken) and got.session_name == "mine"
    with pytest.raises(UsageError, match="source_profile"):
        s3({**base, "AWS_PROFILE": "chained"})
    with pytest.raises(UsageError, match="AWS profile 'nope' not found"):
        s3({**base, "AWS_PROFILE": "nope"})
    # Nothing at all: IMDSv2 last, its endpoint configurable.
    empty = {"HOME": str(tmp_path / "nobody")}
    got = s3(empty)
    assert isinstance(got, InstanceRole) and got.flavor == "ec2"
    assert got.endpoint == "http://169.254.169.254"
    got = s3({**empty, "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:8"})
    assert isinstance(got, InstanceRole) and got.endpoint == "http://127.0.0.1:8"
    assert s3({**empty, "AWS_EC2_METADATA_DISABLED": "true"}) is None


def test_resolve_connection_keeps_static_keys_on_the_endpoint(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "OSS_ACCESS_KEY_ID": "a", "OSS_ACCESS_KEY_SECRET": "b"}
    ep, source = resolve_connection(ConnectionOptions(), "oss", env)
    assert isinstance(source, Static) and ep.credentials == source.credentials
    assert source.name == "OSS_ACCESS_KEY_ID"  # what `ossfs status` names
    ep, source = resolve_connection(ConnectionOptions(), "oss", {"HOME": str(tmp_path), **RRSA})
    assert ep.credentials is None and isinstance(source, AssumeRoleWithToken)
    ep, source = resolve_connection(
        ConnectionOptions(anonymous=True), "oss", {"HOME": str(tmp_path), **RRSA}
    )
    assert ep.credentials is None and source is None


def test_names_and_reprs_hold_no_secret() -> None:
    got = oss(
        {
            "OSS_ACCESS_KEY_ID": "a",
            "OSS_ACCESS_KEY_SECRET": "very-secret",
            "OSS_SESSION_TOKEN": "tok-secret",
        }
    )
    assert "secret" not in repr(got) and "secret" not in str(getattr(got, "name", ""))
    proc = Process("/bin/get-creds --password hunter2", WHERE)
    assert "hunter2" not in proc.name and "get-creds" in proc.name


def test_process_output_shapes() -> None:
    aws = parse_process_output(
        json.dumps(
            {
                "Version": 1,
                "AccessKeyId": "AK",
                "SecretAccessKey": "SK",
                "SessionToken": "T",
                "Expiration": "2026-11-30T05:20:01Z",
            }
        ).encode()
    )
    assert aws.credentials.session_token == "T"
    assert aws.expiration == parse_time("2026-11-30T05:20:01+00:00", "x")
    cli = parse_process_output(
        json.dumps(
            {
                "mode": "StsToken",
                "access_key_id": "STS.x",
                "access_key_secret": "s",
                "sts_token": "t",
            }
        ).encode()
    )
    assert cli.credentials.access_key_id == "STS.x" and cli.expiration is None
    ak = parse_process_output(b'{"mode": "AK", "access_key_id": "a", "access_key_secret": "b"}')
    assert ak.credentials.session_token is None
    sts = parse_process_output(
        json.dumps(
            {
                "AccessKeyId": "a",
                "AccessKeySecret": "b",
                "SecurityToken": "c",
                "Expiration": "2026-11-30T05:20:01.123Z",
            }
        ).encode()
    )
    assert sts.expiration is not None and sts.expiration % 1 == pytest.approx(0.123)
    for bad, why in (
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"AccessKeyId": "a", "SecretAccessKey": "b"}', "Version"),
        (b'{"mode": "RamRoleArn", "access_key_id": "a"}', "mode"),
        (b'{"mode": "StsToken", "access_key_id": "a", "access_key_secret": "s"}', "sts_token"),
        (
            b'{"Version": 1, "AccessKeyId": "a", "SecretAccessKey": "sek",'
            b' "Expiration": "tomorrow"}',
            "ISO 8601",
        ),
    ):
        with pytest.raises(ValueError, match=why) as caught:
            parse_process_output(bad)
        assert "sek" not in str(caught.value)


def test_metadata_and_sts_answers() -> None:
    ecs = parse_metadata_credentials(
        json.dumps(
            {
                "AccessKeyId": "STS.a",
                "AccessKeySecret": "s",
                "SecurityToken": "t",
                "Expiration": "2026-11-30T11:00:00Z",
                "LastUpdated": "2026-11-30T05:00:00Z",
                "Code": "Success",
            }
        ).encode(),
        "ecs",
    )
    assert ecs.credentials.session_token == "t"
    ec2 = parse_metadata_credentials(
        json.dumps(
            {
                "Code": "Success",
                "Type": "AWS-HMAC",
                "AccessKeyId": "ASIA",
                "SecretAccessKey": "s",
                "Token": "t",
                "Expiration": "2026-11-30T11:00:00Z",
            }
        ).encode(),
        "ec2",
    )
    assert ec2.credentials.access_key_id == "ASIA"
    with pytest.raises(ValueError, match="Code is 'Failed'"):
        parse_metadata_credentials(b'{"Code": "Failed"}', "ecs")
    oidc = parse_oidc_answer(
        200,
        json.dumps(
            {
                "RequestId": "r",
                "Credentials": {
                    "AccessKeyId": "STS.o",
                    "AccessKeySecret": "s",
                    "SecurityToken": "t",
                    "Expiration": "2026-11-30T06:00:00Z",
                },
            }
        ).encode(),
    )
    assert oidc.credentials.access_key_id == "STS.o"
    with pytest.raises(
        ValueError,
        match="STS answered 400 AuthenticationFail.OIDCToken.Invalid: bad \\(request id R\\)",
    ):
        parse_oidc_answer(
            400,
            b'{"Code": "AuthenticationFail.OIDCToken.Invalid", "Message": "bad", "RequestId": "R"}',
        )
    xml = (
        b'<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/'
        b'2011-06-15/"><AssumeRoleWithWebIdentityResult><Credentials>'
        b"<SessionToken>t</SessionToken><SecretAccessKey>s</SecretAccessKey>"
        b"<Expiration>2026-11-30T06:00:00Z</Expiration><AccessKeyId>ASIA</AccessKeyId>"
        b"</Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
    )
    web = parse_web_identity_answer(200, xml)
    assert web.credentials.access_key_id == "ASIA" and web.credentials.session_token == "t"
    with pytest.raises(ValueError, match="STS answered 400 InvalidIdentityToken: expired"):
        parse_web_identity_answer(
            400,
            b"<ErrorResponse><Error><Code>InvalidIdentityToken"
            b"</Code><Message>expired</Message></Error></ErrorResponse>",
        )
