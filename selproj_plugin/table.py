"""ComponentTable: per-component gradient dot products for queries x candidates.

This is the one data type between the gradient engine and the strategies.  It is
saved as ``.npz`` with the same array names as the paper's reference files, so both
load through :meth:`ComponentTable.load` and are validated the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selproj_plugin.atomic import atomic_write
from selproj_plugin.components import Component, kind_and_layer
from selproj_plugin.transforms import selection_digest

FORMAT = "selproj-component-table/1"
# Projection keys read KIND@DIM:SELECTION_DIGEST:SEED; the paper's reference files hold TRAK
# projections per component block at a share of its size, stored under this kind and seed "paper".
PAPER_PROJECTION = "per_component"
PAPER_SEED = "paper"
DEFAULT_SEED = "seed0"  # the projection strategies' default seed, as a key spells it


@dataclass(frozen=True)
class _ProjectionKey:
    """A projection key ``KIND@DIM:SELECTION_DIGEST:SEED`` in parts."""

    kind: str
    dim: float
    selection: str
    seed: str

    @classmethod
    def parse(cls, key: str) -> "_ProjectionKey | None":
        head, _, rest = key.partition(":")
        kind, at, dim = head.partition("@")
        selection, _, seed = rest.partition(":")
        if not (kind and at and selection and seed):  # another transform's key (a plugin's own form)
            return None
        try:
            return cls(kind, float(dim), selection, seed)
        except ValueError:
            return None


class TableError(ValueError):
    """A component table that is missing, unreadable or inconsistent."""


def savez_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` written atomically (:func:`~selproj_plugin.atomic.atomic_write`)."""
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


@dataclass
class ComponentTable:
    """Dot products <g_c(query), g_c(candidate)> for Q queries x K candidates x C components."""

    cross: np.ndarray  # [Q, K, C] float64
    query_self: np.ndarray  # [Q, C]
    candidate_self: np.ndarray  # [Q, K, C]
    is_original: np.ndarray  # [Q, K] bool, exactly one True per row
    components: np.ndarray  # [C] str
    num_params: np.ndarray  # [C] int64
    kinds: np.ndarray | None = None  # [C] str, derived from names when absent
    layers: np.ndarray | None = None  # [C] int64, -1 where a component has no layer
    query_ids: np.ndarray | None = None  # [Q] str
    candidate_ids: np.ndarray | None = None  # [Q, K] str
    rp_dims: np.ndarray | None = None  # [R] int64: dimensions of stored random projections
    rp_similarity: np.ndarray | None = None  # [R, Q, K] cosine under each stored transform
    rp_keys: np.ndarray | None = None  # [R] str: the Transform.key each similarity was computed under
    meta: dict = field(default_factory=dict)  # JSON-serialisable provenance

    def __post_init__(self) -> None:
        self.components = np.asarray(self.components).astype(str)
        if self.kinds is None or self.layers is None:
            derived = [kind_and_layer(n) for n in self.components]
            self.kinds = np.array([k for k, _ in derived], dtype=str)
            self.layers = np.array([-1 if l is None else l for _, l in derived], dtype=np.int64)
        n_q, n_k = np.shape(self.is_original)[:2] if np.ndim(self.is_original) == 2 else (0, 0)
        if self.rp_similarity is not None and self.rp_keys is None and self.rp_dims is not None:
            # the paper's reference files: TRAK projections per component block at a share of its size
            digest = selection_digest(self.component_list)
            self.rp_keys = np.array([f"{PAPER_PROJECTION}@{int(d)}:{digest}:{PAPER_SEED}" for d in self.rp_dims])
        if self.query_ids is None:
            self.query_ids = np.array([str(i) for i in range(n_q)])
        if self.candidate_ids is None:
            self.candidate_ids = np.array([[f"{q}:{k}" for k in range(n_k)] for q in range(n_q)]).reshape(n_q, n_k)
        self.validate()

    # ---- shape -------------------------------------------------------------------
    @property
    def n_queries(self) -> int:
        return int(self.cross.shape[0])

    @property
    def n_candidates(self) -> int:
        return int(self.cross.shape[1])

    @property
    def n_components(self) -> int:
        return int(self.cross.shape[2])

    @property
    def total_params(self) -> int:
        return int(np.sum(self.num_params))

    @property
    def labels(self) -> list[str]:
        """Short labels (``L9 down``) for reports."""
        return [k if l < 0 else f"L{l} {k}" for k, l in zip(self.kinds, self.layers)]

    @property
    def component_list(self) -> list[Component]:
        """The table's components as catalogue entries, for reducers' ``select`` (parameter names
        from the engine's ``meta["param_names"]``; a reference file's names are parameter names)."""
        params = self.meta.get("param_names", {}) if isinstance(self.meta, dict) else {}
        return [
            Component(str(n), str(k), None if l < 0 else int(l), tuple(params.get(str(n), (str(n),))), int(p))
            for n, k, l, p in zip(self.components, self.kinds, self.layers, self.num_params)
        ]

    def indices(self, names: list[str]) -> np.ndarray:
        """Column of each named component; one-line :class:`TableError` for a name the table lacks."""
        index = {str(n): i for i, n in enumerate(self.components)}
        missing = [n for n in names if n not in index]
        if missing:
            raise TableError(f"the table has no component {missing[0]} ({len(missing)} of {len(names)} names missing)")
        return np.array([index[n] for n in names], dtype=int)

    def projection(self, key: str) -> np.ndarray | None:
        """[Q, K] similarity stored under transform ``key`` (``KIND@DIM:DIGEST:SEED``), or None when the table
        stores no projection of that kind and selection.

        One of the paper's draws (seed ``paper``: another tool's, its seed unknown) stands in for the default
        seed at a dimension within 1% (rounding of a percentage).  Any other seed or dimension the table lacks
        is a :class:`TableError` naming what it holds: another draw's similarities would hide a seed's variance.
        """
        if self.rp_similarity is None or self.rp_keys is None:
            return None
        keys = [str(k) for k in self.rp_keys]
        if key in keys:
            return np.asarray(self.rp_similarity[keys.index(key)], dtype=np.float64)
        want = _ProjectionKey.parse(key)
        if want is None:
            return None
        same = [
            (i, have)
            for i, have in enumerate(map(_ProjectionKey.parse, keys))
            if have and (have.kind, have.selection) == (want.kind, want.selection)
        ]
        for i, have in same:
            if have.seed == PAPER_SEED and want.seed == DEFAULT_SEED and abs(have.dim - want.dim) <= 0.01 * want.dim:
                return np.asarray(self.rp_similarity[i], dtype=np.float64)
        if not same:
            return None
        held = ", ".join(f"{have.seed} at dim {have.dim:g}" for _, have in same)
        raise TableError(
            f"the table stores no {want.kind} projection {want.seed} at dim {want.dim:g} of this "
            f"selection; it holds {held}: ask for one of those, or build a table with this one"
        )

    def take(self, rows: np.ndarray) -> "ComponentTable":
        """A table of only the given query rows (for held-out folds); its queries are no longer in groups."""
        return ComponentTable(
            cross=self.cross[rows],
            query_self=self.query_self[rows],
            candidate_self=self.candidate_self[rows],
            is_original=self.is_original[rows],
            components=self.components,
            num_params=self.num_params,
            kinds=self.kinds,
            layers=self.layers,
            query_ids=self.query_ids[rows],
            candidate_ids=self.candidate_ids[rows],
            rp_dims=self.rp_dims,
            rp_keys=self.rp_keys,
            rp_similarity=None if self.rp_similarity is None else self.rp_similarity[:, rows],
            meta={k: v for k, v in self.meta.items() if k != "query_groups"},
        )

    def group_rows(self) -> dict[str, np.ndarray]:
        """The query rows of each named run in ``meta['query_groups']`` (``[[name, count], ...]`` in row order:
        the benchmark's settings, which share one table); ``{'': every row}`` without groups."""
        groups = self.meta.get("query_groups") if isinstance(self.meta, dict) else None
        if not groups:
            return {"": np.arange(len(self.query_ids))}
        ends = np.cumsum([int(count) for _, count in groups])
        return {str(name): np.arange(end - int(count), end) for (name, count), end in zip(groups, ends)}

    def parts(self) -> dict[str, "ComponentTable"]:
        """Each named run of queries (:meth:`group_rows`) as a table of its own; ``{'': self}`` without groups."""
        groups = self.group_rows()
        return {"": self} if list(groups) == [""] else {name: self.take(rows) for name, rows in groups.items()}

    def validate(self) -> None:
        """Raise :class:`TableError` with a one-line message on the first inconsistency."""
        if self.cross.ndim != 3:
            raise TableError(f"cross must be [queries, candidates, components], got shape {self.cross.shape}")
        q, k, c = self.cross.shape
        expected = {
            "query_self": (self.query_self, (q, c)),
            "candidate_self": (self.candidate_self, (q, k, c)),
            "is_original": (self.is_original, (q, k)),
            "components": (self.components, (c,)),
            "num_params": (self.num_params, (c,)),
            "kinds": (self.kinds, (c,)),
            "layers": (self.layers, (c,)),
            "query_ids": (self.query_ids, (q,)),
            "candidate_ids": (self.candidate_ids, (q, k)),
        }
        for name, (arr, shape) in expected.items():
            if np.shape(arr) != shape:
                raise TableError(f"shapes disagree: {name} is {np.shape(arr)}, expected {shape} from cross {self.cross.shape}")
        if q == 0 or k == 0 or c == 0:
            raise TableError(f"table is empty: cross has shape {self.cross.shape}")
        groups = self.meta.get("query_groups") if isinstance(self.meta, dict) else None
        if groups and sum(int(n) for _, n in groups) != q:
            raise TableError(f"meta query_groups {groups} count {sum(int(n) for _, n in groups)} queries, the table {q}")
        originals = np.asarray(self.is_original, dtype=bool).sum(axis=1)
        bad = np.flatnonzero(originals != 1)
        if bad.size:
            raise TableError(
                f"query {self.query_ids[bad[0]]} (row {bad[0]}) has {originals[bad[0]]} originals among its "
                f"candidates, expected exactly 1 ({bad.size} rows affected)"
            )
        for name in ("cross", "query_self", "candidate_self"):
            arr = getattr(self, name)
            if not np.all(np.isfinite(arr)):
                where = np.argwhere(~np.isfinite(arr))[0]
                raise TableError(f"{name} holds NaN or inf at index {tuple(int(i) for i in where)}")
        for name in ("query_self", "candidate_self"):
            arr = getattr(self, name)
            if np.any(arr < 0):
                where = np.argwhere(arr < 0)[0]
                raise TableError(f"{name} is negative at index {tuple(int(i) for i in where)}; self dot products must be >= 0")
        if np.any(np.asarray(self.num_params) <= 0):
            raise TableError("num_params must be positive for every component")
        if self.rp_similarity is not None:
            r = len(self.rp_dims) if self.rp_dims is not None else -1
            if np.shape(self.rp_similarity) != (r, q, k):
                raise TableError(f"shapes disagree: rp_similarity is {np.shape(self.rp_similarity)}, expected {(r, q, k)}")
            if self.rp_keys is None or np.shape(self.rp_keys) != (r,):
                raise TableError(f"rp_keys must name each of the {r} stored similarities")
            if not np.all(np.isfinite(self.rp_similarity)):
                raise TableError("rp_similarity holds NaN or inf")
        self.is_original = np.asarray(self.is_original, dtype=bool)

    # ---- I/O ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the table atomically as ``.npz`` (a partial file never replaces a good one)."""
        path = Path(path)
        arrays = {
            "format": np.array(FORMAT),
            "cross": self.cross,
            "query_self": self.query_self,
            "candidate_self": self.candidate_self,
            "is_original": self.is_original,
            "components": self.components,
            "num_params": self.num_params,
            "kinds": self.kinds,
            "layers": self.layers,
            "query_ids": self.query_ids,
            "candidate_ids": self.candidate_ids,
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        if self.rp_similarity is not None:
            arrays.update(rp_dims=self.rp_dims, rp_similarity=self.rp_similarity, rp_keys=self.rp_keys)
        return savez_atomic(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ComponentTable":
        """Load a table saved by :meth:`save` or one of the paper's reference ``.npz`` files."""
        path = Path(path)
        if not path.is_file():
            raise TableError(f"table file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except Exception as exc:  # zip, pickle or header errors all mean "not a table"
            raise TableError(f"cannot read table {path}: {exc}") from None
        missing = [k for k in ("cross", "query_self", "candidate_self", "is_original", "components", "num_params") if k not in arrays]
        if missing:
            raise TableError(f"{path} is not a component table: missing arrays {', '.join(missing)}")
        meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {"source": str(path)}
        arrays.pop("format", None)
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(meta=meta, **{k: v for k, v in arrays.items() if k in known})
        except TableError as exc:
            raise TableError(f"{path}: {exc}") from None
