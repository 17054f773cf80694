"""Progress bars: labelled, one per run, with an ETA; on a terminal a live bar, elsewhere (a log
file, CI, a pipe) one plain line every 30 seconds and at the end instead of a stream of
carriage-return redraws.
"""

from __future__ import annotations

import io
import sys
from typing import Iterable

__all__ = ["progress_bar"]


class _Lines(io.TextIOBase):
    """A file for tqdm when the output is no terminal: each redraw becomes one line (a clear, or the
    same state drawn again, none)."""

    def __init__(self, stream):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip("\n").rstrip()
        if line.strip() and line != self.last:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, initial: int = 0, stream=None, leave: bool = True):
    """A tqdm bar labelled ``desc``; ``enabled`` False: a bar that shows nothing."""
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    common = dict(total=total, desc=desc, unit=unit, disable=not enabled, initial=initial, leave=leave)
    if tty:
        return tqdm(iterable, file=stream, dynamic_ncols=True, **common)
    return tqdm(iterable, file=_Lines(stream), mininterval=30, maxinterval=60, ncols=110, **common)
