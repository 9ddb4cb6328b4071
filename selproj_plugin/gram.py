"""Per-component gradient dot products between samples, from captured factors.

For a factor pair ``g = L^T R`` the dot product of two samples is
``sum((L_i L_j^T) * (R_i R_j^T))``: two thin Gram matrices instead of two full
gradients.  When sequences are long relative to a layer's width it is cheaper to
materialise ``g`` once per sample and take plain dot products; :func:`choose_modes`
picks per component by estimated flops.  Products are summed in float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch

from selproj_plugin.capture import ComponentSpec, FactorUse, SampleFactors, layers

if TYPE_CHECKING:
    from selproj_plugin.planner import FactorTensor

# A materialised dot reads two full vectors from memory; weigh its flops as this many matmul flops.
# Measured side by side on the 2-core CPU (docs/engine.md): a dot of SmolLM2-135M's whole gradient costs
# 45-49 matmul flops' time a parameter; a lower weight made the full set materialise everything, 2x slower.
MEMORY_BOUND_WEIGHT = 45.0
# A materialised gradient also takes 2-3x the memory of its factors at typical lengths, so
# materialise only where it saves at least this share of the flops.
MATERIALISE_MARGIN = 0.5
# Components linked by shared tensors are decided jointly up to this many (every subset is tried).
MAX_JOINT = 10
# A materialised pair dot sums fp32 products in pieces of this many, the pieces in float64.
DOT_BLOCK = 4096


def choose_modes(specs: Iterable[ComponentSpec], lengths: Sequence[int], n_pairs: int, tensors: Sequence[FactorTensor]) -> set[str]:
    """Names of factor components cheaper to materialise than to keep factored.

    ``lengths``: token counts of the distinct samples; ``n_pairs``: number of dot products the caller
    will take (self pairs included); ``tensors``: what the capture stores (:func:`factor_tensors`).
    Factored costs ~n_i n_j per stored number of a row per pair, and a tensor shared by several
    components (the input of q/k/v, of gate/up) is multiplied once for all of them; materialised costs
    n rows cols per sample plus rows cols per pair, and is chosen only when clearly cheaper (it holds
    rows x cols numbers per kept sample instead of n (rows + cols)).  Components linked by a shared
    tensor are decided together, so k and v stay factored where q's input Gram is taken anyway.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    if lengths.size == 0 or n_pairs == 0:
        return set()
    per_number = n_pairs * float(np.mean(lengths)) ** 2  # Gram cost of one stored number per row
    dense = {
        s.name: (float(np.sum(lengths)) + n_pairs * MEMORY_BOUND_WEIGHT) * s.rows * s.cols / MATERIALISE_MARGIN
        for s in specs
        if s.kind == "factor" and s.layout != "bias_only" and s.rows * s.cols <= 64_000_000
    }
    links = [t for t in tensors if t.users & dense.keys()]

    def cost(group: frozenset[str], dense_part: frozenset[str]) -> float:
        """The group's materialised components plus every tensor a factored user still needs."""
        paid = sum(t.width for t in links if t.users & group and t.users - dense_part)
        return sum(dense[c] for c in dense_part) + per_number * paid

    out: set[str] = set()
    for group in _linked(dense.keys(), links):
        members = sorted(group)
        if len(members) <= MAX_JOINT:
            choices = (frozenset(m for b, m in enumerate(members) if mask >> b & 1) for mask in range(2 ** len(members)))
            out |= min(choices, key=lambda d: cost(group, d))
        else:  # too many to try every subset: each alone, its shared tensors paid by the others
            out |= {c for c in members if cost(frozenset({c}), frozenset({c})) < cost(frozenset({c}), frozenset())}
    return out


def _linked(names: Iterable[str], tensors: Sequence[FactorTensor]) -> list[frozenset[str]]:
    """``names`` in groups connected through tensors they share."""
    group_of = {n: frozenset({n}) for n in names}
    for t in tensors:
        merged = frozenset().union(*(group_of[n] for n in t.users if n in group_of))
        for n in merged:
            group_of[n] = merged
    return sorted(set(group_of.values()), key=sorted)


def _gram_t(a: torch.Tensor | None, a_index: bool, bs: Sequence[torch.Tensor] | None, b_index: bool, n_a: int, n_b: int) -> torch.Tensor:
    """``B A^T`` ([n_b, n_a], float32) with B the rows of ``bs`` one after another, each block written in place
    (no concatenated copy of the partners); dense rows or one-hot rows given as ids."""
    device = a.device if a is not None else bs[0].device if bs else "cpu"
    if a is None or bs is None:
        return torch.zeros(n_b, n_a, device=device)
    if len(bs) == 1 and not (a_index or b_index):
        return bs[0] @ a.T
    out = torch.empty(n_b, n_a, device=device)
    start = 0
    for b in bs:
        block = out[start : start + b.shape[0]]
        start += b.shape[0]
        if a_index and b_index:
            torch.eq(b[:, None], a[None, :], out=block)
        elif a_index:
            torch.index_select(b, 1, a, out=block)
        elif b_index:
            block.copy_(a[:, b].T)
        else:
            torch.mm(b, a.T, out=block)
    return out


# A stacked Gram (layers x partners' rows x rows) is taken a few layers at a time beyond this many bytes: a pair
# block's Grams, their product and the shared inputs' cached Gram stay a few of these.
GRAM_STACK_BYTES = 64 * 2**20


def factor_dots(fi: SampleFactors, fjs: Sequence[SampleFactors], specs: Sequence[ComponentSpec]) -> np.ndarray:
    """Dot products ``<g_c(i), g_c(j)>`` for every j in ``fjs`` and component c: [J, C] float64.

    Components whose factors lie at the same places of the same stacks (the 30 layers' q projections) are taken
    together: one batched Gram per factor for all of them and all partners, so the number of operations depends
    on neither the layers nor the partners."""
    if not fjs:
        return np.zeros((0, len(specs)), dtype=np.float64)
    device = _device(fi)
    totals = torch.zeros(len(specs), len(fjs), dtype=torch.float64, device=device)
    groups: dict[tuple, list[int]] = {}
    dense: dict[int, list[int]] = {}  # materialised components by size
    for c, spec in enumerate(specs):
        if spec.name in fi.vectors:
            dense.setdefault(fi.vectors[spec.name].numel(), []).append(c)
        else:
            groups.setdefault(_signature(fi.uses[spec.name]) + _signature(fjs[0].uses[spec.name]), []).append(c)
    done, order = [], []
    for size, members in dense.items():  # a few layers at a time, partners' copies within GRAM_STACK_BYTES
        step = max(1, GRAM_STACK_BYTES // (4 * size * len(fjs)))
        for start in range(0, len(members), step):
            block = [specs[c].name for c in members[start : start + step]]
            a = torch.stack([fi.vectors[n] for n in block])
            b = torch.stack([f.vectors[n] for f in fjs for n in block]).view(len(fjs), len(block), -1)
            done.append(_dense_dots(a, b).T)
            order += members[start : start + step]
    blocks = []  # a group's components a few layers at a time: its Grams stay within GRAM_STACK_BYTES
    for members in groups.values():
        us, vs = fi.uses[specs[members[0]].name], fjs[0].uses[specs[members[0]].name]
        rows_i = max([fi.rows(u.left) for u in us], default=0)
        rows_j = max([sum(f.rows(v.left) for f in fjs) for v in vs], default=0)
        step = max(1, GRAM_STACK_BYTES // max(1, 4 * rows_i * rows_j))
        blocks += [members[start : start + step] for start in range(0, len(members), step)]
    # a Gram is shared by blocks that read the same factors at the same places (q/k/v's input): count, free after last
    pending: dict[tuple, int] = {}
    for block in blocks:
        for left, right in _use_pairs(fi, fjs, specs, block):
            for key in (left, right):
                pending[key] = pending.get(key, 0) + 1
    grams: dict[tuple, torch.Tensor | None] = {}

    def gram(key: tuple) -> torch.Tensor | None:
        if key not in grams:
            grams[key] = _stacked_gram(fi, fjs, *key)
        g = grams[key]
        pending[key] -= 1
        if pending[key] == 0:
            del grams[key]
        return g

    owners: dict[tuple[int, ...], torch.Tensor] = {}

    def owner(key: str) -> torch.Tensor:  # which partner each row of a Gram belongs to
        rows = tuple(f.rows(key) for f in fjs)
        if rows not in owners:
            owners[rows] = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows)).to(device)
        return owners[rows]

    for block in blocks:
        us, vs = fi.uses[specs[block[0]].name], fjs[0].uses[specs[block[0]].name]
        out = torch.zeros(len(block), len(fjs), dtype=torch.float64, device=device)
        for (u, v), (left, right) in zip([(u, v) for u in us for v in vs], _use_pairs(fi, fjs, specs, block)):
            part = _use_pair(u, v, gram(left), gram(right))
            if part is not None:
                out.index_add_(1, owner(v.left), part)
        done.append(out)
        order += block
    if done:
        totals.index_copy_(0, torch.tensor(order, device=device), torch.cat(done) if len(done) > 1 else done[0])
    return np.ascontiguousarray(totals.T.cpu().numpy())


def _use_pairs(
    fi: SampleFactors, fjs: Sequence[SampleFactors], specs: Sequence[ComponentSpec], block: list[int]
) -> list[tuple[tuple, tuple]]:
    """The Gram keys (left, right) of every pair of uses of a block's components, in uses' order."""
    us = [fi.uses[specs[c].name] for c in block]
    vs = [fjs[0].uses[specs[c].name] for c in block]
    keys = []
    for a, u in enumerate(us[0]):
        for b, v in enumerate(vs[0]):
            left = (u.left, v.left, u.left_index, v.left_index, _ats(us, a, "left"), _ats(vs, b, "left"))
            right = (u.right, v.right, False, False, _ats(us, a, "right"), _ats(vs, b, "right"))
            keys.append((left, right))
    return keys


def _signature(uses: Sequence[FactorUse]) -> tuple:
    """What components must share to be taken together: the same factors' keys and kinds, any layer."""
    return tuple((u.left, u.right, u.left_index, u.aug, u.left_at is None, u.right_at is None) for u in uses)


def _ats(uses: Sequence[Sequence[FactorUse]], n: int, side: str) -> tuple[int, ...] | None:
    """The block's layers of its components' ``n``-th use's ``side`` factor (None: not a stack)."""
    ats = tuple(getattr(u[n], f"{side}_at") for u in uses)
    return None if ats[0] is None else ats


def _stacked_gram(
    fi: SampleFactors,
    fjs: Sequence[SampleFactors],
    ki: str | None,
    kj: str | None,
    i_index: bool,
    j_index: bool,
    ats_i: tuple[int, ...] | None,
    ats_j: tuple[int, ...] | None,
) -> torch.Tensor | None:
    """``B A^T`` per layer, ``[layers, partners' rows, fi's rows]`` float32, with B the partners' rows one after
    another; token ids stand for one-hot rows."""
    if ki is None or kj is None:
        return None
    a = fi.tensors[ki]
    bs = [f.tensors[kj] for f in fjs]
    if i_index or j_index:  # an embedding, one component: its other use may be a stack's one layer (a tied head)
        a = a if ats_i is None else a[ats_i[0]]
        bs = bs if ats_j is None else [b[ats_j[0]] for b in bs]
        n_b = sum(b.shape[0] for b in bs)
        return _gram_t(a, i_index, bs, j_index, a.shape[0], n_b).unsqueeze(0)
    a = layers(a, ats_i or (None,))
    b = layers(bs[0], ats_j or (None,)) if len(bs) == 1 else torch.cat([layers(x, ats_j or (None,)) for x in bs], dim=1)
    return torch.bmm(b, a.transpose(1, 2))


def _dense_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a_l, b_jl>`` of materialised gradients (``a``: [layers, P], ``b``: [partners, layers, P]): [partners,
    layers] float64, fp32 dots of DOT_BLOCK-long pieces summed in float64.

    As exact as rounding each product once and summing in float64 (a piece's fp32 sum errs ~1e-6 of the
    pair's norms), and 6x as fast on a 134M-long pair (0.08 s against 0.49 s on the 2-core CPU)."""
    n = a.shape[-1]
    whole = n - n % DOT_BLOCK
    pieces = torch.einsum("lkd,jlkd->jlk", a[:, :whole].view(a.shape[0], -1, DOT_BLOCK), b[:, :, :whole].view(*b.shape[:2], -1, DOT_BLOCK))
    total = pieces.sum(dim=2, dtype=torch.float64)
    return total + (a[:, whole:] * b[:, :, whole:]).sum(dim=2, dtype=torch.float64) if whole < n else total


def _use_pair(u: FactorUse, v: FactorUse, gl: torch.Tensor, gr: torch.Tensor | None) -> torch.Tensor | None:
    """Per layer and partner row, the sums over fi's rows of (L_i L_j^T + aug) * (R_i R_j^T + aug) for one pair of
    uses: ``[layers, partners' rows]`` float64 (None: no coordinates in common).

    The product of the two fp32 Grams is rounded once per entry and summed in float64.
    """
    if gl.shape[1] == 0 or gl.shape[2] == 0:
        return None
    both_right = u.aug == "right" and v.aug == "right"
    if gr is None and not both_right:
        return None  # a bias-only use against a weight use: no coordinates in common
    if u.aug == "left" and v.aug == "left":
        gl = gl + 1.0
    if both_right:  # the ones columns: a missing right factor is all ones
        gr = None if gr is None else gr + 1.0
    product = gl if gr is None else gl * gr
    return product.sum(dim=2, dtype=torch.float64)


def _device(f: SampleFactors) -> torch.device:
    for t in f.tensors.values():
        return t.device
    for t in f.vectors.values():
        return t.device
    return torch.device("cpu")


def self_dots(f: SampleFactors, specs: Sequence[ComponentSpec]) -> np.ndarray:
    """Squared norms ``<g_c(i), g_c(i)>`` per component: [C] float64."""
    return factor_dots(f, [f], specs)[0]
