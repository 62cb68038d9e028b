"""Progress display for long transfers: a tqdm bar on a terminal, nothing otherwise.

What it shows (the description, the messages written through it) may hold
object keys: they are escaped with `ossfs.escape.printable`.

Must not import: trio, httpx, pyfuse3.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

from ossfs.escape import printable

__all__ = ["ProgressBar"]


class ProgressBar:
    """Bytes, rate, ETA and a counter of *counting* (parts, objects); silent when
    *stream* is not a terminal."""

    def __init__(
        self,
        total: int,
        *,
        description: str = "",
        counting: str = "parts",
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        stream = stream or sys.stderr
        if enabled is None:
            enabled = stream.isatty()
        self.counting = counting
        self._total: int | None = None
        self._bar: tqdm[Any] | None = None
        if enabled:
            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=printable(description),
                file=stream,
                dynamic_ncols=True,
                miniters=1,
                mininterval=0.2,
                smoothing=0.1,
            )

    def set_total(self, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_done(self, done: int) -> None:
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()

    def progress(self, n: int, done: int, total: int) -> None:
        """A ``(bytes just moved, bytes done, total)`` callback for download and materialize.

        A new total (the first call, or a restart after the object changed)
        resets the bar; a call with no new bytes reports bytes found already done.
        """
        if self._total != total:
            self._total = total
            self.set_total(total)
            self.set_done(done)
        elif n:
            self.update(n)
        else:
            self.set_done(done)

    def set_count(self, done: int, total: int) -> None:
        """*done* of *total* parts (or objects: what the bar counts) are complete."""
        if self._bar is not None and total:
            self._bar.set_postfix_str(f"{self.counting} {done}/{total}", refresh=False)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        message = printable(message)
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
