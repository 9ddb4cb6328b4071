"""Plan a component table before any gradient: which samples' factors to keep, which to recompute, at what cost.

The pairs a table needs form a graph (each query with its candidates).  The engine keeps the
factors of one side, most reused first, in RAM up to its budget and on disk up to a bounded
spill allowance; every pair with a kept member is taken when the other member streams past.
A sample of the kept side that fits neither is recomputed: each streamed sample is captured
together with its partners that are not kept (the query-centred batch), their dots taken from
the group's own factors, nothing kept, so memory stays that of one group at any model size.

:func:`factor_widths` reads a model's per-token factor sizes from one forward pass with no
gradient (a ``meta``-device model built from a config works, so a 1B model can be planned
without its weights); :func:`plan_pairs` decides, :func:`choose_order` picks the dot order and
:func:`plan_samples` does both for the engine's samples and settings; :class:`TablePlan` (the one plan type)
predicts, describes, and tells each rank its share.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from selproj_plugin import distributed
from selproj_plugin.batching import batches, units
from selproj_plugin.budget import (
    GRAM_BLOCK_BYTES,
    PAIR_CHUNK_BYTES,
    device_budget,
    resident_bytes,
    sized,
    spill_allowance,
    store_budget,
)
from selproj_plugin.capture import ComponentSpec, GradientCapture
from selproj_plugin.engine_config import DOT_ORDERS, EngineConfig, MemoryLimitWarning
from selproj_plugin.gram import MEMORY_BOUND_WEIGHT
from selproj_plugin.loss import Encoded, encode_samples
from selproj_plugin.samples import Sample, dedupe
from selproj_plugin.shards import pair_key

if TYPE_CHECKING:
    from selproj_plugin.prepared import Prepared
    from selproj_plugin.projector import Projector

GiB = 2**30
# What one capture batch holds per padded token, as a multiple of its factor bytes per token: the
# layer inputs and output gradients of the batch, then the factors copied out of them (measured
# about 2.1 MB a token on SmolLM2-135M; the same allowance the engine subtracts from its budget).
BATCH_COPIES = 2
# Component by component stores every sample's factors (the stream order only one side's), so it is
# chosen only where it saves at least a tenth of the estimated work.
GRAM_MARGIN = 0.9
# Calibrated on SmolLM2-135M on the 2-core CPU (docs/engine.md): materialising every component of every
# stored sample (block by block, factors read back) runs at about half the rate of a Gram of factors.
GRAM_MATERIALISE_WEIGHT = 2.0
# A materialised pair dot whose partner was spilled reads the partner's whole gradient back: 52 flops'
# time per parameter from the page cache, measured beside MEMORY_BOUND_WEIGHT's 45 in memory.
SPILLED_PAIR_WEIGHT = 52.0


@dataclass(frozen=True)
class FactorWidths:
    """Bytes of one sample's gradient factors: per input token, per trained token (the LM head), fixed."""

    per_token: int
    per_target: int
    per_sample: int
    matmul_params: int  # weights a token's forward and (input-)backward pass multiply through
    captured_per_token: int | None = None  # every factor a batch captures, materialised components' too

    def sample_bytes(self, tokens: int, targets: int) -> int:
        return tokens * self.per_token + targets * self.per_target + self.per_sample

    @property
    def batch_bytes_per_token(self) -> int:
        """What a capture batch holds per padded token (the engine's allowance): its factors are all captured
        before a sample's components are materialised."""
        captured = self.per_token + self.per_target if self.captured_per_token is None else self.captured_per_token
        return BATCH_COPIES * captured


@dataclass(frozen=True)
class FactorTensor:
    """One tensor the capture stores per sample: its row layout, bytes per row, the components using it."""

    layout: str  # 'tokens' (a row per input token) or 'targets' (a row per trained token: the LM head)
    row_bytes: int
    users: frozenset[str]
    index: bool = False  # token ids standing for one-hot rows: their Grams are comparisons, not products

    @property
    def width(self) -> int:
        """Numbers per row a Gram of this tensor multiplies through (none for token ids)."""
        return 0 if self.index else self.row_bytes // 4


def factor_tensors(capture: GradientCapture) -> list[FactorTensor]:
    """The tensors ``capture`` stores per sample, from one no-gradient forward on 2 tokens.

    Inputs shared by several modules (q/k/v, gate/up) are one tensor with several users, as the capture
    stores them; components without factors (norms) have none.
    """
    model = capture.model
    device = next(model.parameters()).device
    tensors: dict[Any, list] = {}  # key -> [layout, bytes per row, component names using it, index]
    held = []  # inputs stay referenced during the forward, so no later tensor takes their id

    def hook_for(h):
        users = {c.name for c in h.params.values()}

        def add(key, layout, nbytes, index=False):
            entry = tensors.setdefault(key, [layout, nbytes, set(), index])
            entry[2] |= users

        def hook(module, args, kwargs, output):
            if h.kind == "func":
                return
            x = args[0] if args else next(iter(kwargs.values()))
            out = output[0] if isinstance(output, (tuple, list)) else output
            held.append(x)
            add((h.name, "in"), h.layout, 8, True) if h.kind == "embedding" else add(id(x), h.layout, 4 * x.shape[-1])
            add((h.name, "out"), h.layout, 4 * out.shape[-1])

        return hook

    handles = [h.module.register_forward_hook(hook_for(h), with_kwargs=True) for h in capture.handlers]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return [FactorTensor(layout, nbytes, frozenset(users), index) for layout, nbytes, users, index in tensors.values()]


def factor_widths(
    capture: GradientCapture, specs: Sequence[ComponentSpec], materialise: Sequence[str] = (), tensors: Sequence[FactorTensor] | None = None
) -> FactorWidths:
    """Per-token factor bytes of ``capture``'s components (``tensors``: :func:`factor_tensors`, traced if not given).

    A shared input is stored once; token ids count 8 bytes; components without factors (norms) and the
    ``materialise`` ones hold their whole gradient, and a factor only they use is dropped.
    """
    model = capture.model
    dense = set(materialise)
    per = {"tokens": 0, "targets": 0}
    captured = 0
    for t in factor_tensors(capture) if tensors is None else tensors:
        captured += t.row_bytes
        if not t.users <= dense:
            per[t.layout] += t.row_bytes
    fixed = sum(4 * s.component.num_params for s in specs if s.kind == "func")
    fixed += sum(4 * s.rows * s.cols for s in specs if s.kind == "factor" and s.name in dense)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return FactorWidths(per["tokens"], per["targets"], fixed, matmul + (head.weight.numel() if head is not None else 0), captured)


@dataclass
class TablePlan:
    """What the engine will do for one table, decided before any gradient: samples, groups, memory, cost."""

    lengths: list[int]
    targets: list[int]
    sample_bytes: list[int]
    kept: list[int]  # kept side's samples whose factors are stored, most reused first
    ram_kept: int  # how many of ``kept`` (the first ones) fit the RAM budget; the rest spill
    groups: list[list[int]]  # streamed samples, each with its recomputed partners (hub first)
    passes: np.ndarray  # captures per distinct sample
    pair_list: list[tuple[int, int]]
    kept_queries: bool
    store_budget: float
    spill_allowance: float
    resident_bytes: int
    batch_tokens: int
    widths: FactorWidths
    batch_why: str = ""  # how ``batch_tokens`` was chosen
    batch_size: int = 0  # samples a capture batch may hold (EngineConfig.batch_size, or the device default)
    materialise: frozenset[str] = frozenset()  # components captured as whole gradients rather than factors
    on_device: bool = False  # capture batches and groups live in accelerator memory, kept factors in host RAM
    device_budget: float = 0.0  # of ``store_budget``: kept factors held in accelerator memory, not host RAM
    dot_order: str = "stream"  # 'stream': sample by sample past the kept side; 'gram': component by component
    dense_params: int = 0  # the components' parameters: what the component order materialises and multiplies
    sides: tuple[int, int] = (0, 0)  # distinct queries, distinct candidates
    projection_bytes: int = 0  # what the transforms hold while a sample is projected (projector.Projector.held_bytes)
    notes: list[str] = field(default_factory=list)
    # The samples behind the indices, and what every rank derives alike from them (:func:`plan_samples`).  A unit
    # is what a rank captures as one piece: one length-sorted batch of streamed samples that recompute nothing, or
    # one query-centred group (a streamed sample and the partners it recomputes).  Ranks deal whole units out, so
    # every sample is captured in the same batch (and so with the same fp32 rounding) however many ranks run.
    q_of: list[int] = field(default_factory=list)  # each query's sample
    c_of: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))  # each query's candidates'
    samples: list[Sample] = field(default_factory=list)
    encoded: list[Encoded] = field(default_factory=list)
    kept_batches: list[list[int]] = field(default_factory=list)
    units: list[list[list[int]]] = field(default_factory=list)  # unit -> its groups -> [hub, recomputed partners...]
    partners: dict[int, list[int]] = field(default_factory=dict)  # sample -> the kept samples it is paired with
    self_pairs: set[int] = field(default_factory=set)  # samples paired with themselves (a query that is its candidate)

    @property
    def pairs(self) -> int:
        return len(self.pair_list)

    @property
    def materialised(self) -> int:
        return len(self.materialise)

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
        return list(range(len(self.units)))[rank::world], sorted(set(self.partners) & set(self.kept))[rank::world]

    def expected(self, rank: int, world: int) -> tuple[set[str], set[tuple[str, str]]]:
        """Sample ids and pairs a rank's shard holds (every rank computes the kept samples' self dots)."""
        units, kept_pairs = self.share(rank, world)
        first = self.first_unit
        ids_of = lambda i: self.samples[i].id  # noqa: E731
        mine = set(self.kept) | {i for u in units for g in self.units[u] for i in g if first[i] == u}
        pairs = {pair_key(ids_of(i), ids_of(j)) for i in kept_pairs for j in self.partners.get(i, ())}
        for u in units:
            for hub, *members in self.units[u]:
                pairs |= {pair_key(ids_of(hub), ids_of(j)) for j in [*self.partners.get(hub, ()), *members]}
        pairs |= {pair_key(ids_of(i), ids_of(i)) for i in self.self_pairs & mine}
        return {ids_of(i) for i in mine}, pairs

    @property
    def recomputed(self) -> int:
        return int(self.passes.sum() - np.count_nonzero(self.passes))

    @property
    def ram_bytes(self) -> int:
        return int(sum(self.sample_bytes[i] for i in self.kept[: self.ram_kept]))

    @property
    def device_kept_bytes(self) -> int:
        """Kept factors in accelerator memory: the store fills it first, so the kept bytes up to its budget."""
        return int(min(self.ram_bytes, self.device_budget))

    @property
    def spill_bytes(self) -> int:
        return int(sum(self.sample_bytes[i] for i in self.kept[self.ram_kept :]))

    @property
    def batch_bytes(self) -> int:
        """A capture batch's factors, and one sample's whole gradients while they are materialised."""
        longest = max(self.lengths, default=0)
        return max(self.batch_tokens, longest) * self.widths.batch_bytes_per_token + self.widths.per_sample

    @property
    def group_bytes(self) -> int:
        """Factors a streamed group holds while its pairs are taken."""
        return max((sum(self.sample_bytes[i] for i in g) for g in self.groups), default=0)

    @property
    def pair_buffer_bytes(self) -> int:
        return min(PAIR_CHUNK_BYTES, max((self.sample_bytes[i] for i in self.kept), default=0) * 2)

    @property
    def gram_block_bytes(self) -> int:
        """What the component order holds once captures are done: one block of every sample's rows, and a copy of
        the candidates' rows when some samples are on both sides (their products take them in another order)."""
        used = int(np.count_nonzero(self.passes))
        q, c = self.sides
        return int(GRAM_BLOCK_BYTES * (1 + (c / used if used and q + c > used else 0)))

    @property
    def peak_bytes(self) -> int:
        """Predicted peak resident memory: what the process held at planning, kept factors in RAM, then the
        largest of what the order holds at once.  Streaming: a capture batch or a group's factors, and a sample
        being projected or the pair buffers.  Component by component: a capture batch while a sample is projected,
        or (captures done) one block of every sample's rows and its two sides; it reads back no pair buffers."""
        working = 0 if self.on_device else max(self.batch_bytes, self.group_bytes)
        if self.dot_order == "gram":
            working = max(working + self.projection_bytes, self.gram_block_bytes)
        else:
            working += max(self.projection_bytes, 2 * self.pair_buffer_bytes)  # a sample is projected, then paired
        return int(self.resident_bytes + self.ram_bytes - self.device_kept_bytes + working)

    def device_bytes(self, model_bytes: int) -> int:
        """Predicted accelerator memory: the weights, kept factors held there, the larger of a capture batch and
        a group, pair buffers."""
        return int(model_bytes + self.device_kept_bytes + max(self.batch_bytes, self.group_bytes) + 2 * self.pair_buffer_bytes)

    def capture_flops(self) -> float:
        """Forward plus input-gradient backward (weights frozen): 4 multiply-adds' flops per weight per token."""
        return float(4 * self.widths.matmul_params * float(np.dot(self.passes, self.lengths)))

    def dot_flops(self, pair_weight: float = 1.0) -> float:
        """Gram products of every pair and self pair (factors: n_i n_j per stored width, shared inputs once;
        materialised components: n rows cols per capture, rows cols per pair, weighted by ``pair_weight``:
        one pair's dot of two stored gradients reads them from memory, unlike a matrix product; pass
        :meth:`pair_weight` for the stream order's estimate).  In the component order, :meth:`gram_flops`."""
        if self.dot_order == "gram":
            return self.gram_flops(materialise_weight=1.0)
        n = np.asarray(self.lengths, dtype=np.float64)
        t = np.asarray(self.targets, dtype=np.float64)
        w_tok, w_tgt, dense = self.widths.per_token / 4, self.widths.per_target / 4, self.widths.per_sample / 4
        used = [int(i) for i in np.flatnonzero(self.passes)]
        a = np.array([i for i, _ in self.pair_list] + used, dtype=np.int64)
        b = np.array([j for _, j in self.pair_list] + used, dtype=np.int64)
        factored = 2 * float(np.sum(n[a] * n[b] * w_tok + t[a] * t[b] * w_tgt))
        return factored + 2 * dense * (float(np.dot(self.passes, n)) + pair_weight * len(a))

    def pair_weight(self, in_memory: float) -> float:
        """Cost per parameter of a materialised pair dot, in flops' time: ``in_memory`` for partners in RAM,
        :data:`SPILLED_PAIR_WEIGHT` for the share of kept bytes read back from disk."""
        kept = self.ram_bytes + self.spill_bytes
        spilled = self.spill_bytes / kept if kept else 0.0
        return in_memory + spilled * (SPILLED_PAIR_WEIGHT - in_memory)

    def gram_flops(self, materialise_weight: float = GRAM_MATERIALISE_WEIGHT) -> float:
        """Component by component: every sample's gradient materialised once (a multiply-add per parameter and
        token, weighed by ``materialise_weight``: 1 counts flops, the default estimates time), one multiply-add
        per parameter for each query-candidate product and squared norm."""
        n = float(np.dot(self.passes > 0, self.lengths))
        q, c = self.sides
        return 2.0 * self.dense_params * (materialise_weight * n + q * c + int(np.count_nonzero(self.passes)))

    def in_gram_order(self, widths: FactorWidths, dense_params: int) -> "TablePlan":
        """This plan with every sample captured once and its factors (``widths``: none materialised) stored,
        RAM then spill: the component-major order over ``dense_params`` parameters."""
        used = [i for i in range(len(self.lengths)) if self.passes[i]]
        sample_bytes = [widths.sample_bytes(n, t) for n, t in zip(self.lengths, self.targets)]
        ram, ram_kept = 0, 0
        for i in used:
            if ram + sample_bytes[i] > self.store_budget:
                break
            ram += sample_bytes[i]
            ram_kept += 1
        return dataclasses.replace(
            self,
            kept=used,
            ram_kept=ram_kept,
            groups=[],
            widths=widths,
            sample_bytes=sample_bytes,
            materialise=frozenset(),
            passes=(np.asarray(self.passes) > 0).astype(np.int64),
            dot_order="gram",
            dense_params=int(dense_params),
            notes=[n for n in self.notes if "recomputed" not in n],
        )

    def summary(self) -> dict[str, Any]:
        used = np.asarray(self.passes) > 0  # samples given but paired with nothing are not captured
        return {
            "samples": int(used.sum()),
            "pairs": self.pairs,
            "kept_side": "queries" if self.kept_queries else "candidates",
            "kept": len(self.kept),
            "kept_in_ram": self.ram_kept,
            "kept_spilled": len(self.kept) - self.ram_kept,
            "dot_order": self.dot_order,
            "streamed_groups": len(self.groups),
            "captures": int(self.passes.sum()),
            "recomputed": self.recomputed,
            "passes_per_sample_max": int(self.passes.max(initial=0)),
            "passes_per_sample_mean": float(self.passes[used].mean()) if used.any() else 0.0,
            "mean_tokens": float(np.asarray(self.lengths)[used].mean()) if used.any() else 0.0,
            "factor_bytes_total": int(sum(self.sample_bytes)),
            "kept_ram_bytes": self.ram_bytes - self.device_kept_bytes,
            "kept_device_bytes": self.device_kept_bytes,
            "spill_bytes": self.spill_bytes,
            "store_budget_bytes": int(self.store_budget),
            "spill_allowance_bytes": int(self.spill_allowance),
            "resident_bytes": self.resident_bytes,
            "batch_tokens": self.batch_tokens,
            "batch_tokens_why": self.batch_why,
            "batch_bytes": self.batch_bytes,
            "group_bytes": self.group_bytes,
            "projection_bytes": self.projection_bytes,
            "predicted_peak_bytes": self.peak_bytes,
            "capture_flops": self.capture_flops(),
            "dot_flops": self.dot_flops(),
            "materialised_components": self.materialised,
            "notes": list(self.notes),
        }

    def describe(self) -> str:
        s = self.summary()
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        mode = (
            "store all, then dots component by component"
            if self.dot_order == "gram"
            else "keep all"
            if not self.recomputed
            else f"keep {s['kept']} most reused, recompute the rest in query-centred groups"
        )
        lines = [
            f"plan: {s['samples']} distinct samples ({s['mean_tokens']:.0f} tokens mean), {s['pairs']} pairs; "
            f"keep the {s['kept_side']}' factors ({mode})",
            f"  kept: {s['kept_in_ram']} in "
            + (
                f"memory ({g(s['kept_device_bytes'])} on the device, {g(s['kept_ram_bytes'])} in RAM"
                if self.device_budget
                else f"RAM ({g(s['kept_ram_bytes'])}"
            )
            + f" of a {g(s['store_budget_bytes'])} budget), "
            f"{s['kept_spilled']} spilled ({g(s['spill_bytes'])} of a {g(s['spill_allowance_bytes'])} allowance)",
            f"  passes: {s['captures']} captures for {s['samples']} samples ({s['recomputed']} recomputed; at most "
            f"{s['passes_per_sample_max']} per sample), in batches of up to {self.batch_tokens:,} padded tokens"
            + (f" ({self.batch_why})" if self.batch_why else ""),
            f"  flops: capture {s['capture_flops'] / 1e12:.1f} TFLOP, dots {s['dot_flops'] / 1e12:.1f} TFLOP "
            + (
                f"(every sample's {self.dense_params:,} parameters materialised once, pairs by matrix products)"
                if self.dot_order == "gram"
                else f"({s['materialised_components']} components materialised)"
            ),
            f"  predicted peak {'host ' if self.on_device else ''}memory: {g(s['predicted_peak_bytes'])} (resident "
            f"{g(s['resident_bytes'])} + kept {g(s['kept_ram_bytes'])}"
            + ("" if self.on_device else f" + batch/group {g(max(s['batch_bytes'], s['group_bytes']))}")
            + (f" + projections {g(self.projection_bytes)}" if self.projection_bytes else "")
            + (" or a block of rows)" if self.dot_order == "gram" else " + pair buffers)"),
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def plan_pairs(
    lengths: Sequence[int],
    targets: Sequence[int],
    q_of: Sequence[int],
    c_of: np.ndarray,
    widths: FactorWidths,
    *,
    store_budget: float,
    spill_allowance: float,
    resident_bytes: int,
    batch_tokens: int,
    device_budget: float = 0.0,
) -> TablePlan:
    """Decide which side's factors are kept, which kept-side samples are stored (most reused first,
    in memory, then spilled) and which are recomputed with each streamed partner.

    ``store_budget``: host RAM for kept factors; ``device_budget``: accelerator memory for them besides."""
    store_budget += device_budget  # the store fills the device first, then RAM: one budget for keeping
    sample_bytes = [widths.sample_bytes(n, t) for n, t in zip(lengths, targets)]
    q_set, c_set = set(q_of), set(int(c) for c in np.asarray(c_of).ravel())
    kept_queries = len(q_set) <= len(c_set)
    side = q_set if kept_queries else c_set
    adjacency: dict[int, set[int]] = {}
    pair_set: set[tuple[int, int]] = set()
    for q, row in zip(q_of, np.asarray(c_of)):
        for c in map(int, row):
            if q == c:
                continue
            pair_set.add((min(q, c), max(q, c)))
            adjacency.setdefault(q, set()).add(c)
            adjacency.setdefault(c, set()).add(q)
    # most reused first (ties: index), then fill the RAM budget and the spill allowance in that order
    order = sorted(side, key=lambda i: (-len(adjacency.get(i, ())), i))
    kept: list[int] = []
    ram = spill = 0.0
    ram_kept = 0
    for i in order:
        b = sample_bytes[i]
        if ram_kept == len(kept) and ram + b <= store_budget:
            ram += b
            ram_kept += 1
        elif spill + b <= spill_allowance:
            spill += b
        else:
            continue
        kept.append(i)
    kept_set = set(kept)
    # a pair with no kept member is taken in the group of its streamed member (the lower index when both
    # are on the kept side); a sample is captured once per group it is in, its kept pairs in its own
    hubs: dict[int, list[int]] = {}
    for a, b in sorted(pair_set):
        if a in kept_set or b in kept_set:
            continue
        hub, member = (b, a) if (a in side and b not in side) else (a, b)
        hubs.setdefault(hub, []).append(member)
    member_of = {m for ms in hubs.values() for m in ms}
    with_kept = {s for s in adjacency if adjacency[s] & kept_set}
    groups = [
        [s] + sorted(hubs.get(s, ())) for s in sorted((q_set | c_set) - kept_set) if s in hubs or s in with_kept or s not in member_of
    ]
    passes = np.zeros(len(lengths), dtype=np.int64)
    for i in kept:
        passes[i] += 1
    for grp in groups:
        passes[grp] += 1
    rest = side - kept_set
    notes = []
    if rest:
        notes.append(
            f"{len(rest)} of {len(side)} kept-side samples exceed RAM budget and spill allowance: recomputed with each streamed partner"
        )
    return TablePlan(
        list(lengths),
        list(targets),
        sample_bytes,
        kept,
        ram_kept,
        groups,
        passes,
        sorted(pair_set),
        kept_queries,
        store_budget,
        spill_allowance,
        resident_bytes,
        batch_tokens,
        widths,
        notes=notes,
        device_budget=device_budget,
        sides=(len(q_set), len(c_set)),
        q_of=list(q_of),
        c_of=np.asarray(c_of, dtype=np.int64),
    )


def check_order(order: str) -> str:
    """``order`` if it names a dot order, else a one-line ValueError."""
    if order not in DOT_ORDERS:
        raise ValueError(f"unknown dot order {order!r}: use {', '.join(DOT_ORDERS)}")
    return order


def choose_order(plan: TablePlan, widths: FactorWidths, dense_params: int, stream_dot_flops: float, order: str = "auto") -> TablePlan:
    """The plan in the dot order with fewer FLOPs (capture included): component by component needs every
    sample's factors (``widths``) stored within RAM budget and spill allowance; ``order`` 'stream' or 'gram'
    forces one, except that a forced 'gram' that does not fit streams (with a note): the disk bound holds."""
    check_order(order)
    gram = plan.in_gram_order(widths, dense_params)
    fits = gram.ram_bytes + gram.spill_bytes <= plan.store_budget + plan.spill_allowance
    cheaper = gram.capture_flops() + gram.gram_flops() < GRAM_MARGIN * (plan.capture_flops() + stream_dot_flops)
    if fits and (order == "gram" or (order == "auto" and cheaper)):
        return gram
    if order == "gram":
        plan.notes.append(
            f"dot order 'gram' needs every sample's factors ({(gram.ram_bytes + gram.spill_bytes) / GiB:.2f}"
            f" GiB) within RAM budget and spill allowance ({(plan.store_budget + plan.spill_allowance) / GiB:.2f}"
            " GiB): streaming instead"
        )
    return plan


def plan_samples(
    prep: "Prepared",
    tokenizer: Any,
    queries: Sequence[Sample],
    candidates: Sequence[Sample],
    candidate_index: np.ndarray,
    config: EngineConfig,
    world: int = 1,
    projector: "Projector | None" = None,
) -> tuple[TablePlan, int]:
    """The plan of a table of ``queries`` x ``candidates[candidate_index]`` under ``config`` (the budgets of the
    tightest of ``world`` ranks), with the samples it was made for, and how many samples were truncated.  Its
    ``batch_tokens`` are what ``config`` asks for or, left to the engine, what the device allows.
    ``projector``: the table's transforms, whose working memory comes out of the kept factors' budget (their code
    caches are given their share of it here)."""
    check_order(config.dot_order)
    config, batch_why = sized(prep, config, world)
    unique, pos = dedupe(list(queries) + list(candidates))
    encoded, n_truncated = encode_samples(tokenizer, unique, config.max_length)
    n_q, n_k = candidate_index.shape
    q_of = [pos[s.id] for s in queries]
    c_of = np.array([[pos[candidates[j].id] for j in row] for row in candidate_index], dtype=np.int64).reshape(n_q, n_k)
    used = sorted(set(q_of) | set(c_of.ravel().tolist()))
    lengths = [len(e.input_ids) for e in encoded]
    n_pairs = len(used) + int(c_of.size)
    materialise = prep.modes(config, [lengths[i] for i in used], n_pairs)
    widths = prep.widths(sorted(materialise))
    if projector is not None:  # what projecting a sample holds, code caches first left empty, then given a share
        projector.share_codes(0)
    budget = store_budget(prep, config, widths.per_sample + (projector.held_bytes() if projector else 0))
    if projector is not None:
        budget -= projector.share_codes(budget)
    allowance, on_device = spill_allowance(config), device_budget(config)
    if world > 1:  # every rank must make the same plan: plan all with the tightest rank's budget and disk
        budget, allowance, on_device = (min(v) for v in zip(*distributed.gather((budget, allowance, on_device))))
    table = plan_pairs(
        lengths,
        [e.n_targets for e in encoded],
        q_of,
        c_of,
        widths,
        store_budget=budget,
        device_budget=on_device,
        spill_allowance=allowance,
        resident_bytes=resident_bytes(prep.capture.model),
        batch_tokens=config.batch_tokens,
    )
    table.materialise, table.batch_why, table.batch_size = frozenset(materialise), batch_why, config.batch_size
    table.on_device = torch.device(config.device).type != "cpu"
    table.projection_bytes = projector.held_bytes() if projector is not None else 0
    if world == 1:  # component by component runs in one process
        table = choose_order(
            table,
            prep.widths(),
            sum(s.rows * s.cols for s in prep.specs),
            table.dot_flops(table.pair_weight(MEMORY_BOUND_WEIGHT)),
            config.dot_order,
        )
    elif config.dot_order == "gram":
        raise ValueError("dot_order 'gram' runs in one process; use 'stream' or 'auto' under torch.distributed")
    if table.peak_bytes > config.memory_limit_gb * 2**30:
        note = (
            f"predicted peak {table.peak_bytes / 2**30:.2f} GiB is over the {config.memory_limit_gb:g} GB memory "
            "limit: the process and one capture batch need that much with nothing kept (raise the limit; a "
            "smaller EngineConfig.batch_tokens needs less)"
        )
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
    table.samples, table.encoded = unique, encoded
    table.kept_batches = list(batches(encoded, sorted(kept), config))
    table.units = units(encoded, table.groups, config)
    table.partners = {i: sorted(js) for i, js in partners.items()}
    table.self_pairs = self_pairs
    return table, n_truncated
