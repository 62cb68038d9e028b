"""Make untrusted text (object keys, server messages) safe to print or log.

Keys are chosen by whoever writes to a bucket, and may hold any character: an
ESC that recolours or rewrites the user's terminal, a newline that forges a
line in a log, a right-to-left override that reorders what is shown. Every
line ossfs prints or logs goes through `printable` (the command's printers
call it; `SafeFormatter` applies it to every log record, so a message that
forgot to escape still cannot break a line).

Escaped: C0 controls (including tab, newline and carriage return), DEL, C1
controls, the Unicode line and paragraph separators, bidirectional controls,
and lone surrogates (the undecodable bytes of a key read with
``surrogateescape``). They become ``\\xNN`` (``\\uNNNN`` above U+00FF; a
surrogate-escaped byte shows as the byte, ``\\xNN``). Everything else,
backslash included, is left as it is, so ordinary keys print unchanged and
escaping twice changes nothing.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import logging
import re

__all__ = ["printable", "SafeFormatter"]

_UNSAFE = re.compile(
    "["
    "\x00-\x1f\x7f-\x9f"  # C0, DEL, C1
    "\u061c\u200e\u200f"  # Arabic letter mark, LRM, RLM
    "\u2028\u2029"  # line and paragraph separators
    "\u202a-\u202e\u2066-\u2069"  # bidi embeddings, overrides and isolates
    "\ud800-\udfff"  # lone surrogates
    "]"
)


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # a byte that was not UTF-8 (surrogateescape)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    """*text* (``str()`` of anything) with every control character escaped."""
    return _UNSAFE.sub(_escape, str(text))


class SafeFormatter(logging.Formatter):
    """A log formatter whose records are always one line each.

    The message is escaped whole. A traceback or stack is kept readable on
    lines of its own, each escaped and indented, so that no text of a key or
    an exception can start a line of its own in the log.
    """

    def format(self, record: logging.LogRecord) -> str:
        record.message = printable(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        extra: list[str] = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            extra.append(record.exc_text)
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for block in extra:
            text += "".join("\n    " + printable(line) for line in block.split("\n"))
        return text
