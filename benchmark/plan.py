"""Plan the paper's benchmark from a model config alone: passes, memory and GPU-hours, no weights needed.

``python -m benchmark.plan`` plans AMD-OLMo-1B-SFT (``benchmark/configs/amd-olmo-1b-sft.json``: its
geometry, built on the ``meta`` device) on LIMA as the paper ran it: 988 queries in each of two settings,
5 BM25 candidates each (the paper's own candidate lists when ``../shared`` holds them, else the
original plus 4 random others).  LIMA's token lengths are not here: they are drawn from a log-normal
with the stated mean (LIMA: about 750K tokens over 1,000 examples), clipped to the model's context.
It prints the engine's plan (kept, spilled, recomputed samples, passes, host memory), the device
memory of one capture batch or query-centred group, the FLOPs, and GPU-hours at ``--tflops``,
beside the paper's own cost (its SLURM logs: 11-12.5 s a query on one H100, about 3 GPU-hours a setting).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

CONFIG = Path(__file__).resolve().parent / "configs" / "amd-olmo-1b-sft.json"
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "paper-olmo1b-lima" / "paraphrased.npz"
PAPER_SECONDS_PER_QUERY = (11.0, 12.5)  # the paper's logs: 626.83 s for 50 paraphrased queries, 1135.67 s for 99 generated
GiB = 2**30


def pair_graph(queries: int, k: int, seed: int) -> tuple[np.ndarray, str]:
    """[queries, k] candidate originals per query: the paper's lists when available, else original + random."""
    if REFERENCE.is_file() and queries <= 988:
        with np.load(REFERENCE) as ref:
            ids = {q: i for i, q in enumerate(ref["query_ids"])}
            rows = np.array([[ids[c] for c in row] for row in ref["candidate_ids"][:queries]])
        return rows[:, :k], "the paper's BM25 lists (../shared)"
    rng = np.random.default_rng(seed)
    rows = np.array([[q] + list(rng.choice(np.delete(np.arange(queries), q), k - 1, replace=False)) for q in range(queries)])
    return rows, "original + random others (../shared not found)"


def plan(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from selproj_plugin.capture import GradientCapture
    from selproj_plugin.components import catalogue
    from selproj_plugin.gram import MEMORY_BOUND_WEIGHT, choose_modes
    from selproj_plugin.budget import PAIR_CHUNK_BYTES, device_batch_tokens
    from selproj_plugin.planner import choose_order, factor_tensors, factor_widths, plan_pairs

    config = AutoConfig.for_model(**json.loads(Path(args.config).read_text()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    comps = catalogue(model)
    capture = GradientCapture(model, comps)
    specs = [capture.specs[c.name] for c in comps]
    rows, source = pair_graph(args.queries, args.k, args.seed)
    n_orig = int(rows.max()) + 1
    context = getattr(config, "max_position_embeddings", 2048)
    rng = np.random.default_rng(args.seed)
    sigma = args.length_sigma
    n_samples = n_orig + args.settings * args.queries  # originals, then each setting's queries
    lengths = np.clip(rng.lognormal(np.log(args.mean_tokens) - sigma**2 / 2, sigma, n_samples), 32, context).astype(int)
    targets = (lengths * args.response_share).astype(int)
    q_of = [n_orig + s * args.queries + q for s in range(args.settings) for q in range(args.queries)]
    c_of = np.concatenate([rows] * args.settings)
    n_pairs = n_samples + int(c_of.size)
    tensors = factor_tensors(capture)
    materialise = choose_modes(specs, lengths.tolist(), n_pairs, tensors)
    widths = factor_widths(capture, specs, sorted(materialise), tensors)
    params = sum(c.num_params for c in comps)
    model_bytes = params * 4
    resident = int(args.host_overhead_gb * GiB)  # interpreter, torch, CUDA context; the weights live on the GPU
    store_budget = max(0.0, args.memory_limit_gb * GiB - resident - 2 * PAIR_CHUNK_BYTES)
    free = max(0.0, args.device_memory_gb * GiB - model_bytes)
    device_budget = free / 2  # the engine's default share on CUDA
    if args.batch_tokens is None:  # as the engine sizes a batch on CUDA, from the memory the weights leave
        batch_tokens = device_batch_tokens(free, device_budget, widths.batch_bytes_per_token)
        batch_why = (
            f"half of the {free / GiB:.1f} GiB the weights leave less {device_budget / GiB:.1f} GiB for kept "
            f"factors, at {widths.batch_bytes_per_token / 2**20:.2f} MiB a token"
        )
    else:
        batch_tokens, batch_why = args.batch_tokens, "--batch-tokens"
    table = plan_pairs(
        lengths.tolist(),
        targets.tolist(),
        q_of,
        c_of,
        widths,
        store_budget=store_budget,
        device_budget=device_budget,
        spill_allowance=args.max_spill_gb * GiB,
        resident_bytes=resident,
        batch_tokens=batch_tokens,
    )
    table.materialise, table.batch_why = frozenset(materialise), batch_why
    table = choose_order(
        table,
        factor_widths(capture, specs, (), tensors),
        sum(s.rows * s.cols for s in specs),
        table.dot_flops(table.pair_weight(MEMORY_BOUND_WEIGHT)),
    )
    table.on_device = True
    device_bytes = table.device_bytes(model_bytes)
    flops = table.capture_flops() + table.dot_flops()
    hours = flops / (args.tflops * 1e12) / 3600
    paper = [s * args.queries * args.settings / 3600 for s in PAPER_SECONDS_PER_QUERY]
    # the paper's loop: per query, its gradient and each candidate's, batch size 1, weight gradients
    # computed (6 flops per weight and token), then one full-gradient dot per pair
    n = lengths.astype(np.float64)
    loop_flops = float(sum(6 * widths.matmul_params * (n[q] + n[c_of[i]].sum()) + 2 * params * args.k for i, q in enumerate(q_of)))
    return {
        "model": Path(args.config).stem,
        "parameters": params,
        "components": len(comps),
        "pair_graph": source,
        "queries_per_setting": args.queries,
        "settings": args.settings,
        "k": args.k,
        "lengths": {
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
            "assumed": f"log-normal, mean {args.mean_tokens}, sigma {sigma}, clipped to 32..{context}",
        },
        "factor_bytes_per_token": widths.per_token,
        "plan": table.summary(),
        "plan_text": table.describe(),
        "device_peak_bytes": device_bytes,
        "device_memory_gb": args.device_memory_gb,
        "fits_device": device_bytes <= args.device_memory_gb * GiB,
        "host_peak_bytes": table.peak_bytes,
        "host_memory_gb": args.memory_limit_gb,
        "total_flops": flops,
        "tflops_assumed": args.tflops,
        "gpu_hours": hours,
        "paper_loop_flops": loop_flops,
        "paper_loop_gpu_hours_at_same_tflops": loop_flops / (args.tflops * 1e12) / 3600,
        "paper_gpu_hours": paper,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(CONFIG), help="a model's config.json (default: AMD-OLMo-1B-SFT's geometry)")
    p.add_argument("--queries", type=int, default=988, help="queries per setting (default 988, the paper's)")
    p.add_argument("--settings", type=int, default=2, help="settings sharing the candidates (default 2)")
    p.add_argument("--k", type=int, default=5, help="candidates per query (default 5)")
    p.add_argument("--mean-tokens", type=float, default=750.0, help="mean tokens per sample (LIMA: about 750)")
    p.add_argument("--length-sigma", type=float, default=0.6, help="log-normal spread of the lengths")
    p.add_argument("--response-share", type=float, default=0.8, help="share of a sample's tokens that are trained")
    p.add_argument("--memory-limit-gb", type=float, default=86.0, help="host memory (default 86, the paper's jobs)")
    p.add_argument("--max-spill-gb", type=float, default=0.0, help="disk for kept factors (default 0: recompute)")
    p.add_argument("--host-overhead-gb", type=float, default=3.0, help="host memory the process holds besides factors")
    p.add_argument("--device-memory-gb", type=float, default=80.0)
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="padded tokens per capture batch (default: as the engine sizes it from the device's memory)",
    )
    p.add_argument(
        "--tflops", type=float, default=50.0, help="sustained throughput for GPU-hours (default 50: fp32 at about 75%% of an H100's 67)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the plan here")
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        print(f"error: model config {args.config} not found", file=sys.stderr)
        return 2
    out = plan(args)
    print(
        f"{out['model']}: {out['parameters']:,} parameters in {out['components']} components, "
        f"{out['factor_bytes_per_token'] / 2**20:.2f} MiB of factors per token"
    )
    print(
        f"{out['settings']} x {out['queries_per_setting']} queries x {out['k']} candidates ({out['pair_graph']}); "
        f"lengths {out['lengths']['assumed']} (mean {out['lengths']['mean']:.0f}, max {out['lengths']['max']})"
    )
    print(out["plan_text"])
    print(
        f"device: {out['device_peak_bytes'] / GiB:.1f} GiB of {out['device_memory_gb']:.0f} GiB "
        f"({'fits' if out['fits_device'] else 'does NOT fit'}: weights fp32 + kept factors held there (half of "
        f"what the weights leave) + the larger of a capture batch and a query-centred group's factors + pair buffers)"
    )
    print(f"engine: {out['total_flops'] / 1e15:.1f} PFLOP -> {out['gpu_hours']:.2f} GPU-hours at {args.tflops:.0f} TFLOP/s")
    print(
        f"the paper's loop: {out['paper_loop_flops'] / 1e15:.1f} PFLOP -> "
        f"{out['paper_loop_gpu_hours_at_same_tflops']:.2f} GPU-hours at the same throughput; as its logs measured it: "
        f"{out['paper_gpu_hours'][0]:.1f}-{out['paper_gpu_hours'][1]:.1f} GPU-hours on one H100"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in out.items() if k != "plan_text"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
