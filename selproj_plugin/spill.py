"""Spill directories for gradient factors beyond the memory limit: gone when their run ends.

A directory is removed when its store closes, when the process exits, and, for a run that
was killed (SIGKILL, out of memory), by the next run that spills into the same parent.
Each directory holds a lock file its process keeps locked; the OS drops the lock when the
process dies, however it dies, so a directory whose lock can be taken belongs to a dead run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
from filelock import FileLock, Timeout

PREFIX = "selproj-spill-"
ALIGN = 64  # bytes: every spilled array starts aligned for any dtype
OWNER = "owner.lock"


class SpillError(OSError):
    """Factors cannot be written to disk; the message is one line naming the directory and a way out."""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def remove_stale(parent: str | os.PathLike | None = None) -> int:
    """Delete the spill directories under ``parent`` (default: the temp dir) whose runs died; reports and returns the bytes freed.

    Directories without a lock file (an older version's, or a live one of another layout) are left alone.
    """
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    freed = 0
    for path in Path(parent).glob(f"{PREFIX}*"):
        if not (path / OWNER).is_file():
            continue
        lock = FileLock(path / OWNER, timeout=0)
        try:
            lock.acquire()
        except (Timeout, OSError):
            continue  # its process is alive (or the lock cannot be taken here)
        try:
            freed += _size(path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.release()
    if freed:
        print(f"[selproj] removed {freed / 2**30:.2f} GB of spill directories left in {parent} by killed runs", file=sys.stderr)
    return freed


def _write(f: BinaryIO, array: np.ndarray) -> None:
    if array.nbytes:  # a contiguous array's buffer, written as it lies in memory
        f.write(array.data)


def _remove(path: Path, lock: FileLock) -> None:
    shutil.rmtree(path, ignore_errors=True)
    lock.release()


class SpillDir:
    """A fresh spill directory under ``parent`` (default: the system temp dir), locked by this process."""

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # lock first, under a name the cleaner skips, then give the directory its real name
            hidden = Path(tempfile.mkdtemp(prefix=f".{PREFIX}", dir=parent))
            lock = FileLock(hidden / OWNER, timeout=0)
            lock.acquire()
            path = parent / hidden.name[1:]
            os.rename(hidden, path)
        except OSError as exc:
            raise SpillError(
                f"cannot create a spill directory in {parent}: {exc.strerror or exc}; point TMPDIR elsewhere or raise the memory limit"
            ) from None
        self.path = path
        self._finalizer = weakref.finalize(self, _remove, path, lock)  # also runs at interpreter exit

    def save(self, name: str, arrays: Sequence[np.ndarray]) -> tuple[Path, list[int]]:
        """``arrays`` back to back in one file ``name.bin`` (each at a multiple of :data:`ALIGN` bytes): the
        file and each array's offset.  One file per sample keeps reads to one map however many tensors it has;
        a full or read-only disk is one SpillError and leaves no partial file."""
        path = self.path / f"{name}.bin"
        offsets, pos = [], 0
        try:
            with open(path, "wb") as f:
                for a in arrays:
                    pos = -(-pos // ALIGN) * ALIGN
                    f.seek(pos)
                    offsets.append(pos)
                    _write(f, np.ascontiguousarray(a))
                    pos += a.nbytes
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise SpillError(
                f"cannot spill gradient factors to {self.path}: {exc.strerror or exc}; "
                "free space there, point TMPDIR elsewhere or raise the memory limit"
            ) from None
        return path, offsets

    def close(self) -> None:
        """Delete the directory and its files (idempotent)."""
        self._finalizer()
