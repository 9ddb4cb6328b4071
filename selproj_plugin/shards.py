"""TableShard: the dot products one rank computed for a component table, by sample id.

A distributed table build leaves one shard file per rank; a rerun reuses a finished
shard instead of recomputing it, and the gathered shards merge into the full table.
Keys are sample ids, not positions, so a shard means the same thing in every run.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from selproj_plugin.errors import one_line
from selproj_plugin.table import TableError, savez_atomic

FORMAT = "selproj-table-shard/1"
Pair = tuple[str, str]


def pair_key(a: str, b: str) -> Pair:
    """The order-free key of the pair of samples ``a`` and ``b``."""
    return (a, b) if a <= b else (b, a)


@dataclass
class Timings:
    """Seconds an executor spent capturing, taking dots (storing, i.e. spilling, included), storing and projecting."""

    capture_s: float = 0.0
    dots_s: float = 0.0
    store_s: float = 0.0
    project_s: float = 0.0


@dataclass
class TableShard:
    """Self dots ``{id: [C]}``, pair dots ``{pair: [C]}`` and cosines ``{pair: [R]}`` under transforms ``rp_keys``."""

    components: list[str]
    self_dots: dict[str, np.ndarray] = field(default_factory=dict)
    cross: dict[Pair, np.ndarray] = field(default_factory=dict)
    rp: dict[Pair, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    rp_keys: list[str] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> Path:
        pairs = sorted(self.cross)
        ids = sorted(self.self_dots)
        c = len(self.components)
        arrays = {
            "format": np.array(FORMAT),
            "components": np.array(self.components, dtype=str),
            "self_ids": np.array(ids, dtype=str).reshape(len(ids)),
            "self_dots": np.array([self.self_dots[i] for i in ids], dtype=np.float64).reshape(len(ids), c),
            "pair_ids": np.array(pairs, dtype=str).reshape(len(pairs), 2),
            "cross": np.array([self.cross[p] for p in pairs], dtype=np.float64).reshape(len(pairs), c),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        if self.rp_keys:
            arrays["rp"] = np.array([self.rp[p] for p in pairs], dtype=np.float64).reshape(len(pairs), len(self.rp_keys))
            arrays["rp_keys"] = np.array(self.rp_keys, dtype=str)
        return savez_atomic(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TableShard":
        """Read a shard file; a damaged one is a one-line :class:`TableError` naming it."""
        try:
            if not zipfile.is_zipfile(path):
                raise ValueError("not an .npz archive (truncated or overwritten)")
            with np.load(path, allow_pickle=False) as data:
                a = {key: data[key] for key in data.files}
        except Exception as exc:
            raise TableError(f"cannot read table shard {path}: {one_line(exc)}; delete it to recompute") from None
        if str(a.get("format", "")) != FORMAT:
            raise TableError(f"{path} is not a table shard (format {str(a.get('format', 'missing'))!r})")
        pairs = [pair_key(str(x), str(y)) for x, y in a["pair_ids"]]
        return cls(
            components=[str(c) for c in a["components"]],
            self_dots={str(i): row for i, row in zip(a["self_ids"], a["self_dots"])},
            cross=dict(zip(pairs, a["cross"])),
            rp=dict(zip(pairs, a["rp"])) if "rp" in a else {},
            meta=json.loads(str(a["meta"])),
            rp_keys=[str(k) for k in a["rp_keys"]] if "rp_keys" in a else [],
        )

    def check(
        self, path: str | os.PathLike, components: Sequence[str], ids: Iterable[str], pairs: Iterable[Pair], rp_keys: Sequence[str]
    ) -> None:
        """Raise if this shard is not the share the current run asks of this rank."""
        problem = (
            "other components"
            if list(self.components) != list(components)
            else "other samples"
            if set(self.self_dots) != set(ids) or set(self.cross) != set(pairs)
            else "other projections"
            if list(self.rp_keys) != list(rp_keys)
            else None
        )
        if problem:
            raise TableError(f"table shard {path} was written for {problem}; delete it to recompute")

    @classmethod
    def merge(cls, shards: Sequence["TableShard"]) -> "TableShard":
        """One shard holding every shard's values (a sample computed by several ranks is kept once)."""
        out = cls(components=list(shards[0].components), meta={"shards": [s.meta for s in shards]}, rp_keys=list(shards[0].rp_keys))
        for s in shards:
            if list(s.components) != out.components or list(s.rp_keys) != out.rp_keys:
                raise TableError("cannot merge table shards of different components or projections")
            for name in ("self_dots", "cross", "rp"):
                for key, value in getattr(s, name).items():
                    getattr(out, name).setdefault(key, value)
        return out
