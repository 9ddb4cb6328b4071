"""Gradient engine: per-component gradient dot products for queries x candidates.

Every distinct sample (by id) goes through a batched forward/backward.  What is kept follows
the plan of :mod:`selproj_plugin.planner`: one side's factors, most reused first, in RAM up to a
memory limit and then on disk up to a spill allowance, while the other side streams past; a
sample that fits neither is recomputed with each streamed partner; dense pair graphs take their
dots component by component instead.  Under torch.distributed the streamed units are dealt out
to the ranks (``across_ranks=True``).  Transforms a
table cannot express (random projections) are applied to each sample's gradient,
materialised one sample at a time, and the table stores the cosines of their outputs.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from selproj_plugin.capture import (
    ComponentSpec, GradientCapture, SampleFactors, factor_keys, matrix_form, stack_key, stacked_rows, to_param_layout,
)
from selproj_plugin import distributed
from selproj_plugin.components import catalogue, check_scope, select
from selproj_plugin.gram import MEMORY_BOUND_WEIGHT, choose_modes, factor_dots
from selproj_plugin.loss import Batch, Encoded, ModelError, collate, encode_samples, pad_token_id, require_trainable
from selproj_plugin.models import model_name
from selproj_plugin.planner import (
    GRAM_BLOCK_BYTES, PAIR_CHUNK_BYTES, FactorTensor, FactorWidths, TablePlan, check_order, choose_order, factor_tensors,
    factor_widths, plan_pairs,
)
from selproj_plugin.samples import Sample
from selproj_plugin.shards import TableShard, pair_key
from selproj_plugin.spill import SpillDir, remove_stale
from selproj_plugin.table import ComponentTable
from selproj_plugin.transforms import Transform

T = TypeVar("T")

__all__ = [
    "EngineConfig", "FactorStore", "MemoryLimitWarning", "build_table", "plan_table", "sample_features", "projected_features", "pairwise_dots",
    "iter_factors", "factor_dots", "prepare",
]


class MemoryLimitWarning(UserWarning):
    """The plan's predicted peak is over ``memory_limit_gb``: what the process already holds and one capture batch
    need more, with nothing kept."""


@dataclass
class EngineConfig:
    """Knobs of the engine; defaults suit a 135M model on a laptop CPU."""

    batch_size: int = 8
    batch_tokens: int = 512  # padded tokens per capture batch (at least one sample): bounds activations
    max_length: int = 512
    memory_limit_gb: float = 3.5  # the process's budget: factors beyond what the model and one batch leave are spilled
    device: str = "cpu"
    # on an accelerator, kept factors stay in its memory up to this (None: half what is free when the run is
    # planned), so pairs need no copies from host RAM; the rest go to RAM and then disk as on the CPU
    device_memory_gb: float | None = None
    spill_dir: str | None = None
    max_spill_gb: float | None = None  # disk the factor store may fill; None: half the free space where it spills
    progress: bool = True
    mode: str = "auto"  # per-component dot method: 'auto' (cheaper flops), 'factored' or 'materialised'
    dot_order: str = "auto"  # 'stream' (sample by sample), 'gram' (component by component) or 'auto' (fewer flops)


@dataclass(frozen=True)
class _Spilled:
    """Where one spilled tensor lies in its sample's file."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    vector: bool  # a materialised vector rather than a factor tensor

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class FactorStore:
    """Sample factors by key: on ``device`` up to ``device_bytes``, in RAM up to ``limit_bytes`` in all (device
    included), and as one file per sample beyond it.

    Spilled factors are memory-mapped on each ``get`` and dropped after use, so the process
    holds at most the limit plus the factors in use, however many are spilled.
    The spill directory goes on close, at exit, or at the next run if this one is killed.
    """

    def __init__(self, limit_bytes: float, spill_dir: str | None = None, *,
                 device: str | torch.device | None = None, device_bytes: float = 0.0) -> None:
        self.limit = limit_bytes
        self.device = torch.device(device) if device is not None else None
        self.device_limit = device_bytes if self.device is not None else 0.0
        self.on_device = 0
        self.in_ram = 0
        self.spilled = 0
        self._items: dict[Any, SampleFactors] = {}
        self._files: dict[Any, tuple[SampleFactors, Path, dict[str, _Spilled]]] = {}
        self._sizes: dict[Any, int] = {}
        self._parent = spill_dir
        self._dir: SpillDir | None = None
        remove_stale(spill_dir)  # killed runs' directories go at the next start

    def put(self, key: Any, f: SampleFactors, spill: bool | None = None) -> None:
        """Store ``f`` on the device while its share lasts, else in RAM, or on disk when ``spill`` (None: when
        the limit is reached)."""
        if not spill and self.on_device + f.nbytes <= self.device_limit:
            self.on_device += f.nbytes
            self._items[key] = f.to(self.device).compact()
            return
        f = f.to("cpu")
        if not spill and (spill is False or self.on_device + self.in_ram + f.nbytes <= self.limit):
            self.in_ram += f.nbytes
            self._items[key] = f.compact()  # kept in memory: its batch's tensors must not stay alive with it
            return
        if self._dir is None:
            self._dir = SpillDir(self._parent)
        arrays = {k: t.numpy() for k, t in (*f.tensors.items(), *f.vectors.items())}
        path, offsets = self._dir.save(f"s{len(self._files)}", list(arrays.values()))
        where = {k: _Spilled(off, a.dtype, a.shape, k in f.vectors) for (k, a), off in zip(arrays.items(), offsets)}
        self.spilled += f.nbytes
        self._sizes[key] = f.nbytes
        self._files[key] = (SampleFactors(f.sample_id, {}, f.uses, {}), path, where)

    def get(self, key: Any, names: set[str] | None = None) -> SampleFactors:
        """The factors stored under ``key`` (spilled ones memory-mapped, read from the page cache without a
        copy); ``names``: only these tensor and vector keys, so a caller moving them to a device touches no more
        (the component order asks for one component's few of a sample's ~300 tensors, block after block)."""
        if key in self._items:
            f = self._items[key]
            if names is None:
                return f
            return SampleFactors(f.sample_id, {k: f.tensors[k] for k in names if k in f.tensors}, f.uses,
                                 {k: f.vectors[k] for k in names if k in f.vectors})
        shell, path, where = self._files[key]
        wanted = {k: w for k, w in where.items() if names is None or k in names}
        mapped = np.memmap(path, dtype=np.uint8, mode="c") if any(w.nbytes for w in wanted.values()) else None
        out = SampleFactors(shell.sample_id, {}, shell.uses, {})
        for k, w in wanted.items():
            array = mapped[w.offset: w.offset + w.nbytes].view(w.dtype) if w.nbytes else np.empty(0, w.dtype)
            (out.vectors if w.vector else out.tensors)[k] = torch.from_numpy(array.reshape(w.shape))
        return out

    def nbytes(self, key: Any) -> int:
        """Size of the factors stored under ``key``."""
        return self._items[key].nbytes if key in self._items else self._sizes[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._items or key in self._files

    def close(self) -> None:
        """Drop everything and delete spilled files."""
        self._items.clear()
        self._files.clear()
        self._sizes.clear()
        if self._dir is not None:
            self._dir.close()
            self._dir = None


@dataclass
class Prepared:
    """Model-side state shared by the public functions: selected components and capture hooks."""

    capture: GradientCapture
    specs: list[ComponentSpec]
    pad_id: int
    _tensors: list[FactorTensor] | None = None

    @property
    def tensors(self) -> list[FactorTensor]:
        """What the capture stores per sample (one no-gradient forward, the first time it is asked)."""
        if self._tensors is None:
            self._tensors = factor_tensors(self.capture)
        return self._tensors

    def widths(self, materialise: Sequence[str] = ()) -> FactorWidths:
        """The components' factor bytes per token, with ``materialise``'s held whole."""
        return factor_widths(self.capture, self.specs, materialise, self.tensors)


def _modes(prep: "Prepared", config: EngineConfig, lengths: Sequence[int], n_pairs: int) -> set[str]:
    if config.mode == "factored":
        return set()
    if config.mode == "materialised":
        return {s.name for s in prep.specs if s.kind == "factor"}
    if config.mode != "auto":
        raise ValueError(f"unknown engine mode {config.mode!r}: use auto, factored or materialised")
    return choose_modes(prep.specs, lengths, n_pairs, prep.tensors)


def prepare(model: torch.nn.Module, tokenizer: Any, components: Sequence[str] | None, scope: str = "paper") -> Prepared:
    """Catalogue (component set ``scope``) and select components, check the model can give gradients, build the capture."""
    require_trainable(model)
    try:
        comps = catalogue(model, check_scope(scope))
    except ValueError as exc:
        raise ModelError(f"model {model_name(model)}: {exc}") from None
    if components is not None:
        comps = select(comps, components)
    capture = GradientCapture(model, comps)
    return Prepared(capture, [capture.specs[c.name] for c in comps], pad_token_id(tokenizer))


def _batches(encoded: Sequence[Encoded], order: Sequence[int], config: EngineConfig) -> Iterator[list[int]]:
    """Indices in length-sorted batches (longest first, so memory peaks early) of at most
    ``batch_size`` samples and ``batch_tokens`` padded tokens."""
    ranked = sorted(order, key=lambda i: -len(encoded[i].input_ids))
    batch: list[int] = []
    for i in ranked:
        width = len(encoded[batch[0]].input_ids) if batch else len(encoded[i].input_ids)
        if batch and (len(batch) >= config.batch_size or (len(batch) + 1) * width > config.batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def capture_batches(prep: Prepared, tokenizer: Any, samples: Sequence[Sample], config: EngineConfig) -> list[Batch]:
    """``samples`` collated in the batches the engine captures them in (benchmarks time a plain pass on the same)."""
    encoded, _ = encode_samples(tokenizer, samples, config.max_length)
    return [collate([encoded[i] for i in idx], prep.pad_id, config.device)
            for idx in _batches(encoded, range(len(encoded)), config)]


def iter_factors(prep: Prepared, encoded: Sequence[Encoded], indices: Sequence[int], config: EngineConfig,
                 materialise: set[str] = frozenset(), label: str = "samples") -> Iterator[tuple[int, SampleFactors]]:
    """Factors of ``encoded[i]`` for each i in ``indices`` (each in memory of its own, safe to keep): one
    forward/backward per length-sorted batch."""
    for i, f in _capture(prep, encoded, list(_batches(encoded, indices, config)), config, materialise, label):
        own = f.compact()
        del f
        yield i, own
        del own


def _capture(prep: Prepared, encoded: Sequence[Encoded], batches: Sequence[Sequence[int]], config: EngineConfig,
             materialise: set[str] = frozenset(), label: str = "samples") -> Iterator[tuple[int, SampleFactors]]:
    """Factors of each sample of ``batches``, one forward/backward per batch, with progress on stderr.

    Each is a view of its batch's tensors: drop it (or keep its :meth:`~SampleFactors.compact` copy) before asking
    for the next, or the whole batch stays alive through the next capture."""
    done, total, t0 = 0, sum(map(len, batches)), time.perf_counter()
    label = distributed.prefix(label)
    dense = sorted(materialise)
    for idx in batches:
        batch = collate([encoded[i] for i in idx], prep.pad_id, config.device)
        factors, _ = prep.capture.run(batch)
        del batch
        factors.reverse()
        for i in idx:  # hand each sample's factors over and forget them: the batch's list holds none after use
            yield i, prep.capture.materialise(factors.pop(), dense)
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


class _Projector:
    """Each transform's output for one sample: its gradient materialised in parameter layout, then transformed.

    Holds one sample's gradient (the union of the transforms' components) at a time.
    """

    def __init__(self, specs: Sequence[ComponentSpec], transforms: Sequence[Transform]) -> None:
        by_name = {s.name: s for s in specs}
        for t in transforms:
            for c in t.components:
                if c.name not in by_name or by_name[c.name].component.num_params != c.num_params:
                    raise ValueError(f"transform {t.key} projects {c.name} ({c.num_params} parameters), "
                                     "which is not a component of this table")
        wanted = {c.name for t in transforms for c in t.components}
        self.specs = [s for s in specs if s.name in wanted]
        self.transforms = list(transforms)

    def __call__(self, f: SampleFactors) -> list[torch.Tensor]:
        grads = {s.name: to_param_layout(s, matrix_form(s, f))[None] for s in self.specs}
        return [t({c.name: grads[c.name] for c in t.components})[0].double().cpu() for t in self.transforms]


@dataclass
class _Plan:
    """What every rank derives alike from the inputs: samples, the table plan, capture units, dot modes.

    A unit is what a rank captures as one piece: one length-sorted batch of streamed samples that
    recompute nothing, or one query-centred group (a streamed sample and the partners it recomputes).
    Ranks deal whole units out, so every sample is captured in the same batch (and so with the same
    fp32 rounding) however many ranks run.
    """

    unique: list[Sample]
    encoded: list[Encoded]
    q_of: list[int]
    c_of: np.ndarray
    table: TablePlan
    kept_batches: list[list[int]]
    units: list[list[list[int]]]  # unit -> its groups -> [hub, recomputed partners...]
    partners: dict[int, list[int]]  # sample -> the kept samples it is paired with
    self_pairs: set[int]  # samples paired with themselves (a query that is also its candidate)
    materialise: set[str]

    @property
    def kept(self) -> set[int]:
        return set(self.table.kept)

    @property
    def first_unit(self) -> dict[int, int]:
        """Each streamed sample's first unit: its self dot is taken there (once, by one rank)."""
        first: dict[int, int] = {}
        for u, groups in enumerate(self.units):
            for g in groups:
                for i in g:
                    first.setdefault(i, u)
        return first

    def share(self, rank: int, world: int) -> tuple[list[int], list[int]]:
        """A rank's units (indices) and the kept samples whose kept-kept pairs it computes."""
        return list(range(len(self.units)))[rank::world], sorted(set(self.partners) & self.kept)[rank::world]

    def expected(self, rank: int, world: int) -> tuple[set[str], set[tuple[str, str]]]:
        """Sample ids and pairs a rank's shard holds (every rank computes the kept samples' self dots)."""
        units, kept_pairs = self.share(rank, world)
        first = self.first_unit
        ids_of = lambda i: self.unique[i].id  # noqa: E731
        mine = set(self.kept) | {i for u in units for g in self.units[u] for i in g if first[i] == u}
        pairs = {pair_key(ids_of(i), ids_of(j)) for i in kept_pairs for j in self.partners.get(i, ())}
        for u in units:
            for hub, *members in self.units[u]:
                pairs |= {pair_key(ids_of(hub), ids_of(j)) for j in [*self.partners.get(hub, ()), *members]}
        pairs |= {pair_key(ids_of(i), ids_of(i)) for i in self.self_pairs & mine}
        return {ids_of(i) for i in mine}, pairs


def _units(encoded: Sequence[Encoded], groups: Sequence[list[int]], config: EngineConfig) -> list[list[list[int]]]:
    """Singleton groups batched together by length (as every streamed sample was before recomputing
    existed); each larger group a unit of its own."""
    singles = {g[0] for g in groups if len(g) == 1}
    units = [[[i] for i in b] for b in _batches(encoded, sorted(singles), config)]
    return units + [[g] for g in groups if len(g) > 1]


def _spill_allowance(config: EngineConfig) -> float:
    """Bytes the store may write to disk: ``max_spill_gb`` if given, else half the free space where it spills."""
    if config.max_spill_gb is not None:
        if config.max_spill_gb < 0:
            raise ValueError(f"max_spill_gb must be at least 0, got {config.max_spill_gb}")
        return config.max_spill_gb * 2**30
    import shutil
    import tempfile

    # the store creates a missing spill directory: its disk is the nearest existing parent's
    where = Path(config.spill_dir or tempfile.gettempdir()).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free / 2
    except OSError:
        return 0.0


def _plan(prep: Prepared, tokenizer: Any, queries: Sequence[Sample], candidates: Sequence[Sample],
          candidate_index: np.ndarray, config: EngineConfig, world: int = 1) -> tuple[_Plan, int]:
    check_order(config.dot_order)
    unique, pos = _dedupe(list(queries) + list(candidates))
    encoded, n_truncated = encode_samples(tokenizer, unique, config.max_length)
    n_q, n_k = candidate_index.shape
    q_of = [pos[s.id] for s in queries]
    c_of = np.array([[pos[candidates[j].id] for j in row] for row in candidate_index], dtype=np.int64).reshape(n_q, n_k)
    used = sorted(set(q_of) | set(c_of.ravel().tolist()))
    lengths = [len(e.input_ids) for e in encoded]
    n_pairs = len(used) + int(c_of.size)
    materialise = _modes(prep, config, [lengths[i] for i in used], n_pairs)
    widths = prep.widths(sorted(materialise))
    budget = _store_budget(prep, config, widths.per_sample)
    allowance, on_device = _spill_allowance(config), _device_budget(config)
    if world > 1:  # every rank must make the same plan: plan all with the tightest rank's budget and disk
        budget, allowance, on_device = (min(v) for v in zip(*distributed.gather((budget, allowance, on_device))))
    table = plan_pairs(lengths, [e.n_targets for e in encoded], q_of, c_of, widths,
                       store_budget=budget, device_budget=on_device, spill_allowance=allowance,
                       resident_bytes=_resident_bytes(prep.capture.model), batch_tokens=config.batch_tokens)
    table.materialised = len(materialise)
    if world == 1:  # component by component runs in one process
        table = choose_order(table, prep.widths(), sum(s.rows * s.cols for s in prep.specs),
                             table.dot_flops(table.pair_weight(MEMORY_BOUND_WEIGHT)), config.dot_order)
    elif config.dot_order == "gram":
        raise ValueError("dot_order 'gram' runs in one process; use 'stream' or 'auto' under torch.distributed")
    if table.peak_bytes > config.memory_limit_gb * 2**30:
        note = (f"predicted peak {table.peak_bytes / 2**30:.2f} GiB is over the {config.memory_limit_gb:g} GB memory "
                "limit: the process and one capture batch need that much with nothing kept (raise the limit; a "
                "smaller EngineConfig.batch_tokens needs less)")
        table.notes.append(note)
        warnings.warn(note, MemoryLimitWarning, stacklevel=3)
    kept = set(table.kept)
    partners: dict[int, set[int]] = {}
    self_pairs = set()
    for q, row in zip(q_of, c_of):
        for c in map(int, row):
            if q == c:
                self_pairs.add(q)
            elif q in kept or c in kept:
                held, other = (q, c) if q in kept else (c, q)
                partners.setdefault(other, set()).add(held)
    plan = _Plan(unique, encoded, q_of, c_of, table, list(_batches(encoded, sorted(kept), config)),
                 _units(encoded, table.groups, config), {i: sorted(js) for i, js in partners.items()},
                 self_pairs, materialise)
    return plan, n_truncated


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def _resident_bytes(model: torch.nn.Module) -> int:
    """What the process holds now (Linux: its RSS, interpreter and libraries included), else the model's weights."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return sum(p.numel() * p.element_size() for p in model.parameters())


def _store_budget(prep: Prepared, config: EngineConfig, dense_bytes: int = 0) -> float:
    """Bytes of factors kept in RAM: ``memory_limit_gb`` less what the process holds already (the model),
    one capture batch, one sample's materialised gradients (``dense_bytes``) and the pair buffers, so the
    limit bounds the whole process.

    A batch of ``batch_tokens`` holds about two fp32 copies of its factors' widths per token (layer
    inputs and output gradients, then the factors taken from them; measured 2.1 MB a token on SmolLM2-135M)."""
    if config.memory_limit_gb < 0:
        raise ValueError(f"memory_limit_gb must be at least 0, got {config.memory_limit_gb}")
    per_token = 2 * 4 * sum(s.rows + s.cols for s in prep.specs if s.kind == "factor")
    held = _resident_bytes(prep.capture.model)
    return max(0.0, config.memory_limit_gb * 2**30 - held - config.batch_tokens * per_token - dense_bytes
               - 2 * PAIR_CHUNK_BYTES)


def _device_budget(config: EngineConfig) -> float:
    """Bytes of kept factors that stay on the accelerator (none on the CPU)."""
    device = torch.device(config.device)
    if config.device_memory_gb is not None and config.device_memory_gb < 0:
        raise ValueError(f"device_memory_gb must be at least 0, got {config.device_memory_gb}")
    if device.type == "cpu":
        return 0.0
    if config.device_memory_gb is not None:
        return config.device_memory_gb * 2**30
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2  # the other half: capture batches, Grams, other processes
    return 0.0


def _store(budget: float, device_budget: float, config: EngineConfig) -> FactorStore:
    return FactorStore(budget, config.spill_dir, device=config.device, device_bytes=device_budget)


def _chunks(keys: Sequence[int], store: FactorStore, limit: int) -> Iterator[list[int]]:
    """``keys`` in consecutive runs whose stored factors total at most ``limit`` bytes (at least one each)."""
    chunk: list[int] = []
    size = 0
    for k in keys:
        n = store.nbytes(k)
        if chunk and size + n > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(k)
        size += n
    if chunk:
        yield chunk


def _compute_shard(prep: Prepared, plan: _Plan, rank: int, world: int, config: EngineConfig,
                   projector: _Projector | None) -> TableShard:
    """This rank's share: every kept sample (all ranks need their factors), its dealt streamed units."""
    ids = [s.id for s in plan.unique]
    shard = TableShard(components=[s.name for s in prep.specs],
                       rp_keys=[t.key for t in projector.transforms] if projector else [])
    kept_projections: dict[int, list[torch.Tensor] | None] = {}
    store = _store(plan.table.store_budget, plan.table.device_budget, config)
    in_ram = set(plan.table.kept[: plan.table.ram_kept])
    my_units, kept_pairs = plan.share(rank, world)
    first = plan.first_unit
    kept_label, streamed_label = ("queries", "candidates") if plan.table.kept_queries else ("candidates", "queries")
    t_capture = t_dots = t_project = t_store = 0.0  # storing (spilling) is part of the dots' time
    captured = 0

    def project(f: SampleFactors) -> list[torch.Tensor] | None:
        nonlocal t_project
        if projector is None:
            return None
        t = time.perf_counter()
        out = projector(f)
        t_project += time.perf_counter() - t
        return out

    def put(key: tuple[str, str], row: np.ndarray, a: list[torch.Tensor] | None, b: list[torch.Tensor] | None) -> None:
        shard.cross[key] = row
        if a is not None:
            shard.rp[key] = np.array([_cosine(x, y) for x, y in zip(a, b)])

    def record_self(i: int, row: np.ndarray, projected: list[torch.Tensor] | None) -> None:
        shard.self_dots[ids[i]] = row
        if i in plan.self_pairs:
            put(pair_key(ids[i], ids[i]), row, projected, projected)

    def self_dot(i: int, f: SampleFactors, projected: list[torch.Tensor] | None) -> None:
        record_self(i, factor_dots(f, [f], prep.specs)[0], projected)

    def pairs(i: int, f: SampleFactors, projected: list[torch.Tensor] | None, with_self: bool = False) -> None:
        """``i``'s dots with its kept partners, a few at a time (spilled ones are read back), and with itself
        in the first call when ``with_self`` (its Grams and sums then go with the partners')."""
        chunks = list(_chunks(plan.partners.get(i, []), store, PAIR_CHUNK_BYTES)) or [[]]
        for n, chunk in enumerate(chunks):
            own = [f] if with_self and n == 0 else []
            rows = factor_dots(f, own + [store.get(j).to(config.device) for j in chunk], prep.specs)
            if own:
                record_self(i, rows[0], projected)
            for j, row in zip(chunk, rows[len(own):]):
                put(pair_key(ids[i], ids[j]), row, projected, kept_projections.get(j))

    def group(u: int, members: list[int], got: dict[int, SampleFactors]) -> None:
        hub, rest = members[0], members[1:]
        projected = {i: project(got[i]) for i in members} if projector else dict.fromkeys(members)
        for i in rest:
            if first[i] == u:
                self_dot(i, got[i], projected[i])
        pairs(hub, got[hub], projected[hub], with_self=first[hub] == u)
        if rest:  # recomputed partners: dots from the group's own factors
            for j, row in zip(rest, factor_dots(got[hub], [got[j] for j in rest], prep.specs)):
                put(pair_key(ids[hub], ids[j]), row, projected[hub], projected[j])

    def settle(i: int, f: SampleFactors, waiting: dict[tuple[int, int], dict[int, SampleFactors]]) -> None:
        """``i`` left waiting for a later capture keeps a copy of its own, not its batch's tensors."""
        left = [got for got in waiting.values() if got.get(i) is f]
        if left:
            own = f.compact()
            for got in left:
                got[i] = own

    try:
        t1 = time.perf_counter()
        for i, f in _capture(prep, plan.encoded, plan.kept_batches, config, plan.materialise, kept_label):
            t2 = time.perf_counter()
            t_capture += t2 - t1
            captured += 1
            kept_projections[i] = project(f)
            self_dot(i, f, kept_projections[i])
            t3 = time.perf_counter()
            store.put(i, f, spill=i not in in_ram)
            del f
            t1 = time.perf_counter()
            t_store += t1 - t3
            t_dots += t1 - t2
        for i in kept_pairs:  # pairs whose members are both kept
            pairs(i, store.get(i).to(config.device), kept_projections[i])
        t2 = time.perf_counter()
        t_dots += t2 - t1
        t1 = t2
        # every unit's batches in one capture (one progress count); each capture is known by its unit
        batches, unit_of = [], []
        for u in my_units:
            for b in _batches(plan.encoded, sorted({i for g in plan.units[u] for i in g}), config):
                batches.append(b)
                unit_of += [u] * len(b)
        waiting: dict[tuple[int, int], dict[int, SampleFactors]] = {}  # (unit, group) -> factors arrived
        captures = _capture(prep, plan.encoded, batches, config, plan.materialise, streamed_label)
        n = 0  # not enumerate(): its reused result tuple would hold the last sample through the next capture
        for i, f in captures:  # to the end: the generator reports progress after each batch
            u = unit_of[n]
            n += 1
            t2 = time.perf_counter()
            t_capture += t2 - t1
            captured += 1
            f = f.to(config.device)
            for g, members in enumerate(plan.units[u]):
                if i in members:
                    waiting.setdefault((u, g), {})[i] = f
                    if len(waiting[u, g]) == len(members):
                        group(u, members, waiting.pop((u, g)))
            settle(i, f, waiting)
            del f
            t1 = time.perf_counter()
            t_dots += t1 - t2
        spilled = store.spilled
    finally:
        store.close()
    shard.meta = {"rank": rank, "world": world, "spilled_bytes": int(spilled),
                  "captures": captured,
                  "timings": {"capture_s": t_capture, "dots_s": t_dots - t_project, "store_s": t_store,
                              "project_s": t_project}}
    return shard


def _squared_norms(block: torch.Tensor, cols: int) -> np.ndarray:
    """Each sample's and layer's squared norm (``block``: [samples, layers, numbers]): fp32 norms of ``cols``-long
    pieces, summed in float64.  One fp32 reduction over a component's million coordinates erred by 3.2e-4
    (SmolLM2's layer 11 down_proj, measured); a float64 reduction of the whole block took 17x as long."""
    pieces = torch.linalg.vector_norm(block.view(*block.shape[:2], -1, cols), dim=3)
    return pieces.double().square().sum(dim=2).cpu().numpy()


def _gram_blocks(specs: Sequence[ComponentSpec], shell: SampleFactors, n: int) -> list[tuple[list[int], int, int]]:
    """The component order's blocks, each at most GRAM_BLOCK_BYTES for ``n`` samples: (components, first row,
    row after last), components of one stack several layers at once where whole ones fit, else rows of one."""
    groups: dict[tuple, list[int]] = {}
    for c, spec in enumerate(specs):
        groups.setdefault(stack_key(spec, shell), []).append(c)
    out = []
    for members in groups.values():
        spec = specs[members[0]]
        per_layer = 4 * spec.rows * spec.cols * n
        if per_layer <= GRAM_BLOCK_BYTES:
            step = GRAM_BLOCK_BYTES // per_layer
            out += [(members[k: k + step], 0, spec.rows) for k in range(0, len(members), step)]
            continue
        rows = max(1, GRAM_BLOCK_BYTES // (4 * spec.cols * n))
        out += [([c], start, min(spec.rows, start + rows)) for c in members for start in range(0, spec.rows, rows)]
    return out


def _gram_shard(prep: Prepared, plan: _Plan, config: EngineConfig, projector: _Projector | None) -> TableShard:
    """Component by component: every sample's factors stored once (RAM, then spill), then each component's
    gradients of all samples materialised a block of rows at a time and their Gram taken in one product.

    Cheaper than sample by sample when samples have many partners (every original a candidate):
    each gradient is materialised once and a pair costs one multiply-add per parameter.
    """
    ids = [s.id for s in plan.unique]
    shard = TableShard(components=[s.name for s in prep.specs],
                       rp_keys=[t.key for t in projector.transforms] if projector else [])
    side_a = sorted(set(plan.q_of))
    side_b = sorted(set(plan.c_of.ravel().tolist()))
    used = side_a + sorted(set(side_b) - set(side_a))  # queries first: each side a slice of a block, not a copy
    row = {i: k for k, i in enumerate(used)}
    n_a = len(side_a)
    b_rows = None if not set(side_a) & set(side_b) else torch.tensor([row[i] for i in side_b], device=config.device)
    cross = np.zeros((len(side_a), len(side_b), len(prep.specs)))
    norms = np.zeros((len(used), len(prep.specs)))
    projected: dict[int, list[torch.Tensor] | None] = {}
    store = _store(plan.table.store_budget, plan.table.device_budget, config)
    in_ram = set(plan.table.kept[: plan.table.ram_kept])
    t_capture = t_dots = t_project = t_store = 0.0
    try:
        t1 = time.perf_counter()
        for i, f in _capture(prep, plan.encoded, list(_batches(plan.encoded, used, config)), config, set(), "samples"):
            t2 = time.perf_counter()
            t_capture += t2 - t1
            if projector is not None:
                projected[i] = projector(f)
                t_project += time.perf_counter() - t2
            t3 = time.perf_counter()
            # the plan's RAM share by its predicted sizes, the rest spilled: within the allowance it was chosen for
            store.put(i, f, spill=i not in in_ram)  # storing (spilling) counts as dot time, as in the stream order
            del f
            t1 = time.perf_counter()
            t_store += t1 - t3
            t_dots += t1 - t2
        t_dots -= t_project
        shells = {i: store.get(i, set()) for i in used}  # each sample's uses, no tensor or vector read
        blocks = _gram_blocks(prep.specs, shells[used[0]], len(used))
        # one block's storage for every block: allocated afresh, each of ~240 blocks was page-faulted in again
        storage = torch.empty(len(used) * max(len(m) * (stop - start) * prep.specs[m[0]].cols
                                              for m, start, stop in blocks), device=config.device)
        for members, start, stop in blocks:  # components of one stack a few layers at a time, or rows of one
            specs = [prep.specs[c] for c in members]
            block = storage[: len(used) * len(members) * (stop - start) * specs[0].cols].view(len(used), len(members), -1)
            keys = set().union(*(factor_keys(spec, shells[used[0]]) for spec in specs))
            for k, i in enumerate(used):  # the store holds factors on the CPU: materialise on the device
                stacked_rows(specs, store.get(i, keys).to(config.device), start, stop, out=block[k])
            b = block[n_a:] if b_rows is None else block[b_rows]
            products = torch.bmm(block[:n_a].transpose(0, 1), b.permute(1, 2, 0))  # [layers, A, B]
            cross[:, :, members] += products.double().cpu().numpy().transpose(1, 2, 0)
            norms[:, members] += _squared_norms(block, specs[0].cols)
        t_dots += time.perf_counter() - t1
        spilled = store.spilled
    finally:
        store.close()
    a_pos = {i: k for k, i in enumerate(side_a)}
    b_pos = {i: k for k, i in enumerate(side_b)}
    for k, i in enumerate(used):
        shard.self_dots[ids[i]] = norms[k]
    for q, cands in zip(plan.q_of, plan.c_of):
        for c in map(int, cands):
            key = pair_key(ids[q], ids[c])
            shard.cross[key] = norms[row[q]] if q == c else cross[a_pos[q], b_pos[c]]
            if projector is not None:
                shard.rp[key] = np.array([_cosine(x, y) for x, y in zip(projected[q], projected[c])])
    shard.meta = {"rank": 0, "world": 1, "spilled_bytes": int(spilled), "captures": len(used),
                  "timings": {"capture_s": t_capture, "dots_s": t_dots, "store_s": t_store, "project_s": t_project}}
    return shard


def build_table(
    model: torch.nn.Module,
    tokenizer: Any,
    queries: Sequence[Sample],
    candidates: Sequence[Sample],
    candidate_index: np.ndarray,
    original: np.ndarray,
    *,
    components: Sequence[str] | None = None,
    scope: str = "paper",
    transforms: Sequence[Transform] = (),
    config: EngineConfig | None = None,
    across_ranks: bool = False,
    shard_path: Callable[[int, int], Path] | None = None,
) -> ComponentTable:
    """Component table for ``queries`` x their candidates ``candidates[candidate_index[q, k]]``.

    ``original``: [Q] column of each query's original, or [Q, K] bool.  ``components`` names
    columns from the component set ``scope`` (``"paper"``: embedding and weight matrices;
    ``"all"``: norms and biases too); None keeps the whole set.  Each distinct sample
    is forward/backward'ed once; the smaller side's factors are kept, the other streams past.
    ``transforms`` (built on this model's catalogue, their components columns of the table, e.g. a
    random projection's :class:`~selproj_plugin.projection.CountSketch`): ``rp_similarity[r]`` holds
    the cosine of ``transforms[r]``'s outputs for every pair, stored under ``rp_keys[r] = key``.

    ``across_ranks``: the torch.distributed ranks deal out the single-process batches of the
    streamed side (each also captures the kept side, whose factors its pairs need) and every
    rank returns the whole table, equal to one process's bit for bit at equal threads per
    process in the same order: ranks stream, while one process left to choose (``dot_order``
    'auto') may go component by component, the same dots summed in another order.  A rank
    then saves its share to ``shard_path(rank, world)`` when given, and reuses a shard file
    already there.
    """
    rank, world = distributed.rank_world() if across_ranks else (0, 1)
    shard_file = Path(shard_path(rank, world)) if shard_path is not None and world > 1 else None
    config = config or EngineConfig()
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

    prep = prepare(model, tokenizer, components, scope)
    projector = _Projector(prep.specs, transforms) if transforms else None
    plan, n_truncated = _plan(prep, tokenizer, queries, candidates, candidate_index, config, world)
    encode_s = time.perf_counter() - t0
    names = [s.name for s in prep.specs]
    if shard_file is not None and shard_file.is_file():
        shard = TableShard.load(shard_file)
        shard.check(shard_file, names, *plan.expected(rank, world), [t.key for t in transforms])
    elif plan.table.dot_order == "gram":
        shard = _gram_shard(prep, plan, config, projector)
    else:
        shard = _compute_shard(prep, plan, rank, world, config, projector)
        if shard_file is not None:
            shard.save(shard_file)
    merged = TableShard.merge(distributed.gather(shard))

    ids = [s.id for s in plan.unique]
    keys = [[pair_key(ids[q], ids[int(c)]) for c in row] for q, row in zip(plan.q_of, plan.c_of)]
    def self_dots(rows: np.ndarray) -> np.ndarray:
        return np.array([merged.self_dots[ids[i]] for i in rows.ravel()]).reshape(*rows.shape, len(names))

    rp_dims = rp_sim = rp_keys = None
    if transforms:
        rp_dims = np.array([t.dim for t in transforms], dtype=np.int64)
        rp_keys = np.array([t.key for t in transforms])
        rp_sim = np.array([[merged.rp[k] for k in row] for row in keys]).reshape(n_q, n_k, len(transforms))
        rp_sim = np.ascontiguousarray(rp_sim.transpose(2, 0, 1))
    timings = {"encode_s": encode_s, **shard.meta["timings"], "total_s": time.perf_counter() - t0}
    comps = [s.component for s in prep.specs]
    meta = {
        "model": model_name(model), "truncated": n_truncated,
        "truncated_ids": sorted(e.sample_id for e in plan.encoded if e.truncated), "max_length": config.max_length,
        "distinct_samples": int(np.count_nonzero(plan.table.passes)), "batch_size": config.batch_size,
        "captures": int(shard.meta.get("captures", 0)) if world == 1 else
        len(plan.kept) + sum(m.get("captures", len(plan.kept)) - len(plan.kept) for m in merged.meta["shards"]),
        "plan": plan.table.summary(),
        "materialised_components": len(plan.materialise), "mode": config.mode,
        "spilled_bytes": shard.meta["spilled_bytes"], "timings": timings,
        "engine": "selproj factor engine", "world_size": world, "component_set": scope,
        "param_names": {c.name: list(c.param_names) for c in comps},
    }
    if world > 1:
        meta["ranks"] = merged.meta["shards"]
    return ComponentTable(
        cross=np.array([[merged.cross[k] for k in row] for row in keys]).reshape(n_q, n_k, len(names)),
        query_self=self_dots(np.asarray(plan.q_of, dtype=np.int64)), candidate_self=self_dots(plan.c_of),
        is_original=is_original, components=np.array([c.name for c in comps]),
        num_params=np.array([c.num_params for c in comps], dtype=np.int64),
        query_ids=np.array([s.id for s in queries]),
        candidate_ids=np.array([[candidates[j].id for j in row] for row in candidate_index]).reshape(n_q, n_k),
        rp_dims=rp_dims, rp_similarity=rp_sim, rp_keys=rp_keys, meta=meta,
    )


def plan_table(model: torch.nn.Module, tokenizer: Any, queries: Sequence[Sample], candidates: Sequence[Sample],
               candidate_index: np.ndarray, *, components: Sequence[str] | None = None, scope: str = "paper",
               config: EngineConfig | None = None, across_ranks: bool = False) -> TablePlan:
    """What :func:`build_table` will do with these arguments (kept, spilled and recomputed samples, passes,
    predicted peak memory, FLOPs), decided without computing a gradient."""
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, components, scope)
    candidate_index = np.asarray(candidate_index, dtype=np.int64).reshape(len(queries), -1)
    world = distributed.rank_world()[1] if across_ranks else 1
    return _plan(prep, tokenizer, queries, candidates, candidate_index, config, world)[0].table


def _mine(items: list[T], across_ranks: bool) -> list[T]:
    """The items (batches) this rank computes: all of them, or its round-robin deal under torch.distributed."""
    rank, world = distributed.rank_world() if across_ranks else (0, 1)
    return items[rank::world]


def _gathered(rows: dict[int, Any], across_ranks: bool) -> dict[int, Any]:
    """Every rank's rows, on every rank (the rows themselves outside a process group)."""
    if not across_ranks:
        return rows
    merged: dict[int, Any] = {}
    for part in distributed.gather(rows):
        merged.update(part)
    return merged


def sample_features(model: torch.nn.Module, tokenizer: Any, samples: Sequence[Sample],
                    components: Sequence[str] | None = None, config: EngineConfig | None = None,
                    *, scope: str = "paper", across_ranks: bool = False) -> dict[str, torch.Tensor]:
    """Materialised per-sample gradients ``{component: [N, num_params]}`` in parameter layout.

    Layout matches concatenating ``p.grad.flatten()`` over the component's ``param_names``.
    Memory is N x (selected parameters): select components for large models.  With
    ``across_ranks`` the torch.distributed ranks share the batches and all return every row.
    """
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, components, scope)
    encoded, _ = encode_samples(tokenizer, samples, config.max_length)
    batches = _mine(list(_batches(encoded, range(len(samples)), config)), across_ranks)
    out = {s.name: torch.zeros(len(samples), s.component.num_params) for s in prep.specs}
    done = []
    for i, f in _capture(prep, encoded, batches, config, label="features"):
        for s in prep.specs:
            out[s.name][i] = to_param_layout(s, matrix_form(s, f)).cpu()
        done.append(i)
        del f
    if across_ranks:
        for i, row in _gathered({i: {name: t[i] for name, t in out.items()} for i in done}, True).items():
            for name, t in out.items():
                t[i] = row[name]
    return out


def projected_features(model: torch.nn.Module, tokenizer: Any, samples: Sequence[Sample], transform: Transform,
                       config: EngineConfig | None = None, *, scope: str = "paper",
                       across_ranks: bool = False) -> torch.Tensor:
    """``transform``'s output for each sample, ``[N, transform.dim]`` float64: what ``build_table`` takes cosines of.

    ``transform`` is built on this model's catalogue (component set ``scope``), e.g. a
    :class:`~selproj_plugin.projection.CountSketch`.  One sample's gradient is materialised at
    a time.  ``across_ranks``: as in :func:`sample_features`.
    """
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, [c.name for c in transform.components], scope)
    projector = _Projector(prep.specs, [transform])
    encoded, _ = encode_samples(tokenizer, samples, config.max_length)
    batches = _mine(list(_batches(encoded, range(len(samples)), config)), across_ranks)
    mine = {}
    for i, f in _capture(prep, encoded, batches, config, label="projection"):
        mine[i] = projector(f)[0]
        del f
    rows = _gathered(mine, across_ranks)
    out = torch.zeros(len(samples), transform.dim, dtype=torch.float64)
    for i, row in rows.items():
        out[i] = row
    return out


def pairwise_dots(model: torch.nn.Module, tokenizer: Any, samples_a: Sequence[Sample], samples_b: Sequence[Sample],
                  components: Sequence[str] | None = None, config: EngineConfig | None = None,
                  *, scope: str = "paper", across_ranks: bool = False) -> np.ndarray:
    """Every ``<g_c(a), g_c(b)>``: [A, B, C] float64 (``samples_a`` factors stored, ``samples_b`` streamed).

    A's factors are kept in RAM up to the memory limit and on disk up to the spill allowance; when they do not
    all fit, A is taken in passes of whole capture batches and B streams past each pass.
    With ``across_ranks`` every torch.distributed rank stores A and streams its deal of B's batches.
    """
    config = config or EngineConfig()
    prep = prepare(model, tokenizer, components, scope)
    unique, pos = _dedupe(list(samples_a) + list(samples_b))
    encoded, _ = encode_samples(tokenizer, unique, config.max_length)
    a_of = [pos[s.id] for s in samples_a]
    b_of = [pos[s.id] for s in samples_b]
    stored = sorted(set(a_of))
    b_set = sorted(set(b_of))
    lengths = [len(encoded[i].input_ids) for i in sorted(set(stored) | set(b_set))]
    materialise = _modes(prep, config, lengths, len(stored) * len(b_set))
    widths = prep.widths(sorted(materialise))
    on_device = _device_budget(config)
    budget = _store_budget(prep, config, widths.per_sample) + on_device
    allowance = _spill_allowance(config)
    if across_ranks:  # every rank must make the same passes: the tightest rank's budget and disk
        budget, allowance = (min(v) for v in zip(*distributed.gather((budget, allowance))))
    size = {i: widths.sample_bytes(len(encoded[i].input_ids), encoded[i].n_targets) for i in stored}
    col = {i: n for n, i in enumerate(stored)}
    dots: dict[int, np.ndarray] = {}
    for batches, in_ram in _passes(list(_batches(encoded, stored, config)), size, budget, allowance):
        members = [i for b in batches for i in b]
        store = _store(budget, on_device, config)
        try:
            for i, f in _capture(prep, encoded, batches, config, materialise, "set A"):
                store.put(i, f, spill=i not in in_ram)
                del f
            def against_a(b: int, f: SampleFactors) -> None:  # A in chunks: factors read back stay small
                f = f.to(config.device)
                row = dots.setdefault(b, np.zeros((len(stored), len(prep.specs))))
                for chunk in _chunks(members, store, PAIR_CHUNK_BYTES):
                    row[[col[a] for a in chunk]] = factor_dots(f, [store.get(a).to(config.device) for a in chunk],
                                                               prep.specs)

            for b in _mine(sorted(set(b_set) & set(members)), across_ranks):
                against_a(b, store.get(b))
            streamed = sorted(set(b_set) - set(members))
            for b, f in _capture(prep, encoded, _mine(list(_batches(encoded, streamed, config)), across_ranks), config,
                                 materialise, "set B"):
                against_a(b, f)
                del f
        finally:
            store.close()
    dots = _gathered(dots, across_ranks)
    return np.stack([np.stack([dots[b][col[a]] for b in b_of]) for a in a_of])


def _passes(batches: list[list[int]], size: dict[int, int], budget: float,
            allowance: float) -> Iterator[tuple[list[list[int]], set[int]]]:
    """Whole batches in passes whose predicted factors fit ``budget`` in RAM and ``allowance`` on disk, each
    with the samples it keeps in RAM (at least one batch a pass: one that fits neither is held in RAM)."""
    def fit(batch: list[int], room: float) -> tuple[set[int], float, float]:
        held, ram = set(), 0.0
        for i in batch:
            if ram + size[i] <= room:
                held.add(i)
                ram += size[i]
        return held, ram, sum(size[i] for i in batch) - ram

    taken: list[list[int]] = []
    ram: set[int] = set()
    used = spilled = 0.0
    for batch in batches:
        held, held_bytes, disk = fit(batch, budget - used)
        if taken and spilled + disk > allowance:
            yield taken, ram
            taken, ram, used, spilled = [], set(), 0.0, 0.0
            held, held_bytes, disk = fit(batch, budget)
        if spilled + disk > allowance:  # alone in its pass and still too large for the disk: held in RAM
            held, held_bytes, disk = set(batch), float(sum(size[i] for i in batch)), 0.0
        taken.append(batch)
        ram |= held
        used, spilled = used + held_bytes, spilled + disk
    if taken:
        yield taken, ram
