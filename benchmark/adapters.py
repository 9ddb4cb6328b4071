"""``python -m benchmark.adapters``: every registered strategy through TRAK and Captum on a real model.

On the embedded model (or ``--model``), 32 training samples (originals of the embedded
dataset) and 8 queries (paraphrases of every fourth of them), each strategy x adapter cell
runs in a fresh process, so its peak RSS (VmHWM) is its own: ``ReducedTRAKer`` (featurize,
finalize, score) or ``ReducedTracInCP.influence``, with the adapters' default memory limit.
Hits = queries whose own original ranks first among the 32.  The engine's component table
of the same samples gives each fitted strategy its selection (an in-sample fit, the same
in every cell) and the engine's own hits for the strategy, which the adapters must match.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmark.peak import peak_rss_bytes
from selproj_plugin.errors import one_line

ADAPTERS = ("trak", "captum")
RSS_TARGET_GB = 4.0


@dataclass
class Cell:
    """One strategy x adapter measurement."""

    strategy: str
    adapter: str
    seconds: float | None = None
    peak_rss_bytes: int | None = None
    hits: int | None = None
    engine_hits: int | None = None
    queries: int = 0
    dim: int | None = None
    store_bytes: int = 0
    max_abs_diff: float | None = None  # to the engine's cosines, where the table scores the strategy
    components: list[str] | None = None
    error: str | None = None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from selproj_plugin.adapters._common import DEFAULT_MEMORY_LIMIT_GB

    p = argparse.ArgumentParser(prog="python -m benchmark.adapters", description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="all", help="comma-separated strategies (default: every registered one)")
    p.add_argument("--adapters", default=",".join(ADAPTERS), help="trak, captum or both (default %(default)s)")
    p.add_argument("--train", type=int, default=32, help="training samples (default %(default)s)")
    p.add_argument("--queries", type=int, default=8, help="queries, paraphrases of evenly spaced training samples")
    p.add_argument(
        "--memory-limit-gb",
        type=float,
        default=DEFAULT_MEMORY_LIMIT_GB,
        help="the adapters' memory limit, the whole process's (default %(default)s, their default)",
    )
    p.add_argument("--model", default=None, help="hub id or local path (default: the embedded model)")
    p.add_argument("--cache-dir", default=None, help="model cache (default $SELPROJ_CACHE or ~/.cache/selproj)")
    p.add_argument("--work-dir", default=None, help="where the temporary table and TRAK stores go (default: the system's)")
    p.add_argument("--json", default=None, help="also write the results here as JSON")
    p.add_argument("--stage", choices=("table", "cell"), help=argparse.SUPPRESS)
    p.add_argument("--cell", help=argparse.SUPPRESS)
    p.add_argument(
        "--table", default=None, help="the engine's table of the same samples: reused when the file exists, else built and kept there"
    )
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.train < 1 or not 1 <= args.queries <= args.train:
        p.error("need --train >= 1 and 1 <= --queries <= --train")
    if not args.memory_limit_gb > 0:
        p.error("--memory-limit-gb must be positive")
    return args


def samples(args: argparse.Namespace) -> tuple[list[Any], list[Any], np.ndarray]:
    """Training originals, query paraphrases and each query's original (index into training)."""
    from benchmark.data import load_dataset

    records = load_dataset(None, max_samples=args.train).records
    if len(records) < args.train:
        raise ValueError(f"the embedded dataset has {len(records)} samples, fewer than --train {args.train}")
    originals = np.arange(args.queries) * (args.train // args.queries)
    return [r.original for r in records], [records[i].paraphrase for i in originals], originals


def directory_bytes(path: str | os.PathLike) -> int:
    """Bytes allocated on disk under ``path`` (sparse files count what they hold)."""
    return sum(f.stat().st_blocks * 512 for f in Path(path).rglob("*") if f.is_file())


# ---- stage 1: the engine's component table of the same samples ---------------------------
def table_stage(args: argparse.Namespace, strategies: list[str]) -> None:
    from selproj_plugin.adapters._common import plan, resolve_reducer
    from selproj_plugin.components import catalogue
    from selproj_plugin.engine import EngineConfig, build_table
    from selproj_plugin.models import load_model
    from selproj_plugin.transforms import Transform

    model, tokenizer = load_model(args.model, cache=args.cache_dir)
    train, queries, originals = samples(args)
    # transforms a table cannot score from its dot products (projections): the engine stores their cosines
    stored = [
        t
        for t in (plan(model, resolve_reducer(name)).reduction.transform for name in strategies if not resolve_reducer(name).fitted)
        if type(t).on_table is Transform.on_table
    ]
    index = np.tile(np.arange(len(train)), (len(queries), 1))
    table = build_table(
        model,
        tokenizer,
        queries,
        train,
        index,
        originals,
        transforms=stored,
        config=EngineConfig(batch_size=2, progress=False, memory_limit_gb=1.0),
    )
    table.save(args.table)
    print(
        f"engine table: {len(queries)} queries x {len(train)} candidates x {len(catalogue(model))} components, "
        f"projections {[t.key for t in stored]}, {table.meta['timings']['total_s']:.0f} s",
        flush=True,
    )


def fitted_reducer(name: str, table: Any) -> Any:
    """The strategy with default options, fitted on the table when it learns (in-sample)."""
    from selproj_plugin.registry import get_strategy

    reducer = get_strategy(name)
    if reducer.fitted:
        reducer.fit(table)
    return reducer


def engine_similarity(reducer: Any, table: Any) -> np.ndarray | None:
    """[Q, N] cosines of the strategy from the engine's table, or None if the table cannot score it."""
    from selproj_plugin.strategies.base import ReducerError, reduction, table_similarity

    try:
        return table_similarity(reduction(reducer, table.component_list), table)
    except ReducerError:
        return None


# ---- stage 2: one adapter cell, in its own process -------------------------------------------
def cell_stage(args: argparse.Namespace) -> None:
    from selproj_plugin.models import load_model
    from selproj_plugin.table import ComponentTable

    strategy, adapter = args.cell.split(":")
    cell = Cell(strategy, adapter)
    model, tokenizer = load_model(args.model, cache=args.cache_dir)
    train, queries, originals = samples(args)
    table = ComponentTable.load(args.table)
    reducer = fitted_reducer(strategy, table)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="trak-store-") as store:
        if adapter == "trak":
            scores, cell.dim, cell.components, cell.store_bytes = run_trak(
                model, tokenizer, reducer, train, queries, store, args.memory_limit_gb
            )
        else:
            scores, cell.dim, cell.components = run_captum(model, tokenizer, reducer, train, queries, args.memory_limit_gb)
    cell.seconds = time.perf_counter() - start
    cell.peak_rss_bytes = peak_rss_bytes()
    cell.queries = len(queries)
    cell.hits = int(np.sum(np.argmax(scores, axis=1) == originals))
    expected = engine_similarity(reducer, table)
    if expected is not None:
        cell.engine_hits = int(np.sum(np.argmax(expected, axis=1) == originals))
        cell.max_abs_diff = float(np.abs(scores - expected).max())
    Path(args.out).write_text(json.dumps(asdict(cell)))


def run_trak(
    model: Any, tokenizer: Any, reducer: Any, train: list, queries: list, store: str, limit_gb: float
) -> tuple[np.ndarray, int, list[str], int]:
    from selproj_plugin.adapters.trak import ReducedTRAKer, encode

    traker = ReducedTRAKer(model, reducer, train_set_size=len(train), save_dir=store, memory_limit_gb=limit_gb)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(batch=encode(tokenizer, train), num_samples=len(train))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="queries", checkpoint=model.state_dict(), model_id=0, num_targets=len(queries))
    traker.score(batch=encode(tokenizer, queries), num_samples=len(queries))
    scores = traker.finalize_scores(exp_name="queries").T
    return np.asarray(scores, dtype=np.float64), traker.plan.dimension, traker.plan.reduction.names, directory_bytes(store)


def run_captum(model: Any, tokenizer: Any, reducer: Any, train: list, queries: list, limit_gb: float) -> tuple[np.ndarray, int, list[str]]:
    import warnings

    from selproj_plugin.adapters.captum import ReducedTracInCP, dataset, encode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that token ids take no gradient
        tracin = ReducedTracInCP(model, dataset(tokenizer, train), None, reducer, memory_limit_gb=limit_gb)
        scores = tracin.influence(encode(tokenizer, queries))
    return scores.detach().double().numpy(), tracin.dim, tracin.plan.reduction.names


# ---- the driver -------------------------------------------------------------------------------
def run_child(args: argparse.Namespace, extra: list[str]) -> subprocess.CompletedProcess:
    base = [
        sys.executable,
        "-m",
        "benchmark.adapters",
        "--train",
        str(args.train),
        "--queries",
        str(args.queries),
        "--memory-limit-gb",
        str(args.memory_limit_gb),
    ]
    for flag, value in (("--model", args.model), ("--cache-dir", args.cache_dir), ("--work-dir", args.work_dir)):
        if value:
            base += [flag, value]
    return subprocess.run(base + extra, capture_output=True, text=True)


def failure(done: subprocess.CompletedProcess) -> str:
    """One line on why a child failed: its error line, or the signal that killed it."""
    if done.returncode < 0:
        return f"killed by signal {-done.returncode} (out of memory?)"
    lines = [ln for ln in done.stderr.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    return lines[-1] if lines else f"exit code {done.returncode}"


def format_table(cells: list[Cell]) -> str:
    gb = 2**30
    rows = [
        "| strategy | adapter | dimension | seconds | peak RSS | hits (adapter) | hits (engine) | TRAK store |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        if c.error:
            rows.append(f"| {c.strategy} | {c.adapter} | | | | failed: {c.error} | | |")
            continue
        engine = f"{c.engine_hits}/{c.queries}" if c.engine_hits is not None else "n/a"
        store = f"{c.store_bytes / gb:.2f} GB" if c.adapter == "trak" else ""
        rows.append(
            f"| {c.strategy} | {c.adapter} | {c.dim:,} | {c.seconds:.0f} | {c.peak_rss_bytes / gb:.2f} GB "
            f"| {c.hits}/{c.queries} | {engine} | {store} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "cell":
        cell_stage(args)
        return 0
    from selproj_plugin.registry import get_strategy, list_strategies

    known = list(list_strategies())
    strategies = known if args.strategies == "all" else [s.strip() for s in args.strategies.split(",") if s.strip()]
    for name in strategies:
        get_strategy(name)  # unknown names: one-line error before any work
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    bad = [a for a in adapters if a not in ADAPTERS]
    if bad or not adapters:
        raise ValueError(f"unknown adapter {', '.join(bad) or repr(args.adapters)}; choose from {', '.join(ADAPTERS)}")
    if args.stage == "table":
        table_stage(args, strategies)
        return 0
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(dir=args.work_dir, prefix="selproj-adapters-")
    try:
        table = args.table or os.path.join(work, "table.npz")
        if os.path.isfile(table):
            print(f"engine table: {table} (reused)", flush=True)
        else:
            done = run_child(args, ["--stage", "table", "--table", table, "--strategies", ",".join(strategies)])
            if done.returncode:
                raise RuntimeError(f"building the engine table failed: {failure(done)}")
            print(done.stdout.strip(), flush=True)
        cells = []
        for strategy in strategies:
            for adapter in adapters:
                out = os.path.join(work, f"{strategy}-{adapter}.json")
                done = run_child(args, ["--stage", "cell", "--cell", f"{strategy}:{adapter}", "--table", table, "--out", out])
                cell = Cell(**json.loads(Path(out).read_text())) if done.returncode == 0 else Cell(strategy, adapter, error=failure(done))
                cells.append(cell)
                print(
                    f"{strategy} x {adapter}: "
                    + (
                        cell.error
                        or f"{cell.seconds:.0f} s, peak RSS "
                        f"{cell.peak_rss_bytes / 2**30:.2f} GB, hits {cell.hits}/{cell.queries} "
                        f"(engine {cell.engine_hits})"
                    ),
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    print(
        f"\n{args.train} training samples, {args.queries} queries, memory limit {args.memory_limit_gb} GB, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(format_table(cells))
    ok = [c for c in cells if not c.error]
    within = all(c.peak_rss_bytes <= RSS_TARGET_GB * 2**30 for c in ok)
    agree = all(c.hits == c.engine_hits for c in ok if c.engine_hits is not None)
    print(
        f"\nevery cell within {RSS_TARGET_GB:g} GB peak RSS: {'yes' if within and len(ok) == len(cells) else 'no'}; "
        f"adapter hits equal the engine's: {'yes' if agree else 'no'}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "train": args.train,
                    "queries": args.queries,
                    "memory_limit_gb": args.memory_limit_gb,
                    "model": args.model or "embedded",
                    "threads": torch.get_num_threads(),
                    "cells": [asdict(c) for c in cells],
                },
                indent=2,
            )
        )
    return 0 if len(ok) == len(cells) else 1


def cli(argv: Sequence[str] | None = None) -> int:
    """Errors become one line on stderr and exit code 2, never a traceback."""
    try:
        return main(argv)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
