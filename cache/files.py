"""File utilities every floor uses: atomic writes, a forgiving JSON read, a lock beside a path,
byte counts for people.

They hold no knowledge of a cache: the store (cache/store.py), its integrity checks
(cache/integrity.py), the export (cache/wds.py), run folders (stages/runs.py) and the demo's
files all write and read through them, so a file is never seen half-written and a missing or
damaged JSON file reads the same way everywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_write_text", "read_json", "creation_lock", "human_bytes"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # readable like any other file (mkstemp makes it private)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str | Path, kind: type | None = None) -> Any:
    """Parsed JSON of a file, or None when it is missing or unreadable (or, with ``kind``, holds
    something else than a ``kind``, e.g. dict). A reader that must say why a file did not read
    opens it itself (stages/runs.py ``read_run``, cache/wds.py's export headers)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if kind is None or isinstance(data, kind) else None


@contextlib.contextmanager
def creation_lock(path: Path) -> Iterator[None]:
    """Exclude the other creators of the file or folder at ``path`` (e.g. the ranks of one
    extraction making its store) while it is made.

    The lock file sits beside ``path`` only while someone holds or waits for it: the holder removes
    it before letting go. A waiter that then gets the lock on the removed file sees that the name
    no longer leads to its file and takes the lock again on the name's current file, so two
    creators never both hold it."""
    lock_path = path.parent / f".{path.name}.lock"
    while True:
        fh = open(lock_path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                now = os.stat(lock_path)
            except FileNotFoundError:
                now = None
            mine = os.fstat(fh.fileno())
            if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                continue  # the holder before us removed this file: lock the name's current one
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)  # before unlocking: a waiter on this file then retries
            return
        finally:
            fh.close()  # releases the lock


def human_bytes(n: float) -> str:
    """A byte count (or a difference of two, negative) in B, KB, MB, GB or TB (1024-based)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
