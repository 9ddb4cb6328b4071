"""``python -m benchmark.retrieval``: which gradient reduction finds training data best.

With ``--table`` it scores stored component tables (the paper's reference files or
tables this tool wrote); otherwise it builds them from a model and a dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmark.report import format_setting, write_json
from selproj_plugin.registry import get_strategy, list_strategies, plugin_errors
from selproj_plugin.strategies.base import StrategyResult
from selproj_plugin.table import ComponentTable


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmark.retrieval", description=__doc__.splitlines()[0])
    p.add_argument("--table", action="append", default=[], metavar="PATH",
                   help="score a stored component table (.npz); repeat for several settings")
    p.add_argument("--strategy", default="full,greedy,random_projection",
                   help="comma-separated registered strategy names (plugins included)")
    p.add_argument("--option", action="append", default=[], metavar="STRATEGY.KEY=VALUE",
                   help="strategy option, e.g. greedy.patience=3 (repeatable)")
    p.add_argument("--proj-dim", default=None,
                   help="random projection dimensions, counts or percentages of parameters: 4096,1%%")
    p.add_argument("--folds", type=int, default=5, help="k for held-out accuracy of fitted strategies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="write results as JSON")
    p.add_argument("--list-strategies", action="store_true", help="list registered strategies and exit")
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
    """BM25 (its first candidate) and chance, the floors every strategy is read against."""
    return {"bm25": float(np.mean(table.is_original[:, 0])), "chance": 1.0 / table.n_candidates}


def evaluate(table: ComponentTable, names: Sequence[str], options: dict[str, dict[str, Any]],
             proj_dims: Sequence[str], folds: int, seed: int) -> dict[str, StrategyResult]:
    """Every requested strategy on one table; random projection once per requested dimension."""
    results: dict[str, StrategyResult] = {}
    for name in names:
        runs = [(name, options.get(name, {}))]
        if name == "random_projection" and proj_dims:
            runs = [(name if len(proj_dims) == 1 else f"{name}@{d}", {**options.get(name, {}), "dim": d}) for d in proj_dims]
        for label, opts in runs:
            reducer = get_strategy(name, **opts)
            result = reducer.evaluate(table, folds=folds, seed=seed)
            result.name = label
            results[label] = result
    return results


def run_tables(args: argparse.Namespace, names: list[str], options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    proj_dims = [d.strip() for d in args.proj_dim.split(",")] if args.proj_dim else []
    document: dict[str, Any] = {"settings": {}}
    for path in args.table:
        start = time.perf_counter()
        table = ComponentTable.load(path)
        setting = Path(path).stem
        results = evaluate(table, names, options, proj_dims, args.folds, args.seed)
        base = baselines(table)
        print(format_setting(setting, results, base), end="\n\n")
        document["settings"][setting] = {
            "table": str(path), "queries": table.n_queries, "candidates": table.n_candidates,
            "components": table.n_components, "total_params": table.total_params,
            "results": {n: r.to_json() for n, r in results.items()}, "baselines": base,
            "seconds": time.perf_counter() - start,
        }
    first = next(iter(document["settings"].values()))
    document["results"] = first["results"]
    return document


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_strategies:
        for name, summary in list_strategies().items():
            print(f"{name:<22} {summary}")
        for plugin, error in plugin_errors().items():
            print(f"(plugin {plugin} disabled: {error})")
        return 0
    names = strategy_names(args.strategy)
    options = parse_options(args.option, names)
    for name in names:  # fail fast on unknown names and options, before any work
        if not (name == "random_projection" and "dim" in options[name]):
            get_strategy(name, **options[name])
    if not args.table:  # until the model pipeline lands: the paper's reference tables
        ref = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "paper-olmo1b-lima"
        args.table = [str(ref / "paraphrased.npz"), str(ref / "model_generated.npz")]
    document = run_tables(args, names, options)
    for plugin, error in plugin_errors().items():
        print(f"warning: plugin {plugin} disabled: {error}", file=sys.stderr)
    if args.json_out:
        write_json(args.json_out, document)
        print(f"wrote {args.json_out}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors become one line on stderr and exit code 2, never a traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted; finished stages are cached and a rerun resumes", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
