"""Speed benchmark: the factor engine vs the paper's per-pair loop, and tensor sketch vs TRAK.

``python -m benchmark.speed --json OUT.json`` builds the component table for 64 paraphrased
queries x 5 BM25 candidates (originals) on SmolLM2-135M-Instruct twice: with the engine,
and with the paper's procedure (batch size 1, full parameter gradients of the query and
each of its candidates, per-component dot products) on a subset of queries, extrapolated
per query.  Each method runs in its own subprocess so its peak RSS (VmHWM) is its own.
It then times random projection of the same gradients: tensor sketch from factors vs
TRAK's ``BasicProjector`` (timed on a slice of the gradient, extrapolated linearly in
gradient length, which is how its cost scales), and prints the sketch's distortion.
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

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM), in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _setup(args: argparse.Namespace):
    from benchmark.candidates import bm25_topk
    from benchmark.data import load_records

    records = load_records()
    queries = [r.paraphrase for r in records[: args.queries]]
    pool = [r.original for r in records]
    index = bm25_topk([q.prompt + " " + q.response for q in queries], [p.prompt + " " + p.response for p in pool],
                      args.k, force=list(range(len(queries))))
    original = np.array([int(np.flatnonzero(row == q)[0]) for q, row in enumerate(index)])
    return queries, pool, index, original


def worker_engine(args: argparse.Namespace) -> dict:
    from selproj_plugin.engine import EngineConfig, build_table
    from selproj_plugin.models import load_model

    model, tok = load_model(args.model, device=args.device)
    queries, pool, index, original = _setup(args)
    t0 = time.perf_counter()
    table = build_table(model, tok, queries, pool, index, original, proj_dims=(args.proj_dim,),
                        config=EngineConfig(batch_size=args.batch_size, device=args.device, progress=True))
    seconds = time.perf_counter() - t0
    table.save(args.out)
    return {"seconds": seconds, "timings": table.meta["timings"], "distinct_samples": table.meta["distinct_samples"],
            "materialised_components": table.meta["materialised_components"], "peak_rss_mb": _peak_rss_mb()}


def worker_loop(args: argparse.Namespace) -> dict:
    """The paper's procedure: batch size 1, full gradients, per query recompute its candidates."""
    import torch
    import torch.nn.functional as F

    from selproj_plugin.components import catalogue
    from selproj_plugin.loss import IGNORE, encode_sample
    from selproj_plugin.models import load_model

    model, tok = load_model(args.model, device=args.device)
    queries, pool, index, _ = _setup(args)
    comps = catalogue(model)
    params = dict(model.named_parameters())

    def grads(sample) -> list[torch.Tensor]:
        enc = encode_sample(tok, sample, 512)
        ids = torch.tensor([enc.input_ids], device=args.device)
        labels = torch.tensor([enc.labels], device=args.device)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        keep = target != IGNORE
        F.cross_entropy(logits[keep], target[keep]).backward()
        return [torch.cat([params[p].grad.reshape(-1) for p in c.param_names]) for c in comps]

    n = min(args.loop_queries, len(queries))
    cross = np.zeros((n, index.shape[1], len(comps)))
    qself = np.zeros((n, len(comps)))
    cself = np.zeros((n, index.shape[1], len(comps)))
    t0 = time.perf_counter()
    for q in range(n):
        gq = [g.clone() for g in grads(queries[q])]
        qself[q] = [float(g.double() @ g.double()) for g in gq]
        for k, j in enumerate(index[q]):
            gc = grads(pool[j])
            cross[q, k] = [float(a.double() @ b.double()) for a, b in zip(gq, gc)]
            cself[q, k] = [float(b.double() @ b.double()) for b in gc]
        print(f"\r[loop] query {q + 1}/{n} ({time.perf_counter() - t0:.0f}s)", end="", file=sys.stderr)
    print(file=sys.stderr)
    seconds = time.perf_counter() - t0
    np.savez(args.out, cross=cross, query_self=qself, candidate_self=cself)
    return {"seconds": seconds, "queries_timed": n, "seconds_per_query": seconds / n, "peak_rss_mb": _peak_rss_mb()}


def worker_projection(args: argparse.Namespace) -> dict:
    """Tensor sketch from factors vs TRAK BasicProjector on the materialised gradients."""
    import torch
    from trak.projectors import BasicProjector, ProjectionType

    from selproj_plugin.capture import matrix_form
    from selproj_plugin.engine import EngineConfig, factor_dots, iter_factors, prepare, _Sketcher
    from selproj_plugin.loss import encode_samples
    from selproj_plugin.models import load_model

    model, tok = load_model(args.model)
    queries, _, _, _ = _setup(args)
    samples = queries[: args.proj_samples]
    prep = prepare(model, tok, None)
    encoded, _ = encode_samples(tok, samples, 512)
    factors = [f for _, f in sorted(iter_factors(prep, encoded, range(len(samples)), EngineConfig(progress=False)),
                                    key=lambda x: x[0])]
    sketcher = _Sketcher(prep.specs, [args.proj_dim], args.seed, "cpu")
    t0 = time.perf_counter()
    sketches = torch.stack([sketcher(f)[0] for f in factors])
    sketch_s = time.perf_counter() - t0
    exact = np.stack([factor_dots(f, factors, prep.specs).sum(axis=1) for f in factors])  # [N, N] full-gradient dots
    approx = (sketches @ sketches.T).numpy()
    norms = np.sqrt(np.diag(exact))
    scale = np.outer(norms, norms)
    off = ~np.eye(len(factors), dtype=bool)
    pair_err = np.abs(approx - exact)[off] / scale[off]
    norm_err = np.abs(np.diag(approx) - np.diag(exact)) / np.diag(exact)

    # TRAK BasicProjector on a slice of the materialised full gradients, extrapolated to the full length.
    full = torch.stack([torch.cat([matrix_form(s, f).reshape(-1) for s in prep.specs]) for f in factors])
    grad_dim = full.shape[1]
    slice_dim = min(grad_dim, args.trak_slice)
    projector = BasicProjector(slice_dim, args.proj_dim, args.seed, ProjectionType.rademacher, torch.device("cpu"),
                               block_size=min(args.proj_dim, 512))
    t0 = time.perf_counter()
    projector.project(full[:, :slice_dim].contiguous(), model_id=0)
    trak_slice_s = time.perf_counter() - t0
    trak_s = trak_slice_s * grad_dim / slice_dim
    return {
        "samples": len(factors), "dim": args.proj_dim, "grad_dim": int(grad_dim),
        "sketch_seconds": sketch_s, "trak_seconds_extrapolated": trak_s, "trak_slice_dim": int(slice_dim),
        "trak_slice_seconds": trak_slice_s, "speedup_vs_trak": trak_s / sketch_s,
        "distortion_pair_mean": float(pair_err.mean()), "distortion_pair_max": float(pair_err.max()),
        "distortion_norm_mean": float(norm_err.mean()), "distortion_norm_max": float(norm_err.max()),
        "peak_rss_mb": _peak_rss_mb(),
    }


WORKERS = {"engine": worker_engine, "loop": worker_loop, "projection": worker_projection}


def _run_worker(name: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmark.speed", "--worker", name, "--out", str(out),
           "--queries", str(args.queries), "--k", str(args.k), "--loop-queries", str(args.loop_queries),
           "--batch-size", str(args.batch_size), "--proj-dim", str(args.proj_dim),
           "--proj-samples", str(args.proj_samples), "--trak-slice", str(args.trak_slice), "--seed", str(args.seed),
           "--device", args.device]
    if args.model:
        cmd += ["--model", args.model]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"benchmark worker {name} failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--model", default=None, help="HF id or path (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--loop-queries", type=int, default=8, help="queries timed with the per-pair loop")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--proj-dim", type=int, default=4096)
    parser.add_argument("--proj-samples", type=int, default=8)
    parser.add_argument("--trak-slice", type=int, default=2_000_000, help="gradient coordinates timed for TRAK")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="device of the engine and the loop (the projection comparison stays on CPU)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    from selproj_plugin.table import ComponentTable

    with tempfile.TemporaryDirectory(prefix="selproj-speed-") as tmp:
        engine = _run_worker("engine", args, Path(tmp) / "engine.npz")
        loop = _run_worker("loop", args, Path(tmp) / "loop.npz")
        proj = _run_worker("projection", args, Path(tmp) / "proj.npz")
        table = ComponentTable.load(Path(tmp) / "engine.npz")
        with np.load(Path(tmp) / "loop.npz") as ref:
            n = ref["cross"].shape[0]
            scale = np.sqrt(ref["query_self"][:, None, :] * ref["candidate_self"])
            diff = np.abs(table.cross[:n] - ref["cross"])
            max_rel = float(np.max(diff / np.maximum(scale, 1e-300)))
            self_rel = float(max(np.max(np.abs(table.query_self[:n] - ref["query_self"]) / ref["query_self"]),
                                 np.max(np.abs(table.candidate_self[:n] - ref["candidate_self"]) / ref["candidate_self"])))
        exact_cos = table.cross.sum(-1) / np.sqrt(table.query_self.sum(-1)[:, None] * table.candidate_self.sum(-1))
        rp_cos_err = np.abs(table.rp_similarity[0] - exact_cos)
    loop_total = loop["seconds_per_query"] * args.queries
    result = {
        "model": args.model or "SmolLM2-135M-Instruct", "queries": args.queries, "k": args.k,
        "engine_seconds": engine["seconds"], "engine_timings": engine["timings"],
        "engine_distinct_samples": engine["distinct_samples"],
        "engine_materialised_components": engine["materialised_components"],
        "loop_seconds_measured": loop["seconds"], "loop_queries_timed": loop["queries_timed"],
        "loop_seconds_extrapolated": loop_total,
        "speedup_vs_loop": loop_total / engine["seconds"],
        "max_rel_error": max_rel, "max_rel_error_self": self_rel,
        "engine_peak_rss_mb": engine["peak_rss_mb"], "loop_peak_rss_mb": loop["peak_rss_mb"],
        "projection": proj, "projection_speedup_vs_trak": proj["speedup_vs_trak"],
        "table_rp_cosine_abs_error_mean": float(rp_cos_err.mean()),
        "table_rp_cosine_abs_error_max": float(rp_cos_err.max()),
    }
    print(f"engine: {engine['seconds']:.1f}s for {args.queries}x{args.k} ({engine['distinct_samples']} distinct samples), "
          f"peak RSS {engine['peak_rss_mb']:.0f} MiB")
    print(f"paper loop: {loop['seconds']:.1f}s for {loop['queries_timed']} queries -> {loop_total:.1f}s extrapolated "
          f"to {args.queries}, peak RSS {loop['peak_rss_mb']:.0f} MiB")
    print(f"speedup vs loop: {result['speedup_vs_loop']:.2f}x; largest relative difference: {max_rel:.2e} "
          f"(cross, normalised by norms), {self_rel:.2e} (self dots)")
    print(f"projection to {proj['dim']}: sketch {proj['sketch_seconds']:.2f}s vs TRAK BasicProjector "
          f"{proj['trak_seconds_extrapolated']:.1f}s (timed on {proj['trak_slice_dim']} of {proj['grad_dim']} coords, "
          f"extrapolated linearly) -> {proj['speedup_vs_trak']:.0f}x; distortion: pair dot mean "
          f"{proj['distortion_pair_mean']:.3f} max {proj['distortion_pair_max']:.3f} (of |a||b|), norm mean "
          f"{proj['distortion_norm_mean']:.3f} max {proj['distortion_norm_max']:.3f}; table rp cosine abs error mean "
          f"{result['table_rp_cosine_abs_error_mean']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
