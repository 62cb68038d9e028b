"""Fixtures for the integration tests: the OSS-dialect test server and its CLI environment."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ossfs.testing import OssTestServer, StatsSnapshot

OSS_ACCESS_KEY_ID = "test-ak"
OSS_ACCESS_KEY_SECRET = "test-sk"


@pytest.fixture
def oss_server() -> Iterator[OssTestServer]:
    """An OSS-dialect server on 127.0.0.1 that checks signatures made with the test key."""
    server = OssTestServer(credentials={OSS_ACCESS_KEY_ID: OSS_ACCESS_KEY_SECRET})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def oss_env(cli_env: dict[str, str]) -> dict[str, str]:
    """The ``ossfs`` command's environment with the OSS test credentials."""
    env = dict(cli_env)
    env["OSS_ACCESS_KEY_ID"] = OSS_ACCESS_KEY_ID
    env["OSS_ACCESS_KEY_SECRET"] = OSS_ACCESS_KEY_SECRET
    return env


def settled_stats(server: OssTestServer, timeout: float = 10.0) -> StatsSnapshot:
    """The server's counters once every object GET it started has been recorded.

    A GET is counted when it arrives but recorded only when its answer ends, which
    can be after the client has gone (a killed process, a stalled answer).
    """
    deadline = time.monotonic() + timeout
    while True:
        snapshot = server.stats
        if snapshot.count(op="get") == len(snapshot.gets) or time.monotonic() > deadline:
            return snapshot
        time.sleep(0.01)
