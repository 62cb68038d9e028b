"""A local OSS-dialect object server with fault injection, for tests and benchmarks.

::

    from ossfs.testing import Fault, OssTestServer

    with OssTestServer(credentials={"ak": "sk"}) as srv:
        srv.put("bucket", "dir/a.txt", b"hello")
        srv.faults.add(Fault("reset", key="dir/a.txt", after_bytes=2))
        ...  # talk to srv.url

Also a command: ``python -m ossfs.testing serve --help``. See
``docs/test-server.md``.

`ossfs.testing.memory` (not imported here) is an in-memory object client for
tests of the read path; it is the one module of this package built on trio.

Must not import: trio, httpx.
"""

from __future__ import annotations

from ossfs.crc import crc64
from ossfs.testing.faults import BODY_KINDS, Fault, FaultKind, Faults, Op, RequestInfo
from ossfs.testing.objects import nginx_etag
from ossfs.testing.server import SERVER_NAME, OssError, OssTestServer, parse_range, resolve_range
from ossfs.testing.stats import GetRecord, StatsSnapshot

__all__ = [
    "OssTestServer",
    "Faults",
    "Fault",
    "FaultKind",
    "Op",
    "RequestInfo",
    "BODY_KINDS",
    "GetRecord",
    "StatsSnapshot",
    "OssError",
    "SERVER_NAME",
    "parse_range",
    "resolve_range",
    "crc64",
    "nginx_etag",
]
