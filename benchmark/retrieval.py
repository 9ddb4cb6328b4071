"""``python -m benchmark.retrieval``: which gradient reduction finds training data best.

With no ``--table`` it builds component tables from a model and a dataset (default: the
embedded SmolLM2-135M-Instruct and paraphrase dataset, offline, on CPU); with
``--table`` it scores stored tables (the paper's reference files or tables it wrote).
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmark.pipeline import SETTINGS, PipelineOptions, build_tables, parse_settings
from benchmark.report import format_setting, write_atomic, write_json
from selproj_plugin import distributed, scoring
from selproj_plugin.registry import get_strategy, list_strategies, plugin_errors
from selproj_plugin.strategies.base import StrategyResult
from selproj_plugin.table import ComponentTable


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmark.retrieval", description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="full,greedy,random_projection",
                   help="comma-separated registered strategy names, plugins included (default: %(default)s)")
    p.add_argument("--option", action="append", default=[], metavar="STRATEGY.KEY=VALUE",
                   help="strategy option, e.g. greedy.patience=3 (repeatable)")
    p.add_argument("--proj-dim", default=None,
                   help="random projection dimensions: counts or percentages of parameters, e.g. 4096,1%% (default 1%%)")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold held-out accuracy (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="write results as JSON")
    p.add_argument("--out", metavar="DIR", help="write JSON, plots, selection files and a Markdown report here")
    p.add_argument("--list-strategies", action="store_true", help="list registered strategies and exit")
    g = p.add_argument_group("stored tables")
    g.add_argument("--table", action="append", default=[], metavar="PATH",
                   help="score a stored component table (.npz) instead of building one; repeatable")
    g = p.add_argument_group("building tables")
    g.add_argument("--model", default=None, help="Hugging Face model id or local path (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dataset", default=None, help="local .jsonl/.json/.csv/.parquet or hub dataset (default: embedded)")
    g.add_argument("--setting", default=",".join(SETTINGS), help="paraphrased, generated or both (default: both)")
    g.add_argument("--max-samples", type=int, default=64, help="first N samples of the dataset (default 64; 0 = all)")
    g.add_argument("--candidates", type=int, default=5, help="BM25 top-k candidates per query (default 5)")
    g.add_argument("--full-set", action="store_true", help="every original is a candidate; adds MRR and recall@1/5/10")
    g.add_argument("--max-new-tokens", type=int, default=64, help="generation length for the generated setting")
    g.add_argument("--max-length", type=int, default=512, help="truncate longer samples (counted in the report)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--memory-limit-gb", type=float, default=6.0, help="gradient factors kept in RAM beyond this spill to disk (default 6; shared by the processes of a machine)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: torch's; torchrun gives 1). Runs with equal threads per "
                        "process give bit-identical results however many processes share the work")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--cache-dir", default=None, help="cache root (default $SELPROJ_CACHE or ~/.cache/selproj)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def parse_options(items: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``greedy.patience=3`` -> {"greedy": {"patience": 3}}; values are JSON when they parse."""
    options: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in items:
        key, sep, raw = item.partition("=")
        strategy, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise ValueError(f"--option {item!r} must look like STRATEGY.KEY=VALUE")
        if strategy not in options:
            raise ValueError(f"--option {item!r} names strategy {strategy!r}, which is not in --strategy")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[strategy][option] = value
    return options


def strategy_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--strategy names no strategy")
    return names


def baselines(table: ComponentTable) -> dict[str, float]:
    """The floors every strategy is read against: BM25's first candidate, chance, and the full gradient."""
    return {
        "bm25": float(np.mean(table.is_original[:, 0])),
        "chance": 1.0 / table.n_candidates,
        "full_gradient": scoring.accuracy(scoring.subset_similarity(table), table.is_original),
    }


def evaluate(table: ComponentTable, names: Sequence[str], options: dict[str, dict[str, Any]],
             proj_dims: Sequence[str], folds: int, seed: int, rank_metrics: bool = False) -> dict[str, StrategyResult]:
    """Every requested strategy on one table; random projection once per requested dimension."""
    results: dict[str, StrategyResult] = {}
    for name in names:
        runs = [(name, options.get(name, {}))]
        if name == "random_projection" and proj_dims:
            runs = [(name if len(proj_dims) == 1 else f"{name}@{d}", {**options.get(name, {}), "dim": d}) for d in proj_dims]
        for label, opts in runs:
            result = get_strategy(name, **opts).evaluate(table, folds=folds, seed=seed)
            result.name = label
            if rank_metrics:
                result.extra.update(scoring.rank_metrics(result.similarity, table.is_original))
            results[label] = result
    return results


def _peak_memory() -> dict[str, float]:
    peak = {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    try:
        import torch

        if torch.cuda.is_available():
            peak["cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    except ImportError:
        pass
    return peak


def _selection_files(out: Path, setting: str, results: dict[str, StrategyResult], identity: dict[str, Any]) -> list[str]:
    """One JSON per fitted selection, readable by ``get_strategy("greedy", selection=FILE)`` and the adapters."""
    written = []
    for name, result in results.items():
        if result.heldout_accuracy is None or not result.components:
            continue
        path = out / f"selection-{setting}-{name}.json"
        write_json(path, {"strategy": name, "setting": setting, "components": result.components,
                          "accuracy": result.accuracy, "heldout_accuracy": result.heldout_accuracy, **identity})
        written.append(path.name)
    return written


def _markdown(document: dict[str, Any], images: dict[str, list[str]]) -> str:
    lines = ["# selproj retrieval report", ""]
    ident = document.get("identity", {})
    if ident:
        lines += [f"Model `{ident.get('model')}`, dataset `{ident.get('dataset')}` "
                  f"({ident.get('dataset_samples')} samples), {document.get('date', '')}.", ""]
    for setting, section in document["settings"].items():
        lines += [f"## {setting}", "", "| strategy | accuracy | held-out | fidelity | params % | dim |",
                  "|---|---|---|---|---|---|"]
        for name, r in section["results"].items():
            held = "-" if r["heldout_accuracy"] is None else f"{r['heldout_accuracy']:.4f}"
            lines.append(f"| {name} | {r['accuracy']:.4f} | {held} | {r['fidelity']:.4f} | "
                         f"{100 * r['param_fraction']:.3f} | {r['dim']} |")
        for name, value in section["baselines"].items():
            lines.append(f"| {name} (baseline) | {value:.4f} | | | | |")
        lines.append("")
        lines += [f"![{img}]({img})" for img in images.get(setting, [])] + [""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = strategy_names(args.strategy)
    options = parse_options(args.option, names)
    for name in names:  # unknown names and options fail before any expensive work
        if not (name == "random_projection" and "dim" in options[name]):
            get_strategy(name, **options[name])
    proj_dims = [d.strip() for d in args.proj_dim.split(",") if d.strip()] if args.proj_dim else []
    if "random_projection" in names and not proj_dims and not args.table:
        proj_dims = ["1%"]
    started = time.perf_counter()
    document: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "settings": {}}
    if args.table:
        tables = {Path(p).stem: ComponentTable.load(p) for p in args.table}
        document["tables"] = {Path(p).stem: str(p) for p in args.table}
    else:
        settings = parse_settings(args.setting)
        built = build_tables(PipelineOptions(
            model=args.model, dataset=args.dataset, settings=settings,
            max_samples=args.max_samples or None, candidates=args.candidates, full_set=args.full_set,
            proj_dims=tuple(proj_dims), seed=args.seed, dtype=args.dtype, device=args.device,
            max_length=args.max_length, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            memory_limit_gb=args.memory_limit_gb, cache_dir=args.cache_dir, progress=not args.no_progress,
        ))
        tables = built.tables
        document.update(identity=built.identity, stages=dict(built.stages), notes=built.notes, run=built.run)
        if not distributed.is_main():  # rank 0 reports for everyone
            return document
    out = Path(args.out) if args.out else None
    images: dict[str, list[str]] = {}
    evaluate_start = time.perf_counter()
    for setting, table in tables.items():
        results = evaluate(table, names, options, proj_dims, args.folds, args.seed, rank_metrics=args.full_set)
        base = baselines(table)
        print(format_setting(setting, results, base, dict(zip(map(str, table.components), table.labels))), end="\n\n")
        section = {
            "queries": table.n_queries, "candidates": table.n_candidates, "components": table.n_components,
            "total_params": table.total_params, "results": {n: r.to_json() for n, r in results.items()},
            "baselines": base,
        }
        if out is not None:
            from benchmark import plots

            out.mkdir(parents=True, exist_ok=True)
            images[setting] = [
                plots.component_heatmap(table, out / f"components-{setting}.png", f"{setting}: each component alone").name,
                plots.greedy_path(results, base, out / f"greedy-{setting}.png", f"{setting}: greedy path").name,
            ]
            section["selection_files"] = _selection_files(out, setting, results, document.get("identity", {}))
        document["settings"][setting] = section
    document.setdefault("stages", {})["evaluate"] = round(time.perf_counter() - evaluate_start, 3)
    document["seconds"] = round(time.perf_counter() - started, 3)
    document["peak_memory"] = _peak_memory()
    document["results"] = next(iter(document["settings"].values()))["results"]
    if out is not None:
        write_json(out / "results.json", document)
        write_atomic(out / "report.md", _markdown(document, images))
        print(f"wrote {out}/report.md, results.json and plots")
    if args.json_out:
        write_json(args.json_out, document)
        print(f"wrote {args.json_out}")
    return document


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_strategies:
        for name, summary in list_strategies().items():
            print(f"{name:<22} {summary}")
        for plugin, error in plugin_errors().items():
            print(f"(plugin {plugin} disabled: {error})")
        return 0
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a launcher's stop runs cleanups (spill dirs)
    distributed.init_from_env(args.device)
    with distributed.session() as (rank, _):  # one rank's error stops every rank, with its message
        run(args)
    if rank != 0:
        return 0
    for plugin, error in plugin_errors().items():
        print(f"warning: plugin {plugin} disabled: {error}", file=sys.stderr)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors become one line on stderr and exit code 2, never a traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted: finished stages are cached and a rerun resumes from them", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, ImportError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
