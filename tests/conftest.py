"""Shared fixtures: moto's S3 server on a free 127.0.0.1 port, fresh buckets, FUSE checks."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server, in a thread of the test process, on a free port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3(moto_endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def s3_bucket(s3: Any) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def cli_env(tmp_path: Any) -> dict[str, str]:
    """Environment for the ossfs command: test credentials, a private HOME and cache."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "OSS_", "OSSFS_", "ALIBABA_CLOUD_"))
    }
    env.update(AWS_ENV)
    # The chain's last step asks the instance metadata service: never a real one here.
    env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] = "true"
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["HOME"] = str(tmp_path / "home")
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    return env


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if fuse_available():
        return
    skip = pytest.mark.skip(reason="needs /dev/fuse and fusermount3")
    for item in items:
        if "fuse" in item.keywords:
            item.add_marker(skip)
