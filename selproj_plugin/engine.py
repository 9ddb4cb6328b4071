"""Gradient engine: per-component gradient dot products for queries x candidates.

Every distinct sample (by id) goes through one batched forward/backward; its gradient
factors are kept (in RAM up to a memory limit, then spilled to disk) only for the side
that is needed again, while the other side streams past.  The per-subset functions
(:func:`iter_factors`, :func:`factor_dots`) are what a distributed run would shard.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from selproj_plugin.capture import ComponentSpec, GradientCapture, SampleFactors, matrix_form, to_param_layout
from selproj_plugin import distributed
from selproj_plugin.components import Component, catalogue, select
from selproj_plugin.gram import choose_modes, factor_dots
from selproj_plugin.loss import Encoded, ModelError, collate, encode_samples, pad_token_id, require_trainable
from selproj_plugin.models import model_name
from selproj_plugin.projection import TensorSketch, TrakCudaJL, trak_cuda_available
from selproj_plugin.samples import Sample
from selproj_plugin.table import ComponentTable

__all__ = [
    "EngineConfig", "FactorStore", "build_table", "build_table_distributed", "sample_features", "projected_features", "pairwise_dots",
    "iter_factors", "factor_dots", "prepare",
]


A_CHUNK = 16  # stored samples concatenated per Gram call in pairwise_dots
FFT_MAX_BUCKETS = 2048  # sketch blocks wider than this sketch the materialised gradient instead


@dataclass
class EngineConfig:
    """Knobs of the engine; defaults suit a 135M model on a laptop CPU."""

    batch_size: int = 8
    max_length: int = 512
    memory_limit_gb: float = 6.0  # factors kept in RAM beyond this are spilled to disk
    device: str = "cpu"
    spill_dir: str | None = None
    progress: bool = True
    mode: str = "auto"  # per-component dot method: 'auto' (cheaper flops), 'factored' or 'materialised'


class FactorStore:
    """Sample factors by key, in RAM up to ``limit_bytes`` and as ``.npy`` files beyond it.

    Spilled factors are read back whole on each ``get`` and dropped after use, so the
    process holds at most the limit plus the factors in use, however many are spilled.
    """

    def __init__(self, limit_bytes: float, spill_dir: str | None = None) -> None:
        self.limit = limit_bytes
        self.in_ram = 0
        self.spilled = 0
        self._items: dict[Any, SampleFactors] = {}
        self._files: dict[Any, tuple[SampleFactors, dict[str, Path], dict[str, Path]]] = {}
        self._parent = spill_dir
        self._dir: Path | None = None

    def put(self, key: Any, f: SampleFactors) -> None:
        f = f.to("cpu")
        if self.in_ram + f.nbytes <= self.limit:
            self.in_ram += f.nbytes
            self._items[key] = f
            return
        if self._dir is None:
            if self._parent is not None:
                Path(self._parent).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="selproj-spill-", dir=self._parent))
        base = self._dir / f"s{len(self._files)}"
        tensors = {k: self._spill(base, f"t{i}", t) for i, (k, t) in enumerate(f.tensors.items())}
        vectors = {k: self._spill(base, f"v{i}", t) for i, (k, t) in enumerate(f.vectors.items())}
        self.spilled += f.nbytes
        self._files[key] = (SampleFactors(f.sample_id, {}, f.uses, {}), tensors, vectors)

    @staticmethod
    def _spill(base: Path, tag: str, t: torch.Tensor) -> Path:
        path = Path(f"{base}-{tag}.npy")
        np.save(path, t.numpy())
        return path

    def get(self, key: Any) -> SampleFactors:
        if key in self._items:
            return self._items[key]
        shell, tensors, vectors = self._files[key]
        load = lambda paths: {k: torch.from_numpy(np.load(p)) for k, p in paths.items()}  # noqa: E731
        return SampleFactors(shell.sample_id, load(tensors), shell.uses, load(vectors))

    def __contains__(self, key: Any) -> bool:
        return key in self._items or key in self._files

    def close(self) -> None:
        """Drop everything and delete spilled files."""
        self._items.clear()
        self._files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass
class Prepared:
    """Model-side state shared by the public functions: selected components and capture hooks."""

    capture: GradientCapture
    specs: list[ComponentSpec]
    pad_id: int


def _modes(prep: "Prepared", config: EngineConfig, lengths: Sequence[int], n_pairs: int) -> set[str]:
    if config.mode == "factored":
        return set()
    if config.mode == "materialised":
        return {s.name for s in prep.specs if s.kind == "factor"}
    if config.mode != "auto":
        raise ValueError(f"unknown engine mode {config.mode!r}: use auto, factored or materialised")
    return choose_modes(prep.specs, lengths, n_pairs)


def prepare(model: torch.nn.Module, tokenizer: Any, components: Sequence[str] | None) -> Prepared:
    """Catalogue and select components, check the model can give gradients, build the capture."""
    require_trainable(model)
    try:
        comps = catalogue(model)
    except ValueError:
        raise ModelError(f"model {model_name(model)} has no trainable parameters") from None
    if components is not None:
        comps = select(comps, components)
    capture = GradientCapture(model, comps)
    return Prepared(capture, [capture.specs[c.name] for c in comps], pad_token_id(tokenizer))


def _batches(encoded: Sequence[Encoded], order: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in length-sorted batches (longest first, so memory peaks early)."""
    ranked = sorted(order, key=lambda i: -len(encoded[i].input_ids))
    for start in range(0, len(ranked), batch_size):
        yield ranked[start:start + batch_size]


def iter_factors(prep: Prepared, encoded: Sequence[Encoded], indices: Sequence[int], config: EngineConfig,
                 materialise: set[str] = frozenset(), label: str = "samples") -> Iterator[tuple[int, SampleFactors]]:
    """Factors of ``encoded[i]`` for each i in ``indices``: one forward/backward per batch.

    This is the unit a distributed run shards: each rank passes its own subset of indices.
    """
    done, total, t0 = 0, len(indices), time.perf_counter()
    label = distributed.prefix(label)
    for idx in _batches(encoded, indices, config.batch_size):
        batch = collate([encoded[i] for i in idx], prep.pad_id, config.device)
        factors, _ = prep.capture.run(batch, sorted(materialise))
        for i, f in zip(idx, factors):
            yield i, f
        done += len(idx)
        if config.progress:
            print(f"\r[selproj] {label}: {done}/{total} ({time.perf_counter() - t0:.0f}s)", end="", file=sys.stderr)
    if config.progress and total:
        print(file=sys.stderr)


def _dedupe(samples: Sequence[Sample]) -> tuple[list[Sample], dict[str, int]]:
    unique: list[Sample] = []
    pos: dict[str, int] = {}
    for s in samples:
        if s.id in pos:
            if unique[pos[s.id]] != s:
                raise ValueError(f"sample id {s.id} is used for two different samples")
            continue
        pos[s.id] = len(unique)
        unique.append(s)
    return unique, pos


class _Sketcher:
    """Projects sample factors to each requested dimension (tensor sketch, or TRAK on CUDA)."""

    def __init__(self, specs: Sequence[ComponentSpec], dims: Sequence[int], seed: int, device: str) -> None:
        self.specs = list(specs)
        shapes = {s.name: s.widths for s in specs}
        self.trak = trak_cuda_available(device)
        total = sum(s.rows * s.cols for s in specs)
        self.sketches = [TrakCudaJL(total, d, seed, device) if self.trak and d % 512 == 0
                         else TensorSketch(shapes, d, seed, device) for d in dims]

    def __call__(self, f: SampleFactors) -> list[torch.Tensor]:
        out = []
        for sk in self.sketches:
            if isinstance(sk, TrakCudaJL):
                full = torch.cat([matrix_form(s, f).reshape(-1) for s in self.specs]).to(sk.projector.device)
                out.append(sk.project(full[None])[0].cpu())
                continue
            vec = torch.zeros(sk.dim, dtype=torch.float64, device=sk.device)
            for s in self.specs:
                blk = sk.block(s.name)
                if s.name in f.vectors:
                    part = sk.sketch_matrix(s.name, f.vectors[s.name].view(s.rows, s.cols))
                elif s.kind == "factor" and blk.stop - blk.start > FFT_MAX_BUCKETS:
                    # wide blocks: forming D^T X once is cheaper than FFTs of every token's rows
                    part = sk.sketch_matrix(s.name, matrix_form(s, f))
                else:
                    part = sk.sketch_factors(s.name, [
                        (f.tensors[u.left], u.left_index, f.tensors[u.right] if u.right else None, u.aug)
                        for u in f.uses[s.name]])
                vec[blk] += part
            out.append(vec.cpu())
        return out


def build_table(
    model: torch.nn.Module,
    tokenizer: Any,
    queries: Sequence[Sample],
    candidates: Sequence[Sample],
    candidate_index: np.ndarray,
    original: np.ndarray,
    *,
    components: Sequence[str] | None = None,
    proj_dims: Sequence[int] = (),
    seed: int = 0,
    config: EngineConfig | None = None,
) -> ComponentTable:
    """Component table for ``queries`` x their candidates ``candidates[candidate_index[q, k]]``.

    ``original``: [Q] column of each query's original, or [Q, K] bool.  Each distinct sample
    is forward/backward'ed once; the smaller side's factors are kept, the other streams past.  With
    ``proj_dims``, ``rp_similarity`` holds cosines of tensor-sketched full gradients.
    """
    config = config or EngineConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    candidate_index = np.asarray(candidate_index, dtype=np.int64)
    n_q, n_k = candidate_index.shape if candidate_index.ndim == 2 else (len(queries), -1)
    if candidate_index.ndim != 2 or n_q != len(queries):
        raise ValueError(f"candidate_index must be [queries={len(queries)}, K], got shape {candidate_index.shape}")
    if candidate_index.size and (candidate_index.min() < 0 or candidate_index.max() >= len(candidates)):
        raise ValueError(f"candidate_index holds indices outside 0..{len(candidates) - 1}")
    original = np.asarray(original)
    is_original = original.astype(bool) if original.shape == (n_q, n_k) else \
        (np.arange(n_k)[None, :] == original.astype(np.int64)[:, None])

    prep = prepare(model, tokenizer, components)
    unique, pos = _dedupe(list(queries) + list(candidates))
    encoded, n_truncated = encode_samples(tokenizer, unique, config.max_length)
    q_of = [pos[s.id] for s in queries]
    c_of = np.array([[pos[candidates[j].id] for j in row] for row in candidate_index], dtype=np.int64).reshape(n_q, n_k)
    timings["encode_s"] = time.perf_counter() - t0

    # Keep the factors of the smaller side (queries or candidates) and stream the other past
    # them: every pair has one member on the kept side, so each sample is captured once.
    q_set, c_set = set(q_of), set(c_of.ravel().tolist())
    kept = q_set if len(q_set) <= len(c_set) else c_set
    stored = sorted(kept)
    streamed = sorted((q_set | c_set) - kept)
    partners: dict[int, set[int]] = {}  # sample -> kept samples it is paired with
    for q, row in zip(q_of, c_of):
        for c in map(int, row):
            held, other = (q, c) if q in kept else (c, q)
            partners.setdefault(other, set()).add(held)
    n_pairs = len(stored) + len(streamed) + int(c_of.size)
    lengths = [len(encoded[i].input_ids) for i in stored + streamed]
    materialise = _modes(prep, config, lengths, n_pairs)
    sketcher = _Sketcher(prep.specs, proj_dims, seed, config.device) if proj_dims else None

    n_c = len(prep.specs)
    self_dots = np.zeros((len(unique), n_c))
    cross: dict[tuple[int, int], np.ndarray] = {}  # keyed by the sorted pair of sample indices
    sketches: dict[int, list[torch.Tensor]] = {}
    store = FactorStore(config.memory_limit_gb * 2**30, config.spill_dir)
    t_capture = t_dots = 0.0

    def pair_dots(i: int, f: SampleFactors) -> None:
        held = sorted(partners.get(i, ()))
        for j, row in zip(held, factor_dots(f, [store.get(j).to(config.device) for j in held], prep.specs)):
            cross[(min(i, j), max(i, j))] = row

    try:
        t1 = time.perf_counter()
        for i, f in iter_factors(prep, encoded, stored, config, materialise,
                                 "queries" if kept is q_set else "candidates"):
            t2 = time.perf_counter()
            t_capture += t2 - t1
            self_dots[i] = factor_dots(f, [f], prep.specs)[0]
            if sketcher:
                sketches[i] = sketcher(f)
            store.put(i, f)
            t1 = time.perf_counter()
            t_dots += t1 - t2
        t2 = time.perf_counter()
        for i in sorted(set(partners) & kept):  # pairs whose members are both kept
            pair_dots(i, store.get(i).to(config.device))
        t1 = time.perf_counter()
        t_dots += t1 - t2
        for i, f in iter_factors(prep, encoded, streamed, config, materialise,
                                 "candidates" if kept is q_set else "queries"):
            t2 = time.perf_counter()
            t_capture += t2 - t1
            f = f.to(config.device)
            self_dots[i] = factor_dots(f, [f], prep.specs)[0]
            pair_dots(i, f)
            if sketcher:
                sketches[i] = sketcher(f)
            t1 = time.perf_counter()
            t_dots += t1 - t2
        spilled = store.spilled
    finally:
        store.close()
    timings.update(capture_s=t_capture, dots_s=t_dots, total_s=time.perf_counter() - t0)

    cross_arr = np.stack([np.stack([cross[(min(q, int(c)), max(q, int(c)))] for c in row])
                          for q, row in zip(q_of, c_of)])
    rp_dims = rp_sim = None
    if sketcher:
        rp_dims = np.asarray(proj_dims, dtype=np.int64)
        rp_sim = np.zeros((len(proj_dims), n_q, n_k))
        for r in range(len(proj_dims)):
            for qi, (q, row) in enumerate(zip(q_of, c_of)):
                for k, c in enumerate(row):
                    a, b = sketches[q][r], sketches[int(c)][r]
                    denom = float(a.norm() * b.norm())
                    rp_sim[r, qi, k] = float(a @ b) / denom if denom > 0 else 0.0
    comps = [s.component for s in prep.specs]
    meta = {
        "model": model_name(model), "truncated": n_truncated,
        "truncated_ids": [e.sample_id for e in encoded if e.truncated], "max_length": config.max_length,
        "distinct_samples": len(stored) + len(streamed), "batch_size": config.batch_size,
        "materialised_components": len(materialise), "mode": config.mode, "spilled_bytes": int(spilled),
        "timings": timings, "seed": seed, "engine": "selproj factor engine",
    }
    return ComponentTable(
        cross=cross_arr, query_self=self_dots[q_of], candidate_self=self_dots[c_of],
        is_original=is_original, components=np.array([c.name for c in comps]),
        num_params=np.array([c.num_params for c in comps], dtype=np.int64),
        query_ids=np.array([s.id for s in queries]),
        candidate_ids=np.array([[candidates[j].id for j in row] for row in candidate_index]).reshape(n_q, n_k),
        rp_dims=rp_dims, rp_similarity=rp_sim, meta=meta,
    )


def build_table_distributed(
    model: torch.nn.Module,
    tokenizer: Any,
    queries: Sequence[Sample],
    candidates: Sequence[Sample],
    candidate_index: np.ndarray,
    original: np.ndarray,
    *,
    shard_path: Callable[[int, int], Path] | None = None,
    **kwargs: Any,
) -> ComponentTable:
    """:func:`build_table` with the queries split over torch.distributed ranks.

    Each rank builds the rows of its own contiguous block of queries (saving them to
    ``shard_path(rank, world)`` when given, and reusing a shard file that is already
    there), then the rows are gathered so every rank returns the whole table.  With
    one process this is :func:`build_table`.
    """
    rank, world = distributed.rank_world()
    if world == 1:
        return build_table(model, tokenizer, queries, candidates, candidate_index, original, **kwargs)
    rows = distributed.shard(len(queries), rank, world)
    path = shard_path(rank, world) if shard_path else None
    if path is not None and path.is_file():
        part = ComponentTable.load(path)
    else:
        part = build_table(model, tokenizer, [queries[i] for i in rows], candidates,
                           np.asarray(candidate_index)[rows], np.asarray(original)[rows], **kwargs)
        if path is not None:
            part.save(path)
    table = ComponentTable.concat(distributed.gather(part))
    # ranks share candidates, so the whole table's truncated samples are the union of theirs
    truncated = sorted({i for shard in table.meta["shards"] for i in shard.get("truncated_ids", [])})
    table.meta.update(truncated=len(truncated), truncated_ids=truncated)
    return table


def sample_features(model: torch.nn.Module, tokenizer: Any, samples: Sequence[Sample],
                    components: Sequence[str] | None = None, config: EngineConfig | None = None
                    ) -> dict[str, torch.Tensor]:
    """Materialised per-sample gradients ``{component: [N, num_params]}`` in parameter layout.

    Layout matches concatenating ``p.grad.flatten()`` over the component's ``param_names``.
    Memory is N x (selected parameters): select components for large models.
    """
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, components)
    encoded, _ = encode_samples(tokenizer, samples, config.max_length)
    out = {s.name: torch.zeros(len(samples), s.component.num_params) for s in prep.specs}
    for i, f in iter_factors(prep, encoded, range(len(samples)), config, label="features"):
        for s in prep.specs:
            out[s.name][i] = to_param_layout(s, matrix_form(s, f)).cpu()
    return out


def projected_features(model: torch.nn.Module, tokenizer: Any, samples: Sequence[Sample], dim: int,
                       components: Sequence[str] | None = None, seed: int = 0,
                       config: EngineConfig | None = None) -> torch.Tensor:
    """Randomly projected full gradients ``[N, dim]`` (float64) with ``E<Pa, Pb> = <a, b>``.

    Deterministic for a given ``seed``; never materialises a gradient or a projection matrix
    on CPU (tensor sketch of the factors).
    """
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, components)
    encoded, _ = encode_samples(tokenizer, samples, config.max_length)
    sketcher = _Sketcher(prep.specs, [dim], seed, config.device)
    out = torch.zeros(len(samples), dim, dtype=torch.float64)
    for i, f in iter_factors(prep, encoded, range(len(samples)), config, label="projection"):
        out[i] = sketcher(f)[0]
    return out


def pairwise_dots(model: torch.nn.Module, tokenizer: Any, samples_a: Sequence[Sample], samples_b: Sequence[Sample],
                  components: Sequence[str] | None = None, config: EngineConfig | None = None) -> np.ndarray:
    """Every ``<g_c(a), g_c(b)>``: [A, B, C] float64 (``samples_a`` factors stored, ``samples_b`` streamed)."""
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, components)
    unique, pos = _dedupe(list(samples_a) + list(samples_b))
    encoded, _ = encode_samples(tokenizer, unique, config.max_length)
    a_of = [pos[s.id] for s in samples_a]
    b_of = [pos[s.id] for s in samples_b]
    stored = sorted(set(a_of))
    streamed = sorted(set(b_of) - set(stored))
    lengths = [len(encoded[i].input_ids) for i in stored + streamed]
    materialise = _modes(prep, config, lengths, len(stored) * len(set(b_of)))
    store = FactorStore(config.memory_limit_gb * 2**30, config.spill_dir)
    dots: dict[int, np.ndarray] = {}
    try:
        for i, f in iter_factors(prep, encoded, stored, config, materialise, "set A"):
            store.put(i, f)
        def against_a(f: SampleFactors) -> np.ndarray:  # A in chunks: concatenated factors stay small
            f = f.to(config.device)
            return np.concatenate([
                factor_dots(f, [store.get(i).to(config.device) for i in stored[s:s + A_CHUNK]], prep.specs)
                for s in range(0, len(stored), A_CHUNK)])

        for b in sorted(set(b_of) & set(stored)):
            dots[b] = against_a(store.get(b))
        for b, f in iter_factors(prep, encoded, streamed, config, materialise, "set B"):
            dots[b] = against_a(f)
    finally:
        store.close()
    col = {i: n for n, i in enumerate(stored)}
    return np.stack([np.stack([dots[b][col[a]] for b in b_of]) for a in a_of])
