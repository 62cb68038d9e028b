"""`ossfs.escape`: untrusted text never reaches a terminal or a log raw."""

from __future__ import annotations

import io
import logging
import re

import pytest

from ossfs.escape import SafeFormatter, printable

FORGED = "1999-01-01 00:00:00,000 ERROR ossfs.fs: FORGED_LOG_LINE"
# Anything a terminal or a log reader could take for structure.
RAW = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain/key.txt", "plain/key.txt"),
        ("caf\u00e9 \u6587\u4ef6 back\\slash", "caf\u00e9 \u6587\u4ef6 back\\slash"),
        ("a\nb", "a\\x0ab"),
        ("tab\there\r", "tab\\x09here\\x0d"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("nul\x00del\x7f", "nul\\x00del\\x7f"),
        ("c1\x9b31m\x85", "c1\\x9b31m\\x85"),
        ("\u202egnp.exe", "\\u202egnp.exe"),
        ("iso\u2066late\u2069 sep\u2028", "iso\\u2066late\\u2069 sep\\u2028"),
        (b"bad\xffutf8".decode("utf-8", "surrogateescape"), "bad\\xffutf8"),
    ],
)
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(shown) == shown  # escaping twice changes nothing
    assert not RAW.search(printable(text))


def _log_through(formatter: logging.Formatter, emit: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("ossfs.test-escape")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        assert callable(emit)
        emit(logger)
    finally:
        logger.handlers.clear()
    return stream.getvalue()


def test_formatter_keeps_one_record_on_one_line() -> None:
    key = f"dir/a\n{FORGED}\n\x1b[2J"
    fmt = SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def emit(logger: logging.Logger) -> None:
        logger.error("read %s failed: %s", key, "EIO")
        logger.warning(f"an f-string that forgot to escape {key}")

    out = _log_through(fmt, emit)
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert all(" ossfs.test-escape: " in line for line in lines)
    assert not any(line.startswith("1999-") for line in lines)
    assert not RAW.search(out.replace("\n", ""))
    assert "a\\x0a1999-01-01" in lines[0]


def test_formatter_indents_tracebacks() -> None:
    fmt = SafeFormatter("%(levelname)s %(name)s: %(message)s")

    def emit(logger: logging.Logger) -> None:
        try:
            raise OSError(f"cannot read key\n{FORGED}\x1b[31m")
        except OSError:
            logger.exception("mount failed")

    out = _log_through(fmt, emit)
    lines = out.splitlines()
    assert lines[0] == "ERROR ossfs.test-escape: mount failed"
    assert all(line.startswith("    ") for line in lines[1:]), out
    assert any(line.strip() == "Traceback (most recent call last):" for line in lines)
    assert not any(line.startswith("1999-") for line in lines)
    assert not RAW.search(out.replace("\n", ""))
