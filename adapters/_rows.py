"""Reduced rows on disk without memory maps: rows written and column blocks read with pwrite/pread.

A memory-mapped ``[rows, width]`` array keeps every page written or read resident in the
process, so with the full gradient of a 135M model (134M floats a row) RSS grows to the
size of the store.  :class:`RowFile` is an ``.npy`` file written a row at a time and read a
block of columns at a time; :func:`streamed_cosine` and :func:`streamed_dots` score stored
rows block by block, so memory is bounded by the block, not the store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy

MIN_BLOCK_COLUMNS = 1024  # smaller blocks only add system calls


class RowFile:
    """A ``[rows, width]`` ``.npy`` file read and written through the file, never mapped."""

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype, offset: int) -> None:
        self.path, self.shape, self.dtype, self.offset = path, shape, np.dtype(dtype), offset

    @classmethod
    def open(cls, path: str | os.PathLike, shape: tuple[int, int], dtype: Any, mode: str) -> "RowFile":
        """``mode`` ``"w+"`` creates (sparse, zero-filled) a file of ``shape``; ``"r+"`` opens an existing one."""
        path, dtype, shape = Path(path), np.dtype(dtype), tuple(int(s) for s in shape)
        if mode == "w+":
            with open(path, "wb") as f:
                npy.write_array_header_2_0(f, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
                offset = f.tell()
                f.truncate(offset + shape[0] * shape[1] * dtype.itemsize)
            return cls(path, shape, dtype, offset)
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            stored, _, stored_dtype = npy.read_array_header_2_0(f) if version == (2, 0) else npy.read_array_header_1_0(f)
            offset = f.tell()
        if tuple(stored) != shape or stored_dtype != dtype:
            raise ValueError(f"{path} holds {stored_dtype} {tuple(stored)}, expected {dtype} {shape}")
        return cls(path, shape, dtype, offset)

    def __setitem__(self, rows: Any, values: Any) -> None:
        """Write whole rows: ``rows`` an index array or slice, ``values`` ``[len(rows), width]``."""
        index = np.arange(self.shape[0])[rows].reshape(-1)
        data = np.ascontiguousarray(torch.as_tensor(values).detach().cpu().numpy(), dtype=self.dtype)
        data = data.reshape(len(index), self.shape[1])
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for i, row in zip(index, data):
                view, at = memoryview(row).cast("B"), self.offset + int(i) * row.nbytes
                while len(view):  # a large write may be partial
                    done = os.pwrite(fd, view, at)
                    view, at = view[done:], at + done
        finally:
            os.close(fd)

    def columns(self, start: int, stop: int) -> np.ndarray:
        """``[rows, stop - start]`` block of every row (one read per row)."""
        width, size = stop - start, self.dtype.itemsize
        out = np.empty((self.shape[0], width), dtype=self.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i in range(self.shape[0]):
                view, at = memoryview(out[i]).cast("B"), self.offset + (i * self.shape[1] + start) * size
                while len(view):  # straight into the block; a large read may be partial
                    done = os.preadv(fd, [view], at)
                    if not done:
                        raise EOFError(f"{self.path} ends before row {i}, column {stop}")
                    view, at = view[done:], at + done
        finally:
            os.close(fd)
        return out


def block_columns(limit_bytes: int, rows: int, width: int, itemsize: int = 4) -> int:
    """Columns per block so that ``rows`` rows of a block (as read and as float64) fit ``limit_bytes``."""
    return min(width, max(MIN_BLOCK_COLUMNS, int(limit_bytes // max(1, rows * (itemsize + 8)))))


def streamed_cosine(train: RowFile, target: RowFile, limit_bytes: int) -> torch.Tensor:
    """``[train, target]`` cosines of stored rows, reading blocks of columns, summed in float64.

    Float32 products summed over a full gradient's 10^8 entries lose digits (on SmolLM2-135M a
    cosine came out 4e-2 off); each block is converted to float64 before its products."""
    n, width = train.shape
    block = block_columns(limit_bytes, n + target.shape[0], width, train.dtype.itemsize)
    dots = torch.zeros(n, target.shape[0], dtype=torch.float64)
    train_sq = torch.zeros(n, dtype=torch.float64)
    target_sq = torch.zeros(target.shape[0], dtype=torch.float64)
    for start in range(0, width, block):
        stop = min(width, start + block)
        a = torch.from_numpy(train.columns(start, stop)).double()
        b = torch.from_numpy(target.columns(start, stop)).double()
        dots += a @ b.T
        train_sq += (a * a).sum(1)
        target_sq += (b * b).sum(1)
    return dots / (train_sq.sqrt().clamp(min=1e-300)[:, None] * target_sq.sqrt().clamp(min=1e-300)[None, :])


def streamed_dots(rows: RowFile, other: torch.Tensor, limit_bytes: int) -> torch.Tensor:
    """``[rows, other]`` dot products of stored rows with in-memory rows ``other``, a block of columns at a time,
    summed in float64 (see :func:`streamed_cosine`)."""
    n, width = rows.shape
    block = block_columns(limit_bytes, n, width, rows.dtype.itemsize)
    out = torch.zeros(n, other.shape[0], dtype=torch.float64)
    for start in range(0, width, block):
        stop = min(width, start + block)
        out += torch.from_numpy(rows.columns(start, stop)).double() @ other[:, start:stop].double().T
    return out
