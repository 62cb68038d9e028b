"""URLs, endpoints, credentials and the profile file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ossfs.config import (
    ConnectionOptions,
    connect_as_mount,
    default_cache_dir,
    parse_object_url,
    resolve_endpoint,
)
from ossfs.errors import UsageError


def test_object_urls() -> None:
    u = parse_object_url("oss://my-bucket/dir/a b+c.txt")
    assert (u.scheme, u.bucket, u.key) == ("oss", "my-bucket", "dir/a b+c.txt")
    assert parse_object_url("s3://bkt").key == ""
    for bad in ("my-bucket/key", "http://b/k", "oss://", "oss://B/k", "oss://a/k"):
        with pytest.raises(UsageError):
            parse_object_url(bad)


def test_endpoint_defaults_and_region_from_host() -> None:
    ep = resolve_endpoint(ConnectionOptions(anonymous=True), "oss", env={})
    assert ep.url == "https://oss-cn-hangzhou.aliyuncs.com" and ep.region == "cn-hangzhou"
    assert ep.credentials is None and not ep.uses_path_style
    ep = resolve_endpoint(
        ConnectionOptions(anonymous=True, endpoint="oss-eu-central-1-internal.aliyuncs.com"),
        "oss",
        env={},
    )
    assert ep.url == "https://oss-eu-central-1-internal.aliyuncs.com"
    assert ep.region == "eu-central-1"
    ep = resolve_endpoint(
        ConnectionOptions(anonymous=True, endpoint="http://127.0.0.1:9000"), "s3", env={}
    )
    assert ep.dialect == "s3" and ep.region == "us-east-1" and ep.uses_path_style
    ep = resolve_endpoint(
        ConnectionOptions(anonymous=True, endpoint="http://localhost:9000", path_style=False),
        "oss",
        env={},
    )
    assert not ep.uses_path_style
    with pytest.raises(UsageError, match="path"):
        resolve_endpoint(ConnectionOptions(anonymous=True, endpoint="http://h/x"), "oss", env={})
    # No endpoint: it is made from the region (the option, else the environment).
    ep = resolve_endpoint(ConnectionOptions(anonymous=True), "s3", env={"AWS_REGION": "eu-west-1"})
    assert ep.url == "https://s3.eu-west-1.amazonaws.com" and ep.region == "eu-west-1"
    # A region given wins over the one the endpoint's host name implies.
    ep = resolve_endpoint(
        ConnectionOptions(
            anonymous=True, region="cn-beijing", endpoint="oss-eu-central-1.aliyuncs.com"
        ),
        "oss",
        env={},
    )
    assert ep.region == "cn-beijing" and ep.url == "https://oss-eu-central-1.aliyuncs.com"


def test_credentials_from_env_by_dialect() -> None:
    env = {
        "OSS_ACCESS_KEY_ID": "oak",
        "OSS_ACCESS_KEY_SECRET": "osk",
        "OSS_SESSION_TOKEN": "otok",
        "AWS_ACCESS_KEY_ID": "aak",
        "AWS_SECRET_ACCESS_KEY": "ask",
    }
    oss = resolve_endpoint(ConnectionOptions(), "oss", env=env).credentials
    assert oss is not None and (oss.access_key_id, oss.session_token) == ("oak", "otok")
    s3 = resolve_endpoint(ConnectionOptions(), "s3", env=env).credentials
    assert s3 is not None and s3.access_key_id == "aak" and s3.session_token is None
    assert resolve_endpoint(ConnectionOptions(anonymous=True), "oss", env=env).credentials is None
    with pytest.raises(UsageError, match="OSS_ACCESS_KEY_SECRET"):
        resolve_endpoint(ConnectionOptions(), "oss", env={"OSS_ACCESS_KEY_ID": "x"})


def test_no_credentials_is_an_error_unless_anonymous(tmp_path: Path) -> None:
    # Requests would go out unsigned and fail later with a confusing AccessDenied.
    off = {"ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true", "AWS_EC2_METADATA_DISABLED": "1"}
    with pytest.raises(UsageError, match="no credentials found.*OSS_ACCESS_KEY_ID.*--anonymous"):
        resolve_endpoint(ConnectionOptions(), "oss", env={"HOME": str(tmp_path), **off})
    # s3:// with only the OSS_* variables set says which variables it reads.
    env = {"OSS_ACCESS_KEY_ID": "oak", "OSS_ACCESS_KEY_SECRET": "osk", "HOME": str(tmp_path), **off}
    with pytest.raises(UsageError, match="AWS_ACCESS_KEY_ID.*OSS_ACCESS_KEY_ID is set"):
        resolve_endpoint(ConnectionOptions(), "s3", env=env)
    assert resolve_endpoint(ConnectionOptions(anonymous=True), "s3", env=env).credentials is None


def test_profile_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[default]\nendpoint = "http://127.0.0.1:1234"\n'
        '[work]\nendpoint = "https://oss-cn-beijing.aliyuncs.com"\n'
        'access_key_id = "pak"\naccess_key_secret = "psk"\n'
    )
    cfg.chmod(0o600)
    env = {"OSSFS_CONFIG": str(cfg)}
    assert (
        resolve_endpoint(ConnectionOptions(anonymous=True), "oss", env=env).url
        == "http://127.0.0.1:1234"
    )
    ep = resolve_endpoint(ConnectionOptions(profile="work"), "oss", env=env)
    assert ep.region == "cn-beijing"
    assert ep.credentials is not None and ep.credentials.access_key_id == "pak"
    # The environment beats the profile; the command line beats both.
    env2 = dict(env, OSS_ACCESS_KEY_ID="eak", OSS_ACCESS_KEY_SECRET="esk")
    ep = resolve_endpoint(
        ConnectionOptions(profile="work", endpoint="http://127.0.0.1:9"), "oss", env=env2
    )
    assert ep.url == "http://127.0.0.1:9"
    assert ep.credentials is not None and ep.credentials.access_key_id == "eak"
    with pytest.raises(UsageError, match="not found"):
        resolve_endpoint(ConnectionOptions(profile="nope"), "oss", env=env)


def test_profile_file_with_secrets_must_be_private(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[default]\naccess_key_id = "a"\naccess_key_secret = "s"\n')
    cfg.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600") as e:
        resolve_endpoint(ConnectionOptions(config_path=str(cfg)), "oss", env={})
    assert 's"' not in str(e.value)
    cfg.write_text('[default]\nendpoint = "http://127.0.0.1:1"\n')  # no secret: fine
    assert resolve_endpoint(
        ConnectionOptions(config_path=str(cfg), anonymous=True), "oss", env={}
    ).url


@pytest.mark.parametrize("text", ["[default]\nbogus = 1\n", "not toml ["])
def test_bad_profile_files(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    cfg.chmod(0o600)
    with pytest.raises(UsageError):
        resolve_endpoint(ConnectionOptions(config_path=str(cfg)), "oss", env={})


def test_default_cache_dir_is_per_endpoint_and_bucket() -> None:
    env = {"XDG_CACHE_HOME": "/c"}
    assert default_cache_dir("http://127.0.0.1:9000", "b", env) == "/c/ossfs/127.0.0.1_9000/b"
    assert (
        default_cache_dir("https://oss-cn-hangzhou.aliyuncs.com", "b", env)
        == "/c/ossfs/oss-cn-hangzhou.aliyuncs.com/b"
    )


def test_connect_as_mount_fills_what_the_command_line_left_out() -> None:
    mount = {
        "endpoint": "http://m:1",
        "dialect": "oss",
        "region": "r1",
        "profile": "p",
        "config_path": "/m.toml",
        "signature_version": "v1",
        "path_style": True,
        "anonymous": False,
    }
    got = connect_as_mount(ConnectionOptions(), mount)
    assert got == ConnectionOptions(
        endpoint="http://m:1",
        region="r1",
        dialect="oss",
        signature_version="v1",
        path_style=True,
        profile="p",
        config_path="/m.toml",
        anonymous=False,
    )
    mine = ConnectionOptions(endpoint="http://x:2", region="r2", path_style=False, anonymous=True)
    got = connect_as_mount(mine, mount)
    assert (got.endpoint, got.region, got.path_style, got.anonymous) == (
        "http://x:2",
        "r2",
        False,
        True,
    )
    assert got.profile == "p"
