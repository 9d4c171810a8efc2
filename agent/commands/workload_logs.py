"""Reading a Process workload's output file for the ``logs`` verb.

The file is ``<state_dir>/workloads/<app>.log``, written (and rotated at ``log_max_bytes``)
by the workload's guard process. A reply carries at most ``max_bytes`` of it, so it always
fits in one NATS message; a follower polls with the ``offset`` and ``inode`` of the previous
reply and starts again at 0 when the file was rotated (new inode) or truncated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Chunk:
    data: str
    offset: int
    """Where the next read starts (bytes into the file)."""
    size: int
    inode: int
    more: bool
    """More output was already there than this reply could carry: poll again at once."""
    restarted: bool
    """The file was rotated or truncated since ``offset``: this reads the new one from 0."""

    def fields(self) -> dict[str, object]:
        return {
            "data": self.data,
            "offset": self.offset,
            "size": self.size,
            "inode": self.inode,
            "more": self.more,
            "restarted": self.restarted,
        }


def log_path(state_dir: Path, app: str) -> Path:
    """Where ``scores.process`` has the guard write ``app``'s output."""
    return state_dir / "workloads" / f"{app}.log"


def _whole_lines(raw: bytes, *, at_end: bool) -> bytes:
    """Cut ``raw`` after its last newline, so a follower never splits a line (or a UTF-8
    character); a chunk without any newline is returned whole (one huge line)."""
    if at_end or raw.endswith(b"\n"):
        return raw
    cut = raw.rfind(b"\n")
    return raw[: cut + 1] if cut >= 0 else raw


def read_tail(path: Path, lines: int, max_bytes: int) -> Chunk:
    """The last ``lines`` lines of ``path`` (at most ``max_bytes``); raises OSError."""
    with open(path, "rb") as fh:
        stat = os.fstat(fh.fileno())
        start = max(0, stat.st_size - max_bytes)
        fh.seek(start)
        raw = fh.read(max_bytes)
    end = start + len(raw)
    if start > 0:  # the first line is probably cut: drop it
        newline = raw.find(b"\n")
        raw = raw[newline + 1 :] if newline >= 0 else raw
    kept = raw.splitlines(keepends=True)[-lines:] if lines else []
    return Chunk(
        data=b"".join(kept).decode("utf-8", errors="replace"),
        offset=end,
        size=stat.st_size,
        inode=stat.st_ino,
        more=False,
        restarted=False,
    )


def read_from(path: Path, offset: int, inode: int | None, max_bytes: int) -> Chunk:
    """What ``path`` holds after ``offset``; from 0 if it is another file or got shorter."""
    with open(path, "rb") as fh:
        stat = os.fstat(fh.fileno())
        restarted = (inode is not None and inode != stat.st_ino) or stat.st_size < offset
        start = 0 if restarted else offset
        fh.seek(start)
        raw = fh.read(max_bytes)
    end_of_file = start + len(raw) >= stat.st_size
    raw = _whole_lines(raw, at_end=end_of_file)
    return Chunk(
        data=raw.decode("utf-8", errors="replace"),
        offset=start + len(raw),
        size=stat.st_size,
        inode=stat.st_ino,
        more=start + len(raw) < stat.st_size,
        restarted=restarted,
    )
