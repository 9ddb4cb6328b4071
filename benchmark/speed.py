"""Speed benchmark: the factor engine vs the paper's per-pair loop, and random projection's distortion.

``python -m benchmark.speed --json OUT.json`` builds the component table for 64 paraphrased
queries x 5 BM25 candidates (originals) on SmolLM2-135M-Instruct twice: with the engine,
and with the paper's procedure (batch size 1, full parameter gradients of the query and
each of its candidates, per-component dot products) on a subset of queries, extrapolated
per query.  Each method runs in its own subprocess so its peak RSS (VmHWM) is its own.
The engine's table also stores ``random_projection`` at each ``--proj-dim`` (projection time
is reported apart).  A third worker projects the gradients of ``--proj-queries`` paraphrases
and their originals with ``random_projection`` (``--proj-seeds`` seeds) and the paper's
``random_projection_per_component``, and measures the mean absolute distortion of every
pair's dot product (as a fraction of |a||b|) against what a dense Gaussian JL projection
gives at the same dimension, computed from the exact norms and dots:
``E|err| = sqrt(2/pi) sqrt((|a|^2|b|^2 + <a,b>^2) / dim)``; their ratio is
``distortion_vs_dense_jl`` (with a bootstrap interval over samples).  It also times TRAK's
``BasicProjector`` on a slice of the same gradients, extrapolated linearly in gradient length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmark import settings_cli
from benchmark.peak import peak_rss_bytes
from benchmark.pipeline import PipelineOptions
from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.progress import bar as progress_bar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MAX_LENGTH = EngineConfig.max_length  # tokens a sample keeps, in the loop as in the engine


def _peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB."""
    return peak_rss_bytes() / 2**20


def _peak_gpu_mb(device: str) -> float | None:
    """Peak CUDA memory allocated by this process (None off CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if str(device).startswith("cuda") else None


def _setup(args: argparse.Namespace, own_pool: bool = False):
    """Queries (paraphrases), candidate pool (originals: every record's, or with ``own_pool`` the queries' own),
    each query's candidates and the column of its original."""
    from benchmark.candidates import bm25_topk
    from benchmark.data import load_records

    records = load_records(args.dataset)
    queries = [r.paraphrase for r in records[: args.queries]]
    if args.fullset:  # every original a candidate of every query
        pool = [r.original for r in records[: args.queries]]
        return queries, pool, np.tile(np.arange(len(pool)), (len(queries), 1)), np.arange(len(queries))
    pool = [r.original for r in (records[: args.queries] if own_pool else records)]
    index = bm25_topk(
        [q.prompt + " " + q.response for q in queries], [p.prompt + " " + p.response for p in pool], args.k, force=list(range(len(queries)))
    )
    original = np.array([int(np.flatnonzero(row == q)[0]) for q, row in enumerate(index)])
    return queries, pool, index, original


def _projections(model, text: str, seed: int, strategy: str = "random_projection") -> dict:
    """``{dim text: transform}`` of ``strategy`` at each of ``--proj-dim``, built on the model's catalogue."""
    from selproj_plugin.components import catalogue
    from selproj_plugin.registry import get_strategy
    from selproj_plugin.strategies.base import reduction

    comps = catalogue(model)
    return {d: reduction(get_strategy(strategy, dim=d, seed=seed), comps).transform for d in _dims(text)}


def _dims(text: str) -> list[str]:
    return [d.strip() for d in text.split(",") if d.strip()]


def worker_engine(args: argparse.Namespace) -> dict:
    from selproj_plugin.engine import build_table
    from selproj_plugin.models import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    queries, pool, index, original = _setup(args)
    transforms = _projections(model, args.proj_dim, args.seed)
    t0 = time.perf_counter()
    config = engine_config(args, progress=True)
    table = build_table(model, tok, queries, pool, index, original, transforms=list(transforms.values()), config=config)
    seconds = time.perf_counter() - t0
    table.save(args.out)
    plan = table.meta["plan"]
    return {
        "seconds": seconds,
        "timings": table.meta["timings"],
        "distinct_samples": table.meta["distinct_samples"],
        "capture_flops": plan["capture_flops"],
        "dot_flops": plan["dot_flops"],
        "memory_limit_gb": config.memory_limit_gb,
        "spilled_bytes": table.meta["spilled_bytes"],
        "materialised_components": table.meta["materialised_components"],
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": _peak_gpu_mb(args.device),
        "projections": list(transforms),
    }


PLAIN_BATCH = 4  # the yardstick's batch size: a plain batched forward+backward, weight gradients included


def worker_ops(args: argparse.Namespace) -> dict:
    """The GPU cost proxy on ``--ops-queries`` queries: aten calls of the whole table and of a plain batched
    forward+backward over its distinct samples, capture against the plain pass on the engine's batches (calls and
    tokens/s), each counted and timed in separate passes."""
    from selproj_plugin.engine import build_table, capture_batches, prepare
    from selproj_plugin.models import load_model
    from selproj_plugin.opcount import OpCounter, measure, plain_backward, plain_step

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    # the queries' own originals as the pool: 16 x 5 is 32 distinct samples and 80 pairs (issue #25's yardstick)
    queries, pool, index, original = _setup(argparse.Namespace(**{**vars(args), "queries": min(args.ops_queries, args.queries)}), True)
    # the plain pass's batches: like for like, and nearer a GPU's batches (thousands of tokens) than the CPU's 512
    config = engine_config(args, progress=False, batch_size=PLAIN_BATCH, batch_tokens=PLAIN_BATCH * MAX_LENGTH)
    with OpCounter() as counter:
        table = build_table(model, tok, queries, pool, index, original, config=config)
    distinct = list({s.id: s for s in [*queries, *(pool[j] for j in index.ravel())]}.values())
    plain_ops, _ = plain_backward(model, tok, distinct, PLAIN_BATCH, MAX_LENGTH, args.device)
    prep = prepare(model, tok, None)
    batches = capture_batches(prep, tok, distinct, config)
    capture = {count: measure(lambda b: prep.capture.run(b), batches, count) for count in (True, False)}
    plain = {count: measure(plain_step(model), batches, count) for count in (True, False)}
    return {
        "queries": len(queries),
        "pairs": int(index.size),
        "distinct_samples": table.meta["distinct_samples"],
        "dot_order": table.meta["plan"]["dot_order"],
        "table_ops": counter.total,
        "plain_ops": plain_ops,
        "plain_batch": PLAIN_BATCH,
        "table_ops_over_plain": counter.total / plain_ops,
        "ops_per_pair": counter.total / index.size,
        "capture_ops": capture[True].ops,
        "plain_ops_same_batches": plain[True].ops,
        "capture_ops_over_plain": capture[True].ops / plain[True].ops,
        "capture_tokens_per_s": capture[False].tokens_per_s,
        "plain_tokens_per_s": plain[False].tokens_per_s,
        "capture_batches": len(batches),
        "engine_batch_size": config.batch_size,
        "engine_batch_tokens": config.batch_tokens,
    }


def worker_loop(args: argparse.Namespace) -> dict:
    """The paper's procedure: batch size 1, full gradients, per query recompute its candidates.

    Off float32 the same queries are then repeated untimed in float32 on the same (rounded) weights: the
    reference both the engine and this loop are measured against, since two bfloat16 runs differ by bfloat16's
    own error (about 5% on some attention components), not by the engine's."""
    from selproj_plugin.models import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    queries, pool, index, _ = _setup(args)
    n = min(args.loop_queries, len(queries))
    t0 = time.perf_counter()
    dots = _loop_dots(model, tok, queries[:n], pool, index, args.device, progress=True)
    seconds = time.perf_counter() - t0
    if args.dtype != "float32":
        dots.update({f"ref_{k}": v for k, v in _loop_dots(model.float(), tok, queries[:n], pool, index, args.device).items()})
    np.savez(args.out, **dots)
    return {
        "seconds": seconds,
        "queries_timed": n,
        "seconds_per_query": seconds / n,
        "peak_rss_mb": _peak_rss_mb(),
        "flops": loop_flops(model, tok, queries, pool, index),
        "peak_gpu_mb": _peak_gpu_mb(args.device),
    }


def loop_flops(model, tok, queries, pool, index) -> float:
    """Flops of the paper's loop over every query: a pass of the query, then one of each candidate, each a forward,
    an input-gradient and a weight-gradient backward through every matrix: 6 flops per weight and token.  Beside
    the engine's planned flops it bounds the speedup a faster engine could show."""
    from torch import nn

    from selproj_plugin.loss import encode_sample

    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    length = {}

    def tokens(sample) -> int:
        if sample.id not in length:
            length[sample.id] = len(encode_sample(tok, sample, MAX_LENGTH).input_ids)
        return length[sample.id]

    passes = sum(tokens(q) + sum(tokens(pool[j]) for j in row) for q, row in zip(queries, index))
    return 6.0 * weights * passes


def _loop_dots(model, tok, queries, pool, index, device: str, progress: bool = False) -> dict[str, np.ndarray]:
    """Per-component dots of each query with its candidates (and self dots) from full gradients, one at a time."""
    import torch
    import torch.nn.functional as F

    from selproj_plugin.components import catalogue
    from selproj_plugin.loss import IGNORE, encode_sample

    comps = catalogue(model)
    params = dict(model.named_parameters())

    def grads(sample) -> list[torch.Tensor]:
        enc = encode_sample(tok, sample, MAX_LENGTH)
        ids = torch.tensor([enc.input_ids], device=device)
        labels = torch.tensor([enc.labels], device=device)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        keep = target != IGNORE
        F.cross_entropy(logits[keep], target[keep]).backward()
        return [torch.cat([params[p].grad.reshape(-1) for p in c.param_names]) for c in comps]

    n = len(queries)
    cross = np.zeros((n, index.shape[1], len(comps)))
    qself = np.zeros((n, len(comps)))
    cself = np.zeros((n, index.shape[1], len(comps)))
    shown = progress_bar(n, "loop", progress, unit="query")
    for q in range(n):
        gq = [g.clone() for g in grads(queries[q])]
        qself[q] = [float(g.double() @ g.double()) for g in gq]
        for k, j in enumerate(index[q]):
            gc = grads(pool[j])
            cross[q, k] = [float(a.double() @ b.double()) for a, b in zip(gq, gc)]
            cself[q, k] = [float(b.double() @ b.double()) for b in gc]
        shown.update(1)
    shown.close()
    return {"cross": cross, "query_self": qself, "candidate_self": cself}


def dense_jl_pair_error(cos: np.ndarray, dim: int) -> np.ndarray:
    """E|<Pa,Pb> - <a,b>| / (|a||b|) of a dense Gaussian map with E<Pa,Pb> = <a,b>, from the exact cosine."""
    return np.sqrt(2 / np.pi) * np.sqrt((1 + cos**2) / dim)


def dense_jl_cosine_error(cos: np.ndarray, dim: int) -> np.ndarray:
    """E|cos(Pa,Pb) - cos(a,b)| of a dense Gaussian map (delta method: std (1 - cos^2) / sqrt(dim))."""
    return np.sqrt(2 / np.pi) * (1 - cos**2) / np.sqrt(dim)


def pair_distortion(approx: np.ndarray, exact: np.ndarray, dim: int, seed: int = 0, boot: int = 2000) -> dict:
    """Distortion of every pair's dot product under one map drawn with several seeds, against dense JL.

    ``approx``: [S, N, N] projected Gram matrices (one per seed); ``exact``: [N, N].  The
    interval resamples samples (pairs sharing a sample are not independent).
    """
    n = exact.shape[0]
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    err = np.abs(approx - exact) / scale
    expected = dense_jl_pair_error(exact / scale, dim)
    iu = np.triu_indices(n, 1)
    ratio = float(err[:, iu[0], iu[1]].mean() / expected[iu].mean())
    off = 1 - np.eye(n)
    mean_err = err.mean(axis=0) * off
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(boot):
        c = rng.multinomial(n, np.full(n, 1 / n)).astype(np.float64)
        w = np.outer(c, c)
        if np.count_nonzero(c) > 1:  # at least one pair
            boots.append(float((w * mean_err).sum() / (w * expected * off).sum()))
    diag = np.diagonal(approx, axis1=1, axis2=2)
    return {
        "dim": int(dim),
        "pairs": int(iu[0].size),
        "seeds": int(approx.shape[0]),
        "pair_distortion_mean": float(err[:, iu[0], iu[1]].mean()),
        "pair_distortion_max": float(err[:, iu[0], iu[1]].max()),
        "dense_jl_expected_mean": float(expected[iu].mean()),
        "distortion_vs_dense_jl": ratio,
        "distortion_vs_dense_jl_95ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "distortion_vs_dense_jl_by_seed": [float(e[iu].mean() / expected[iu].mean()) for e in err],
        "norm_distortion_mean": float(np.mean(np.abs(diag - np.diag(exact)) / np.diag(exact))),
    }


def _resident() -> int:
    """What this process holds now (its RSS), in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trak_block(dim: int) -> int:
    return min(dim, 512)


TRAK_SLACK = 64 * 2**20  # beside TRAK's matrix: the sampled slices, its sketch, the libraries it imports


def trak_slice_dim(requested: int, grad_dim: int, room: float, block: int, samples: int) -> int:
    """Gradient coordinates TRAK is timed on: ``requested``, at most the gradient, and no more than ``room`` bytes
    hold with its dense fp32 block matrix (``block`` columns a coordinate) and the ``samples`` slices."""
    return int(max(0, min(requested, grad_dim, (room - TRAK_SLACK) // (4 * (block + samples)))))


def worker_projection(args: argparse.Namespace) -> dict:
    """Pair distortion of the projections vs dense JL on exact dots, and TRAK's BasicProjector timed, the process
    within ``--memory-limit-gb``: exact dots by the engine's plan, the projections fed a component at a time with
    their code caches sized from the limit, TRAK's slice as long as what is left holds its dense matrix.
    With ``--plan``, the predicted peak of each of the three phases, nothing computed."""
    import torch

    from benchmark.data import load_records
    from selproj_plugin.capture import matrix_form, to_param_layout
    from selproj_plugin.engine import build_table, iter_factors, plan_table, prepare
    from selproj_plugin.loss import encode_samples
    from selproj_plugin.models import load_model
    from selproj_plugin.projector import ProjectionStore, Projector, share_codes

    model, tok = load_model(args.model)
    samples = [s for r in load_records(args.dataset)[: args.proj_queries] for s in (r.paraphrase, r.original)]
    n = len(samples)
    prep = prepare(model, tok, None)
    maps = {
        f"random_projection@{d}": [t] + [_projections(model, d, args.seed + k)[d] for k in range(1, args.proj_seeds)]
        for d, t in _projections(model, args.proj_dim, args.seed).items()
    }
    maps.update(
        {
            f"random_projection_per_component@{d}": [t]
            for d, t in _projections(model, args.proj_dim, args.seed, "random_projection_per_component").items()
        }
    )
    transforms = [t for ts in maps.values() for t in ts]
    config = engine_config(args, device=EngineConfig.device)  # the projection comparison stays on the CPU
    limit = config.memory_limit_gb * 2**30
    # exact full-gradient dots first (every sample paired with every sample: the engine's table and its plan),
    # then the projections, each sample's components fed to every map at once, then TRAK on a slice
    index = np.tile(np.arange(n), (n, 1))
    exact_plan = plan_table(model, tok, samples, samples, index, config=config)
    projector = Projector(prep.specs, transforms)
    share_codes(transforms, 0)
    resident = _resident()
    batch = exact_plan.batch_bytes
    share_codes(transforms, limit - resident - batch - projector.held_bytes())
    first_dim = next(iter(maps.values()))[0].dim
    block = _trak_block(first_dim)
    grad_dim = int(sum(s.component.num_params for s in prep.specs))
    trak_slice = trak_slice_dim(args.trak_slice, grad_dim, limit - resident, block, args.trak_samples)
    predicted = {
        "exact_dots": exact_plan.peak_bytes,
        "projections": resident + batch + projector.held_bytes(),
        "trak": resident + TRAK_SLACK + 4 * trak_slice * (block + args.trak_samples),
    }
    if trak_slice < 1:
        raise ValueError(
            f"a {config.memory_limit_gb:g} GB limit leaves no room for TRAK's matrix beside the "
            f"{resident / 2**30:.2f} GiB this process holds: raise --memory-limit-gb"
        )
    if args.plan:
        return {
            "samples": n,
            "memory_limit_gb": config.memory_limit_gb,
            "resident_bytes": resident,
            "predicted_peak_bytes": max(predicted.values()),
            "predicted_phase_bytes": predicted,
            "exact_plan": exact_plan.summary(),
            "trak_slice_dim": trak_slice,
        }
    table = build_table(model, tok, samples, samples, index, np.eye(n, dtype=bool), config=config)
    exact = table.cross.sum(axis=-1)
    del table
    encoded, _ = encode_samples(tok, samples, MAX_LENGTH)
    slices: list[torch.Tensor] = []
    keys = [str(k) for k in range(len(transforms))]
    store = ProjectionStore(keys, config.spill_dir)
    try:
        for i, f in iter_factors(prep, encoded, range(n), config, label="projection"):
            store.put(i, projector(f))
            if len(slices) < args.trak_samples:  # the gradient's first coordinates, a component at a time
                parts, have = [], 0
                for spec in prep.specs:
                    if have >= args.trak_slice:
                        break
                    part = to_param_layout(spec, matrix_form(spec, f))[: args.trak_slice - have].clone()
                    parts.append(part)
                    have += part.numel()
                slices.append(torch.cat(parts))
            del f
        projector.release()
        # each map's projected Gram, seed by seed, from the outputs read back a pair at a time
        approx = {label: np.zeros((len(ts), n, n)) for label, ts in maps.items()}
        slot = {id(t): (label, k) for label, ts in maps.items() for k, t in enumerate(ts)}
        for i in range(n):
            got_i = store.get(i)
            for j in range(i, n):
                for t, dot in zip(transforms, store.dots(i, j, got_i)):
                    label, k = slot[id(t)]
                    approx[label][k, i, j] = approx[label][k, j, i] = dot
            del got_i
    finally:
        store.close()
    seconds = {label: sum(projector.transform_s[transforms.index(t)] for t in ts) for label, ts in maps.items()}
    result = {"samples": n, "grad_dim": grad_dim, "materialise_seconds_per_sample": projector.form_s / n, "maps": {}}
    for label, per_seed in maps.items():
        result["maps"][label] = {
            **pair_distortion(approx[label], exact, per_seed[0].dim, args.seed),
            "key": per_seed[0].key,
            "seconds_per_sample": seconds[label] / (n * len(per_seed)),
        }

    # TRAK BasicProjector on a slice of the same gradients, extrapolated to the full length: the slice holds
    # TRAK's dense block matrix (slice x block fp32) within what the limit leaves
    from trak.projectors import BasicProjector, ProjectionType

    first = next(iter(result["maps"].values()))
    # the room is read again now: memory freed by the phases before may not have gone back to the system
    trak_slice = min(trak_slice, trak_slice_dim(args.trak_slice, grad_dim, limit - _resident(), block, args.trak_samples))
    if trak_slice < 1:
        raise ValueError(
            f"a {config.memory_limit_gb:g} GB limit leaves no room for TRAK's matrix beside the "
            f"{_resident() / 2**30:.2f} GiB this process holds: raise --memory-limit-gb"
        )
    full = torch.stack([s[:trak_slice] for s in slices]).contiguous()
    del slices
    projector_trak = BasicProjector(
        full.shape[1], first["dim"], args.seed, ProjectionType.rademacher, torch.device("cpu"), block_size=block
    )
    t0 = time.perf_counter()
    projector_trak.project(full, model_id=0)
    trak_slice_s = time.perf_counter() - t0
    trak_s = trak_slice_s / len(full) * result["grad_dim"] / full.shape[1]
    result.update(
        trak_dim=first["dim"],
        trak_seconds_per_sample_extrapolated=trak_s,
        trak_slice_dim=int(full.shape[1]),
        trak_slice_seconds=trak_slice_s,
        speedup_vs_trak=trak_s / first["seconds_per_sample"],
        peak_rss_mb=_peak_rss_mb(),
        memory_limit_gb=config.memory_limit_gb,
        predicted_peak_bytes=max(predicted.values()),
        predicted_phase_bytes=predicted,
    )
    return result


WORKERS = {"engine": worker_engine, "loop": worker_loop, "projection": worker_projection, "ops": worker_ops}


def _run_worker(name: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmark.speed",
        "--worker",
        name,
        "--out",
        str(out),
        *["--fullset"] * args.fullset,
        "--queries",
        str(args.queries),
        "--k",
        str(args.k),
        "--loop-queries",
        str(args.loop_queries),
        "--proj-dim",
        args.proj_dim,
        "--proj-queries",
        str(args.proj_queries),
        "--proj-seeds",
        str(args.proj_seeds),
        "--trak-slice",
        str(args.trak_slice),
        "--trak-samples",
        str(args.trak_samples),
        *["--plan"] * args.plan,
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--ops-queries",
        str(args.ops_queries),
        "--memory-limit-gb",
        str(args.memory_limit_gb),
    ]
    if args.batch_size is not None:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.model:
        cmd += ["--model", args.model]
    if args.dataset:
        cmd += ["--dataset", args.dataset]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"benchmark worker {name} failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _engine_and_loop(args: argparse.Namespace, tmp: Path):
    """Both methods on one task, each in its own process; the loop's queries checked against the engine's table."""
    from selproj_plugin.table import ComponentTable

    tmp.mkdir(parents=True, exist_ok=True)
    engine = _run_worker("engine", args, tmp / "engine.npz")
    loop = _run_worker("loop", args, tmp / "loop.npz")
    table = ComponentTable.load(tmp / "engine.npz")
    with np.load(tmp / "loop.npz") as saved:
        run = {k: saved[k] for k in ("cross", "query_self", "candidate_self")}
        ref = {k: saved[f"ref_{k}"] for k in run} if "ref_cross" in saved else run
    n = ref["cross"].shape[0]
    engine_dots = {"cross": table.cross[:n], "query_self": table.query_self[:n], "candidate_self": table.candidate_self[:n]}
    errors = _rel_errors(engine_dots, ref)
    loop["reference"] = "the loop itself" if ref is run else "a float32 loop on the same weights"
    loop["max_rel_error"], loop["max_rel_error_self"] = _rel_errors(run, ref)
    return engine, loop, table, *errors


def _rel_errors(dots: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[float, float]:
    """Largest difference to ``ref``: cross dots normalised by the norms, self dots relative."""
    scale = np.sqrt(ref["query_self"][:, None, :] * ref["candidate_self"])
    cross = float(np.max(np.abs(dots["cross"] - ref["cross"]) / np.maximum(scale, 1e-300)))
    self_rel = float(max(np.max(np.abs(dots[k] - ref[k]) / ref[k]) for k in ("query_self", "candidate_self")))
    return cross, self_rel


def _fullset(args: argparse.Namespace, tmp: Path) -> dict:
    """Every original a candidate (Q x Q): the engine against the paper's loop timed on a few queries."""
    full_args = argparse.Namespace(
        **{
            **vars(args),
            "fullset": True,
            "queries": args.fullset_queries,
            "k": args.fullset_queries,
            "loop_queries": args.fullset_loop_queries,
            "proj_dim": "",
        }
    )
    f_engine, f_loop, f_table, f_rel, f_self_rel = _engine_and_loop(full_args, Path(tmp) / "fullset")
    f_engine_s = f_engine["seconds"] - f_engine["timings"]["project_s"]
    fullset = {
        "queries": args.fullset_queries,
        "candidates": args.fullset_queries,
        "engine_seconds": f_engine_s,
        "engine_timings": f_engine["timings"],
        "dot_order": f_table.meta["plan"]["dot_order"],
        "engine_peak_rss_mb": f_engine["peak_rss_mb"],
        "engine_memory_limit_gb": f_engine["memory_limit_gb"],
        "engine_spilled_bytes": f_engine["spilled_bytes"],
        "loop_queries_timed": f_loop["queries_timed"],
        "loop_seconds_measured": f_loop["seconds"],
        "loop_seconds_extrapolated": f_loop["seconds_per_query"] * args.fullset_queries,
        "loop_peak_rss_mb": f_loop["peak_rss_mb"],
        "max_rel_error": f_rel,
        "max_rel_error_self": f_self_rel,
        "reference": f_loop["reference"],
        "loop_max_rel_error": f_loop["max_rel_error"],
        "loop_max_rel_error_self": f_loop["max_rel_error_self"],
    }
    fullset["speedup_vs_loop_fullset"] = fullset["loop_seconds_extrapolated"] / f_engine_s
    fullset.update(_flops(f_engine, f_loop))
    return fullset


def _flops(engine: dict, loop: dict) -> dict:
    """Planned flops of the engine against the loop's over every query: the speedup the arithmetic allows."""
    engine_flops = engine["capture_flops"] + engine["dot_flops"]
    return {
        "engine_flops": engine_flops,
        "loop_flops": loop["flops"],
        "flop_ratio": loop["flops"] / engine_flops,
        "dot_flops_over_capture_flops": engine["dot_flops"] / engine["capture_flops"],
    }


def _print_flops(f: dict, speedup: float) -> None:
    print(
        f"flops: loop {f['loop_flops'] / 1e12:.1f} TFLOP, engine {f['engine_flops'] / 1e12:.1f} TFLOP (dots "
        f"{f['dot_flops_over_capture_flops']:.2f} of capture): the arithmetic allows {f['flop_ratio']:.1f}x, "
        f"measured {speedup:.1f}x"
    )


def print_ops(ops: dict) -> None:
    """One line of the GPU cost proxy (``worker_ops``'s record); ``benchmark/gpu_check.sh`` prints it too."""
    print(
        f"aten calls ({ops['queries']}x{ops['pairs'] // max(1, ops['queries'])}, {ops['distinct_samples']} samples, "
        f"{ops['dot_order']} order): "
        f"table {ops['table_ops']:,} = {ops['table_ops_over_plain']:.2f}x a plain forward+backward in batches of "
        f"{ops['plain_batch']} ({ops['plain_ops']:,}), {ops['ops_per_pair']:.0f} a pair; capture "
        f"{ops['capture_ops_over_plain']:.2f}x the plain pass on its {ops['capture_batches']} batches; tokens/s "
        f"capture {ops['capture_tokens_per_s']:.0f}, plain {ops['plain_tokens_per_s']:.0f}"
    )


def _print_fullset(fullset: dict) -> None:
    print(
        f"full set {fullset['queries']}x{fullset['candidates']}: engine {fullset['engine_seconds']:.1f}s "
        f"({fullset['dot_order']} order, peak RSS {fullset['engine_peak_rss_mb']:.0f} MiB, "
        f"{fullset['engine_spilled_bytes'] / 2**30:.1f} GiB spilled), paper loop "
        f"{fullset['loop_seconds_measured']:.1f}s for {fullset['loop_queries_timed']} queries -> "
        f"{fullset['loop_seconds_extrapolated']:.1f}s extrapolated: speedup_vs_loop_fullset "
        f"{fullset['speedup_vs_loop_fullset']:.1f}x; largest relative difference to {fullset['reference']} "
        f"{fullset['max_rel_error']:.2e} (the loop's own {fullset['loop_max_rel_error']:.2e})"
    )
    _print_flops(fullset, fullset["speedup_vs_loop_fullset"])


def _distortions(maps: dict, proj_dim: str) -> dict:
    """``distortion_vs_dense_jl`` of the shared-sketch random projection at each requested dimension."""
    return {d: maps[f"random_projection@{d}"]["distortion_vs_dense_jl"] for d in _dims(proj_dim)}


def _print_projection(proj: dict) -> None:
    maps = proj["maps"]
    print(
        f"projection of {proj['samples']} samples ({proj['grad_dim']:,} coords; "
        f"materialising {proj['materialise_seconds_per_sample']:.2f}"
        f"s/sample): pair dot distortion as a fraction of |a||b|, mean over {next(iter(maps.values()))['pairs']} pairs:"
    )
    for label, m in maps.items():
        lo, hi = m["distortion_vs_dense_jl_95ci"]
        print(
            f"  {label} (dim {m['dim']}, {m['seeds']} seed(s)): measured {m['pair_distortion_mean']:.5f} (max "
            f"{m['pair_distortion_max']:.4f}), dense Gaussian JL expects {m['dense_jl_expected_mean']:.5f} -> "
            f"distortion_vs_dense_jl {m['distortion_vs_dense_jl']:.3f} (95% bootstrap {lo:.3f}-{hi:.3f}); "
            f"{m['seconds_per_sample']:.2f}s/sample"
        )
    print(
        f"TRAK BasicProjector to {proj['trak_dim']}: {proj['trak_seconds_per_sample_extrapolated']:.1f}s/sample "
        f"(timed on {proj['trak_slice_dim']} coords, extrapolated linearly) -> sketch {proj['speedup_vs_trak']:.0f}x faster"
    )
    if "memory_limit_gb" in proj:
        print(
            f"projection worker: peak RSS {proj['peak_rss_mb']:.0f} MiB under a {proj['memory_limit_gb']:g} GB limit "
            f"(predicted {proj['predicted_peak_bytes'] / 2**20:.0f} MiB)"
        )


# EngineConfig's fields set from the command line, for every worker's engine
ENGINE_OPTIONS = ("batch_size", "memory_limit_gb", "device")


def engine_config(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The engine settings the options give, for one worker."""
    return settings_cli.from_args(args, EngineConfig, **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    settings_cli.add_arguments(parser, PipelineOptions, ("model", "dataset"))
    parser.add_argument("--queries", type=int, default=64, help="paraphrase queries timed with the engine")
    parser.add_argument("--k", type=int, default=PipelineOptions.candidates, help="BM25 top-k candidates per query")
    parser.add_argument("--loop-queries", type=int, default=8, help="queries timed with the per-pair loop")
    parser.add_argument("--proj-dim", default="4096,1%", help="random projection dimensions (counts or percentages)")
    parser.add_argument(
        "--proj-queries", type=int, default=12, help="queries whose paraphrase and original are projected (all pairs of the 2x samples)"
    )
    parser.add_argument("--proj-seeds", type=int, default=3, help="seeds of random_projection per dimension")
    parser.add_argument(
        "--trak-slice",
        type=int,
        default=2_000_000,
        help="gradient coordinates timed for TRAK (fewer where the memory limit leaves no room for its dense matrix)",
    )
    parser.add_argument("--trak-samples", type=int, default=2, help="samples timed for TRAK")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="with --only projection: print the projection worker's predicted peak memory (exact dots, "
        "projections, TRAK's slice) and exit before any gradient",
    )
    settings_cli.add_arguments(parser, PipelineOptions, ("seed",))
    settings_cli.add_arguments(
        parser,
        EngineConfig,
        ENGINE_OPTIONS,
        notes={
            "memory_limit_gb": "each worker's; the engine's spill writes count as dot time, the projection worker also "
            "sizes its code caches and TRAK's timed slice from it",
            "device": "the engine's and the loop's; the projection comparison stays on the CPU",
        },
    )
    settings_cli.add_arguments(
        parser, PipelineOptions, ("dtype",), notes={"dtype": "the engine and loop workers'; the projection worker stays float32 on CPU"}
    )
    parser.add_argument(
        "--only",
        choices=("all", "engine", "projection", "fullset", "ops"),
        default="all",
        help="'engine': only the engine against the loop at --k candidates, no projections; "
        "'projection': only the projection's distortion and TRAK timing (minutes, not an hour); "
        "'fullset': only the every-original-a-candidate comparison; 'ops': only the aten-call "
        "count (--ops-queries)",
    )
    parser.add_argument(
        "--fullset-queries", type=int, default=32, help="queries (and originals) of the full-set comparison: every original a candidate"
    )
    parser.add_argument("--fullset-loop-queries", type=int, default=2, help="full-set queries timed with the loop")
    parser.add_argument(
        "--ops-queries",
        type=int,
        default=16,
        help="queries of the aten-call count (0: none; at most --queries), at --k candidates among their own "
        "originals; also capture tokens/s",
    )
    parser.add_argument("--fullset", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    if not args.memory_limit_gb >= 0:  # here, not in a worker (0: the engine keeps no factor in memory)
        parser.exit(2, f"error: --memory-limit-gb must be at least 0, got {args.memory_limit_gb:g}\n")
    if args.plan and args.only != "projection":
        parser.exit(2, "error: --plan plans the projection worker: use it with --only projection\n")
    if args.dataset:  # read here, so a bad one is one line, not a worker's traceback
        from benchmark.data import DatasetError, load_records

        try:
            load_records(args.dataset)
        except DatasetError as exc:
            parser.exit(2, f"error: {exc}\n")

    with tempfile.TemporaryDirectory(prefix="selproj-speed-") as tmp:
        if args.only == "fullset":
            fullset = _fullset(args, Path(tmp))
            _print_fullset(fullset)
            if args.json:
                Path(args.json).write_text(
                    json.dumps(
                        {
                            "model": args.model or "SmolLM2-135M-Instruct",
                            "fullset": fullset,
                            "speedup_vs_loop_fullset": fullset["speedup_vs_loop_fullset"],
                        },
                        indent=2,
                    )
                )
            return 0
        if args.only == "ops":
            if not args.ops_queries:
                parser.exit(2, "error: --only ops counts --ops-queries queries: give at least 1\n")
            ops = _run_worker("ops", args, Path(tmp) / "ops.json")
            print_ops(ops)
            if args.json:
                Path(args.json).write_text(json.dumps({"model": args.model or "SmolLM2-135M-Instruct", "ops": ops}, indent=2))
            return 0
        proj = None
        if args.only == "engine":  # the table stores no projections: the engine's own time and memory
            args = argparse.Namespace(**{**vars(args), "proj_dim": ""})
        else:
            proj = _run_worker("projection", args, Path(tmp) / "proj.npz")
        if args.plan:
            gib = 2**30
            phases = ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in proj["predicted_phase_bytes"].items())
            print(
                f"projection worker plan: {proj['samples']} samples, predicted peak "
                f"{proj['predicted_peak_bytes'] / gib:.2f} GiB under a {proj['memory_limit_gb']:g} GB limit "
                f"(resident {proj['resident_bytes'] / gib:.2f} GiB; {phases}); TRAK timed on "
                f"{proj['trak_slice_dim']:,} coordinates"
            )
            if args.json:
                Path(args.json).write_text(json.dumps({"plan": proj}, indent=2))
            return 0
        if args.only == "projection":
            result = {
                "model": args.model or "SmolLM2-135M-Instruct",
                "projection": proj,
                "projection_speedup_vs_trak": proj["speedup_vs_trak"],
                "distortion_vs_dense_jl": _distortions(proj["maps"], args.proj_dim),
            }
            _print_projection(proj)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
            return 0
        engine, loop, table, max_rel, self_rel = _engine_and_loop(args, Path(tmp))
        ops = _run_worker("ops", args, Path(tmp) / "ops.json") if args.ops_queries else None
        fullset = _fullset(args, Path(tmp)) if args.fullset_queries and args.only == "all" else None
    exact_cos = table.cross.sum(-1) / np.sqrt(table.query_self.sum(-1)[:, None] * table.candidate_self.sum(-1))
    table_rp = {}
    stored = zip(engine["projections"], table.rp_dims, table.rp_similarity) if engine["projections"] else []
    for text, dim, sim in stored:
        err, expected = np.abs(sim - exact_cos), dense_jl_cosine_error(exact_cos, int(dim))
        table_rp[text] = {
            "dim": int(dim),
            "cosine_abs_error_mean": float(err.mean()),
            "cosine_abs_error_max": float(err.max()),
            "dense_jl_expected_mean": float(expected.mean()),
            "ratio": float(err.mean() / expected.mean()),
        }
    loop_total = loop["seconds_per_query"] * args.queries
    engine_s = engine["seconds"] - engine["timings"]["project_s"]
    result = {
        "model": args.model or "SmolLM2-135M-Instruct",
        "queries": args.queries,
        "k": args.k,
        "device": args.device,
        "dtype": args.dtype,
        "engine_peak_gpu_mb": engine["peak_gpu_mb"],
        "loop_peak_gpu_mb": loop["peak_gpu_mb"],
        "engine_seconds": engine_s,
        "engine_projection_seconds": engine["timings"]["project_s"],
        "engine_timings": engine["timings"],
        "engine_distinct_samples": engine["distinct_samples"],
        "engine_materialised_components": engine["materialised_components"],
        "loop_seconds_measured": loop["seconds"],
        "loop_queries_timed": loop["queries_timed"],
        "loop_seconds_extrapolated": loop_total,
        "speedup_vs_loop": loop_total / engine_s,
        "max_rel_error": max_rel,
        "max_rel_error_self": self_rel,
        "reference": loop["reference"],
        "loop_max_rel_error": loop["max_rel_error"],
        "loop_max_rel_error_self": loop["max_rel_error_self"],
        "engine_peak_rss_mb": engine["peak_rss_mb"],
        "loop_peak_rss_mb": loop["peak_rss_mb"],
        "engine_memory_limit_gb": engine["memory_limit_gb"],
        "engine_spilled_bytes": engine["spilled_bytes"],
        "dots_over_capture": engine["timings"]["dots_s"] / engine["timings"]["capture_s"],
        **_flops(engine, loop),
    }
    if proj is not None:
        result.update(
            projection=proj,
            projection_speedup_vs_trak=proj["speedup_vs_trak"],
            distortion_vs_dense_jl=_distortions(proj["maps"], args.proj_dim),
            table_rp_cosine=table_rp,
        )
    if fullset:
        result["fullset"] = fullset
        result["speedup_vs_loop_fullset"] = fullset["speedup_vs_loop_fullset"]
    if ops:
        result["ops"] = ops
    print(
        f"engine: {engine_s:.1f}s for {args.queries}x{args.k} ({engine['distinct_samples']} distinct samples; "
        f"plus {engine['timings']['project_s']:.1f}s projecting), peak RSS {engine['peak_rss_mb']:.0f} MiB under a "
        f"{engine['memory_limit_gb']:g} GB limit ({engine['spilled_bytes'] / 2**30:.1f} GiB of factors spilled)"
    )
    print(
        f"paper loop: {loop['seconds']:.1f}s for {loop['queries_timed']} queries -> {loop_total:.1f}s extrapolated "
        f"to {args.queries}, peak RSS {loop['peak_rss_mb']:.0f} MiB"
    )
    print(
        f"speedup vs loop: {result['speedup_vs_loop']:.2f}x; largest relative difference to {loop['reference']}: "
        f"{max_rel:.2e} (cross, normalised by norms), {self_rel:.2e} (self dots)"
        + (
            ""
            if args.dtype == "float32"
            else f"; the {args.dtype} loop's own: {loop['max_rel_error']:.2e}, {loop['max_rel_error_self']:.2e}"
        )
    )
    print(
        f"dots {engine['timings']['dots_s']:.1f}s (of which storing kept factors {engine['timings']['store_s']:.1f}s) "
        f"against capture {engine['timings']['capture_s']:.1f}s (ratio {result['dots_over_capture']:.2f})"
    )
    _print_flops(result, result["speedup_vs_loop"])
    if ops:
        print_ops(ops)
    if fullset:
        _print_fullset(fullset)
    if proj is not None:
        _print_projection(proj)
    for text, r in table_rp.items():
        print(
            f"table random_projection@{text} (dim {r['dim']}): cosine abs error mean {r['cosine_abs_error_mean']:.5f} "
            f"(max {r['cosine_abs_error_max']:.4f}), dense Gaussian JL expects {r['dense_jl_expected_mean']:.5f} -> "
            f"ratio {r['ratio']:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
