"""``python -m benchmark.retrieval``: which gradient reduction finds training data best.

With no ``--table`` it builds component tables from a model and a dataset (default: the
embedded SmolLM2-135M-Instruct and paraphrase dataset, offline, on CPU); with
``--table`` it scores stored tables (the paper's reference files or tables it wrote).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmark import checkpoints as study, settings_cli
from benchmark.finetune import FinetuneSettings, add_arguments as add_finetune_arguments, settings_from_args
from benchmark.peak import peak_rss_bytes
from benchmark.pipeline import (
    PROJECTION_STRATEGIES,
    SETTINGS,
    PipelineOptions,
    Run,
    build_tables,
    parse_settings,
    strategy_runs,
)
from benchmark.report import METHODS, Baseline, ci_text, format_setting, headline, vs_full_text, write_atomic, write_json
from selproj_plugin import distributed, progress, scoring, stats
from selproj_plugin.components import COMPONENT_SETS, PAPER_KINDS
from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.errors import one_line
from selproj_plugin.registry import (
    convert_options,
    get_strategy_class,
    list_strategies,
    plugin_errors,
    plugin_names,
)
from selproj_plugin.strategies.base import Similarity
from selproj_plugin.strategies.base import StrategyResult
from selproj_plugin.table import ComponentTable


# EngineConfig's fields a run sets from the command line (the memory limit is the machine's)
ENGINE_OPTIONS = ("max_length", "batch_size", "memory_limit_gb", "max_spill_gb", "dot_order", "device")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``, exit 2) like every other error here."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m benchmark.retrieval", description=__doc__.splitlines()[0])
    p.add_argument(
        "--strategy",
        default="full,greedy,random_projection",
        help="comma-separated registered strategy names, plugins included (default: %(default)s)",
    )
    p.add_argument(
        "--option", action="append", default=[], metavar="STRATEGY.KEY=VALUE", help="strategy option, e.g. greedy.patience=3 (repeatable)"
    )
    p.add_argument(
        "--proj-dim", default=None, help="random projection dimensions: counts or percentages of parameters, e.g. 4096,1%% (default 1%%)"
    )
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold held-out accuracy (default 5)")
    settings_cli.add_arguments(p, PipelineOptions, ("seed",))
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="write results as JSON")
    p.add_argument("--out", metavar="DIR", help="write JSON, plots, selection files and a Markdown report here")
    p.add_argument(
        "--list-strategies", action="store_true", help="list registered strategies with their options, defaults and plugin names, and exit"
    )
    p.add_argument(
        "--list-components",
        action="store_true",
        help="list the model's components (name, label, kind, layer, parameters) and exit; with --model",
    )
    g = p.add_argument_group("stored tables")
    g.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="PATH",
        help="score a stored component table (.npz) instead of building one; repeatable",
    )
    g = p.add_argument_group("building tables")
    settings_cli.add_arguments(g, PipelineOptions, ("model", "dataset"))
    g.add_argument("--setting", default=",".join(SETTINGS), help="paraphrased, generated or both (default: both)")
    settings_cli.add_arguments(g, PipelineOptions, ("max_samples", "candidates"))
    g.add_argument("--full-set", action="store_true", help="every original is a candidate; adds MRR and recall@1/5/10")
    g.add_argument(
        "--no-pool-ranking",
        action="store_true",
        help="skip the whole-pool ranking (MRR and recall@1/5/10 over every original, beside top-1 of "
        "--candidates): the table then holds only the BM25 candidates' dot products",
    )
    g.add_argument(
        "--components",
        default=None,
        choices=COMPONENT_SETS,
        help="component set of the gradient: paper (default: the embedding and the attention and MLP "
        "weight matrices, as the paper) or all (norms and biases too)",
    )
    settings_cli.add_arguments(g, PipelineOptions, ("max_new_tokens",))
    settings_cli.add_arguments(g, EngineConfig, ENGINE_OPTIONS, notes={"memory_limit_gb": "here the machine's, shared by its processes"})
    g.add_argument(
        "--plan",
        action="store_true",
        help="print what building the table would do (kept, spilled and recomputed samples, passes, "
        "predicted peak memory, capture FLOPs) and exit before any gradient",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per process (default: torch's; torchrun gives 1). Runs with equal threads per "
        "process give bit-identical results however many processes share the work",
    )
    settings_cli.add_arguments(g, PipelineOptions, ("dtype",))
    g.add_argument("--cache-dir", default=None, help="cache root (default $SELPROJ_CACHE or ~/.cache/selproj)")
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bars: a log line as each phase starts and one as it ends, for a log file"
    )
    add_finetune_arguments(p)
    return p.parse_args(argv)


def parse_options(items: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``greedy.patience=3`` -> {"greedy": {"patience": 3}}: each value converted to its option's type."""
    raw: dict[str, dict[str, str]] = {n: {} for n in names}
    for item in items:
        key, sep, value = item.partition("=")
        strategy, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise ValueError(f"--option {item!r} must look like STRATEGY.KEY=VALUE")
        if strategy not in raw:
            raise ValueError(f"--option {item!r} names strategy {strategy!r}, which is not in --strategy")
        raw[strategy][option] = value
    return {name: convert_options(name, values) if values else {} for name, values in raw.items()}


def print_strategies() -> None:
    """Each registered strategy: name, plugin (for SELPROJ_DISABLE_PLUGINS), summary, options with defaults."""
    owners = plugin_names()
    for name, summary in list_strategies().items():
        print(f"{name}  [plugin: {owners[name]}]\n    {summary}")
        for option, default in get_strategy_class(name).options().items():
            print(f"    --option {name}.{option}={'' if default is None else default}")
    for plugin, errors in plugin_errors().items():
        print(f"(plugin {plugin} disabled: {'; '.join(errors)})")


def print_components(model: str | None, scope: str) -> None:
    """The catalogue ``select`` receives: one component a line, with the label reports use."""
    from selproj_plugin.components import catalogue
    from selproj_plugin.models import load_model

    loaded, _ = load_model(model)
    comps = catalogue(loaded, scope)
    print(f"{'label':<12} {'kind':<8} {'layer':>5} {'parameters':>12}  name")
    for c in comps:
        print(f"{c.label:<12} {c.kind:<8} {'-' if c.layer is None else c.layer:>5} {c.num_params:>12,}  {c.name}")
    print(f"{len(comps)} components, {sum(c.num_params for c in comps):,} parameters (component set {scope!r})")


def strategy_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--strategy names no strategy")
    return names


def rank_figures(similarity: np.ndarray, is_original: np.ndarray, seed: int, basis: str) -> dict[str, Any]:
    """MRR and recall@1/5/10 with 95% intervals (full-set runs), and which similarities they come from."""
    out: dict[str, Any] = {"rank_basis": basis}
    for name, credits in scoring.rank_credits(similarity, is_original).items():
        out[name] = float(np.mean(credits))
        out[f"{name}_ci"] = list(stats.bootstrap_ci(credits, seed) if name == "mrr" else stats.proportion_ci(credits))
    return out


def baselines(table: ComponentTable, bm25: np.ndarray | None = None, seed: int = 0, full_set: bool = False) -> dict[str, Baseline]:
    """The floors every strategy is read against: BM25, chance, and the full gradient.

    ``bm25`` holds BM25's score of each candidate [Q, K] (the benchmark computes it): BM25's
    own top-1, ties credited, over the candidates or, with ``--full-set``, the whole pool.  A
    stored table has no scores but lists its candidates in BM25 order, so BM25's hit is its first.
    """
    full = scoring.hits(scoring.subset_similarity(table), table.is_original)
    if bm25 is None:
        bm25_hits, basis = table.is_original[:, 0].astype(np.float64), "first candidate (stored tables list BM25's top-k in order)"
    else:
        bm25_hits = scoring.hits(bm25, table.is_original)
        basis = "BM25 scores over the whole pool" if full_set else "BM25 scores of the candidates"
    out = {
        "bm25": Baseline(
            "bm25", float(np.mean(bm25_hits)), basis, stats.proportion_ci(bm25_hits), stats.paired_test(bm25_hits, full, seed)
        ),
        "chance": Baseline("chance", 1.0 / table.n_candidates, "1 / candidates"),
        "full_gradient": Baseline("full_gradient", float(np.mean(full)), "every component of the table", stats.proportion_ci(full)),
    }
    if full_set and bm25 is not None:
        out["bm25"].ranks = rank_figures(bm25, table.is_original, seed, basis)
    return out


def evaluate(
    table: ComponentTable, runs: Sequence[Run], folds: int, seed: int, rank_metrics: bool = False, similarity: Similarity | None = None
) -> dict[str, StrategyResult]:
    """Every requested run on one table (``similarity``: cosines from gradients, for transforms a table cannot express).

    With ``rank_metrics`` (full-set runs) a fitted strategy's MRR and recall@k are held-out, like its accuracy.
    """
    results: dict[str, StrategyResult] = {}
    for run in runs:
        result = run.reducer().evaluate(table, folds=folds, seed=seed, similarity=similarity)
        result.name = run.label
        if rank_metrics:
            held = result.heldout_similarity
            sim, basis = (result.similarity, stats.NOT_FITTED) if held is None else (held, stats.HELD_OUT)
            result.extra.update(rank_figures(sim, table.is_original, seed, basis))
        results[run.label] = result
    return results


def component_set(table: ComponentTable) -> str:
    """The component set a table was built with (recorded by the engine; else judged by its kinds)."""
    return str(table.meta.get("component_set") or ("paper" if set(map(str, table.kinds)) <= PAPER_KINDS else "all"))


def _peak_memory() -> dict[str, float]:
    peak = {"rss_gb": peak_rss_bytes() / 2**30}
    try:
        import torch

        if torch.cuda.is_available():
            peak["cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    except ImportError:
        pass
    return peak


def _selection_files(
    out: Path, setting: str, results: dict[str, StrategyResult], table: ComponentTable, identity: dict[str, Any]
) -> list[str]:
    """One JSON per fitted selection: readable by ``get_strategy("greedy", selection=FILE)`` and the adapters,
    with the same components as module names, parameter names and globs for other tools (``export``)."""
    from selproj_plugin.components import resolve
    from selproj_plugin.export import selection_export

    written = []
    for name, result in results.items():
        if result.heldout_accuracy is None or not result.components:
            continue
        path = out / f"selection-{setting}-{name}.json"
        catalogue = table.component_list
        write_json(
            path,
            {
                "strategy": name,
                "setting": setting,
                "components": result.components,
                "accuracy": result.accuracy,
                "heldout_accuracy": result.heldout_accuracy,
                "heldout_accuracy_ci": result.heldout_accuracy_ci,
                "export": selection_export(resolve(catalogue, result.components), catalogue),
                **identity,
            },
        )
        written.append(path.name)
    return written


def _markdown(document: dict[str, Any], images: dict[str, list[str]]) -> str:
    lines = ["# selproj retrieval report", ""]
    ident = document.get("identity", {})
    if ident:
        lines += [
            f"Model `{ident.get('model')}`, dataset `{ident.get('dataset')}` "
            f"({ident.get('dataset_samples')} samples), {document.get('date', '')}.",
            "",
        ]
    lines += [f"- **{key}**: {text}" for key, text in document["methods"].items()] + [""]
    for setting, section in document["settings"].items():
        lines += [
            f"## {setting}",
            "",
            f"{section['queries']} queries x {section['candidates']} candidates; component set "
            f"`{section['component_set']}` ({section['components']} components).",
            "",
            "| strategy | accuracy | 95% CI | scored | in-sample (95% CI) | vs full | fidelity | params % | dim |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in section["results"].items():
            value, interval, basis = headline(r)
            sample = f"{r['accuracy']:.4f} {ci_text(r['accuracy_ci'], False)}" if basis == stats.HELD_OUT else ""
            lines.append(
                f"| {name} | **{value:.4f}** | {ci_text(interval, False)} | {basis} | "
                f"{sample} | {vs_full_text(r['vs_full'], False)} | {r['fidelity']:.4f} | "
                f"{100 * r['param_fraction']:.3f} | {r['dim']} |"
            )
        for name, b in section["baselines"].items():
            lines.append(
                f"| {name} (baseline) | {b['accuracy']:.4f} | {ci_text(b['accuracy_ci'], False)} | | | "
                f"{vs_full_text(b['vs_full'], False)} | | | |"
            )
        lines.append("")
        for name, r in section["results"].items():
            if r.get("path"):
                lines += [
                    f"{name} path (in-sample; *tied*: components that shared the step's best objective, "
                    "ranked by mean margin, then model order):",
                    "",
                    "| step | component | accuracy | 95% CI | mean margin | tied |",
                    "|---|---|---|---|---|---|",
                ]
                lines += [
                    f"| {i} | `{step['component']}` | {step['accuracy']:.4f} | {ci_text(step['accuracy_ci'], False)} | "
                    f"{step['margin']:.4f} | {step['tied']} |"
                    for i, step in enumerate(r["path"], 1)
                ]
                lines.append("")
            elif "tied" in r:
                lines += [f"{name}: picked among {r['tied']} components tied on the best accuracy, by mean margin.", ""]
        if "pool" in section:
            pool = section["pool"]
            lines += [
                f"Whole pool: every original ranked for each query ({pool['queries']} x {pool['candidates']}); "
                "fitted strategies selected on the other folds with the whole pool as candidates.",
                "",
                "| ranking | MRR | 95% CI | recall@1 | recall@5 | recall@10 | basis |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, r in list(pool["results"].items()) + [(f"{n} (baseline)", b) for n, b in pool["baselines"].items()]:
                lines.append(
                    f"| {name} | {r['mrr']:.4f} | {ci_text(r['mrr_ci'], False)} | {r['recall@1']:.4f} | "
                    f"{r['recall@5']:.4f} | {r['recall@10']:.4f} | {r['rank_basis']} |"
                )
            lines.append("")
        study_part = document.get("checkpoints", {}).get("settings", {}).get(setting)
        if study_part and "per_checkpoint" in study_part:
            steps = document["checkpoints"]["steps"]
            lines += [
                f"Checkpoints (0: the base model) at steps {', '.join(map(str, steps))}: headline accuracy "
                "(held-out for fitted strategies) with 95% intervals.",
                "",
                "| strategy | " + " | ".join(f"ckpt {i}" for i in range(len(steps))) + " |",
                "|---|" + "---|" * len(steps),
            ]
            for name in study_part["per_checkpoint"][0]["results"]:
                cells = []
                for part in study_part["per_checkpoint"]:
                    r = part["results"][name]
                    value, ci, _ = headline(r)
                    cells.append(f"{value:.4f} {ci_text(ci, False)}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
            for name, m in study_part["transfer"].items():
                lines += [
                    f"{name}: transfer matrix (row: selection fitted at, column: held-out accuracy at) and "
                    "Jaccard overlap of the selections.",
                    "",
                    "| fitted at | "
                    + " | ".join(f"at {j}" for j in range(len(steps)))
                    + " | "
                    + " | ".join(f"J {j}" for j in range(len(steps)))
                    + " |",
                    "|---|" + "---|" * (2 * len(steps)),
                ]
                lines += [
                    f"| {i} | "
                    + " | ".join(f"{v:.4f}" for v in row)
                    + " | "
                    + " | ".join(f"{v:.2f}" for v in study_part["jaccard"][name][i])
                    + " |"
                    for i, row in enumerate(m["accuracy"])
                ]
                lines.append("")
            if study_part["tracin"]:
                lines += [
                    "TracIn over the checkpoints (learning-rate-weighted sums of each checkpoint's dot "
                    "products), tested against the last checkpoint's full gradient:",
                    "",
                    "| strategy | accuracy | 95% CI | scored | vs full |",
                    "|---|---|---|---|---|",
                ]
                for name, r in study_part["tracin"].items():
                    value, ci, basis = headline(r)
                    lines.append(f"| {name} | {value:.4f} | {ci_text(ci, False)} | {basis} | {vs_full_text(r['vs_full'], False)} |")
                lines.append("")
        lines += [f"![{img}]({img})" for img in images.get(setting, [])] + [""]
    ft = document.get("finetune")
    if ft and ft.get("epochs"):
        lines += [
            "## fine-tune",
            "",
            f"{ft['epochs']} epoch(s) at learning rate {ft['lr']:g} (AdamW, batch {ft['batch_size']}, "
            f"{ft['steps']} steps) on {ft['samples']} originals, from weights `{ft['base_weights']}`.",
            "",
            "| mean loss | before | after | drop |",
            "|---|---|---|---|",
        ]
        lines += [f"| {k} | {ft['loss_before'][k]:.4f} | {ft['loss_after'][k]:.4f} | {ft['loss_drop'][k]:.4f} |" for k in ft["loss_before"]]
        lines.append("")
    return "\n".join(lines)


def format_finetune(record: dict[str, Any]) -> str:
    """The fine-tune in one line: what it trained, and the mean loss before and after on originals and paraphrases."""
    before, after = record["loss_before"], record["loss_after"]
    losses = "; ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in before)
    cached = ", reused from the cache" if record.get("reused") else ""
    return (
        f"fine-tune: {record['steps']} steps on {record['samples']} originals ({record['epochs']} epoch(s), lr "
        f"{record['lr']:g}{cached}); mean loss {losses}"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = strategy_names(args.strategy)
    options = parse_options(args.option, names)
    proj_dims = [d.strip() for d in args.proj_dim.split(",") if d.strip()] if args.proj_dim else []
    if any(n in PROJECTION_STRATEGIES for n in names) and not proj_dims and not args.table:
        proj_dims = ["1%"]
    runs = strategy_runs(names, options, proj_dims)
    for r in runs:  # unknown names and bad options fail before any expensive work
        r.reducer()
    started = time.perf_counter()
    document: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "methods": METHODS, "settings": {}}
    bm25: dict[str, np.ndarray] = {}
    gradient_similarity: dict[str, Similarity] = {}  # --table mode has no gradients
    if args.table:
        if args.components:
            raise ValueError("--components applies when building tables; a stored table keeps the component set it was built with")
        tables = {
            f"{Path(p).stem}-{name}" if name else Path(p).stem: part
            for p in args.table
            for name, part in ComponentTable.load(p).parts().items()
        }
        document["tables"] = {Path(p).stem: str(p) for p in args.table}
    else:
        settings = parse_settings(args.setting)
        built = build_tables(
            PipelineOptions(
                model=args.model,
                dataset=args.dataset,
                settings=settings,
                max_samples=args.max_samples or None,
                candidates=args.candidates,
                full_set=args.full_set,
                runs=tuple(runs),
                scope=args.components or "paper",
                seed=args.seed,
                dtype=args.dtype,
                engine=engine_settings(args),
                max_new_tokens=args.max_new_tokens,
                plan_only=args.plan,
                pool_ranking=not args.no_pool_ranking,
                finetune=finetune_settings(args),
                cache_dir=args.cache_dir,
            )
        )
        if args.plan:
            if distributed.is_main():  # every rank plans alike (each must, for its share); rank 0 reports
                print(built.plan.describe())
                if args.json_out:
                    write_json(args.json_out, {"identity": built.identity, "plan": built.plan.summary()})
            return {"plan": built.plan.summary()}
        tables, bm25, gradient_similarity = built.tables, built.bm25, built.similarity
        document.update(identity=built.identity, stages=dict(built.stages), notes=built.notes, run=built.run)
        if built.finetune is not None:
            document["finetune"] = built.finetune
        if not distributed.is_main():  # rank 0 reports for everyone
            return document
        if built.finetune and built.finetune.get("epochs"):
            print(format_finetune(built.finetune), end="\n\n")
    out = Path(args.out) if args.out else None
    images: dict[str, list[str]] = {}
    evaluate_start = time.perf_counter()
    for setting, table in tables.items():
        results = evaluate(table, runs, args.folds, args.seed, rank_metrics=args.full_set, similarity=gradient_similarity.get(setting))
        base = baselines(table, bm25.get(setting), args.seed, full_set=args.full_set)
        print(format_setting(setting, results, base, dict(zip(map(str, table.components), table.labels))), end="\n\n")
        section = {
            "queries": table.n_queries,
            "candidates": table.n_candidates,
            "components": table.n_components,
            "component_set": component_set(table),
            "total_params": table.total_params,
            "results": {n: r.to_json() for n, r in results.items()},
            "baselines": {n: b.to_json() for n, b in base.items()},
        }
        if out is not None:
            from benchmark import plots

            out.mkdir(parents=True, exist_ok=True)
            images[setting] = [plots.component_heatmap(table, out / f"components-{setting}.png", f"{setting}: each component alone").name]
            if any(r.path for r in results.values()):  # only greedy strategies have a path to draw
                images[setting].append(plots.greedy_path(results, base, out / f"greedy-{setting}.png", f"{setting}: greedy path").name)
            section["selection_files"] = _selection_files(out, setting, results, table, document.get("identity", {}))
        if not args.table and setting in built.pool_tables:
            section["pool"] = pool_section(
                built.pool_tables[setting], built.pool_bm25[setting], runs, args.folds, args.seed, built.pool_similarity.get(setting)
            )
            print(format_pool(setting, section["pool"]), end="\n\n")
        document["settings"][setting] = section
    if not args.table and built.checkpoints:
        document["checkpoints"] = checkpoint_study(built.checkpoints, runs, args.folds, args.seed)
        print(format_checkpoints(document["checkpoints"]), end="\n\n")
        if out is not None:
            from benchmark import plots

            for setting, part in document["checkpoints"]["settings"].items():
                if "skipped" in part:  # generated queries differ by checkpoint: no study to draw
                    continue
                images.setdefault(setting, []).append(
                    plots.accuracy_by_checkpoint(
                        part, document["checkpoints"]["steps"], out / f"checkpoints-{setting}.png", f"{setting}: accuracy by checkpoint"
                    ).name
                )
                for name, matrix in part["transfer"].items():
                    images[setting].append(
                        plots.transfer_heatmap(
                            matrix["accuracy"],
                            document["checkpoints"]["steps"],
                            out / f"transfer-{setting}-{name}.png",
                            f"{setting}: {name} fitted at i, held-out at j",
                        ).name
                    )
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


def engine_settings(args: argparse.Namespace) -> EngineConfig:
    """The engine settings the options give (the memory limit is the machine's: the pipeline shares it out)."""
    return settings_cli.from_args(args, EngineConfig, progress=not args.no_progress)


def finetune_settings(args: argparse.Namespace) -> FinetuneSettings:
    """The fine-tune the options ask for: the embedded model trains by default, a given model is used as given."""
    return settings_from_args(args, epochs_default=None if args.model is None else 0)


RANK_KEYS = ("mrr", "recall@1", "recall@5", "recall@10")


def _ranks(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k.split("_ci")[0] in RANK_KEYS or k == "rank_basis"}


def pool_section(
    table: ComponentTable, bm25: np.ndarray, runs: Sequence[Run], folds: int, seed: int, similarity: Similarity | None
) -> dict[str, Any]:
    """Every strategy, the full gradient and BM25 ranked over the whole pool: MRR and recall@1/5/10 with intervals
    (a fitted strategy's held-out: selected on the other folds with the whole pool as candidates)."""
    results = evaluate(table, runs, folds, seed, rank_metrics=True, similarity=similarity)
    full = scoring.subset_similarity(table)
    return {
        "candidates": table.n_candidates,
        "queries": table.n_queries,
        "results": {name: _ranks(r.extra) for name, r in results.items()},
        "baselines": {
            "bm25": rank_figures(bm25, table.is_original, seed, "BM25 scores over the whole pool"),
            "full_gradient": rank_figures(full, table.is_original, seed, "every component of the table"),
        },
    }


def format_pool(setting: str, pool: dict[str, Any]) -> str:
    lines = [
        f"== {setting}: whole pool ({pool['queries']} queries x {pool['candidates']} originals) ==",
        f"{'ranking':<26} {'MRR':>6} {'95% CI':>13} {'R@1 %':>6} {'R@5 %':>6} {'R@10 %':>6}  basis",
    ]
    rows = list(pool["results"].items()) + [(f"{n} (baseline)", b) for n, b in pool["baselines"].items()]
    for name, r in rows:
        lines.append(
            f"{name:<26} {r['mrr']:6.3f} {ci_text(r['mrr_ci'], False):>13} {100 * r['recall@1']:6.1f} "
            f"{100 * r['recall@5']:6.1f} {100 * r['recall@10']:6.1f}  {r['rank_basis']}"
        )
    return "\n".join(lines)


def checkpoint_study(checkpoints: Sequence[Any], runs: Sequence[Run], folds: int, seed: int) -> dict[str, Any]:
    """Per checkpoint every strategy's results; per fitted strategy the transfer matrix and the Jaccard overlap
    of its selections; and the TracIn rows (each strategy on the learning-rate-weighted sum of the checkpoints'
    tables), tested against the last checkpoint's full gradient."""
    doc: dict[str, Any] = {
        "steps": [c.checkpoint_info["step"] for c in checkpoints],
        "lr": [c.checkpoint_info["lr"] for c in checkpoints],
        "weights": [c.identity["weights"] for c in checkpoints],
        "settings": {},
    }
    for setting in checkpoints[-1].tables:
        tables = [c.tables.get(setting) for c in checkpoints]
        if any(t is None for t in tables):
            continue
        if setting == "generated":  # same ids, other texts: each checkpoint answers the prompts itself
            doc["settings"][setting] = {
                "skipped": "each checkpoint generates its own queries, so no query is the same sample at every checkpoint"
            }
            continue
        try:
            study.check_aligned(tables)
        except ValueError as exc:  # generated queries differ by checkpoint (each model answers its own)
            doc["settings"][setting] = {"skipped": str(exc)}
            continue
        per = []
        for c, table in zip(checkpoints, tables):
            results = evaluate(table, runs, folds, seed, similarity=c.similarity.get(setting))
            per.append(
                {
                    "step": c.checkpoint_info["step"],
                    "queries": table.n_queries,
                    "results": {n: r.to_json() for n, r in results.items()},
                    "baselines": {n: b.to_json() for n, b in baselines(table, c.bm25.get(setting), seed).items()},
                }
            )
        fitted = [r for r in runs if r.reducer().fitted]
        part: dict[str, Any] = {"per_checkpoint": per, "transfer": {}, "jaccard": {}}
        for r in fitted:
            part["transfer"][r.label] = study.transfer_matrix(tables, r.reducer, folds, seed)
            part["jaccard"][r.label] = study.jaccard_matrix([p["results"][r.label]["components"] for p in per])
        tracin = study.tracin_table(tables, doc["lr"])
        full_hits = scoring.hits(scoring.subset_similarity(tables[-1]), tables[-1].is_original)
        rows = {}
        for r in runs:
            try:
                result = r.reducer().evaluate(tracin, folds=folds, seed=seed)
            except ValueError:  # a transform the summed table cannot express (projections are per checkpoint)
                continue
            held = result.heldout_similarity
            credits = result.hits if held is None else scoring.hits(held, tracin.is_original)
            result.vs_full = stats.paired_test(credits, full_hits, seed=seed, basis=stats.NOT_FITTED if held is None else stats.HELD_OUT)
            rows[f"tracin:{r.label}"] = result.to_json()
        part["tracin"] = rows
        doc["settings"][setting] = part
    return doc


def format_checkpoints(doc: dict[str, Any]) -> str:
    lines = [f"== checkpoints at steps {doc['steps']} =="]
    for setting, part in doc["settings"].items():
        if "skipped" in part:
            lines.append(f"{setting}: no checkpoint study ({part['skipped']})")
            continue
        names = list(part["per_checkpoint"][0]["results"])
        lines.append(f"{setting}: headline accuracy % by checkpoint (held-out for fitted strategies)")
        for name in names:
            cells = []
            for p in part["per_checkpoint"]:
                value, ci, _ = headline(p["results"][name])
                cells.append(f"{100 * value:5.1f} {ci_text(ci)}")
            lines.append(f"  {name:<24} " + " | ".join(cells))
        for name, m in part["transfer"].items():
            lines.append(
                f"  {name} transfer (row: fitted at, column: scored at, held-out %): "
                + "; ".join(" ".join(f"{100 * v:5.1f}" for v in row) for row in m["accuracy"])
            )
            lines.append(
                f"  {name} Jaccard of selections: " + "; ".join(" ".join(f"{v:.2f}" for v in row) for row in part["jaccard"][name])
            )
        for name, r in part["tracin"].items():
            value, ci, basis = headline(r)
            lines.append(f"  {name:<24} {100 * value:5.1f} {ci_text(ci)} {basis}, vs full (last checkpoint) {vs_full_text(r['vs_full'])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_strategies:
        print_strategies()
        return 0
    if args.list_components:
        print_components(args.model, args.components or "paper")
        return 0
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    # before the model loads or a sample is generated, not after minutes of work
    if args.max_spill_gb is not None and not args.max_spill_gb >= 0:
        raise ValueError(f"--max-spill-gb must be at least 0, got {args.max_spill_gb}")
    if not args.memory_limit_gb > 0:
        raise ValueError(f"--memory-limit-gb must be a positive number of GB, got {args.memory_limit_gb:g}")
    if args.folds < 2:
        raise ValueError(f"--folds must be at least 2, got {args.folds}")
    if not args.table and 0 < args.max_samples < args.folds:
        raise ValueError(
            f"--folds {args.folds} needs at least {args.folds} queries, and --max-samples "
            f"{args.max_samples} gives {args.max_samples}: lower --folds or raise --max-samples"
        )
    if args.no_progress:  # also Hugging Face's bars (loading weights, converting the GGUF)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        progress.log_to_stderr()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a launcher's stop runs cleanups (spill dirs)
    distributed.init_from_env(args.device)
    with distributed.session():  # one rank's error stops every rank, with its message
        run(args)
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning: ...`` line on stderr, without the source location."""
    print(f"warning: {str(message).splitlines()[0] if str(message) else category.__name__}", file=sys.stderr)


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors become one line on stderr and exit code 2, never a traceback."""
    warnings.showwarning = _one_line_warning
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted: finished stages are cached and a rerun resumes from them", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, ImportError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
