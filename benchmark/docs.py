"""Rebuild the documentation's measured tables from the records in ``benchmark/records/``.

``python -m benchmark.docs`` rewrites every table between ``<!-- table:NAME:start -->`` and
``<!-- table:NAME:end -->`` in README.md and docs/*.md from the records whose ``table`` is NAME
(``benchmark.doc_records``); ``--check`` writes nothing and exits 1 when a committed file differs
from what it would write. Only README.md gets no date or commit: its line names the command and
the machine.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from benchmark.doc_records import (
    Adapters,
    CheckRow,
    Cost,
    EngineVsLoop,
    FinetuneRun,
    MemoryBound,
    OpCount,
    PairedTest,
    PaperPlan,
    Parity,
    Projection,
    Record,
    RecordError,
    Retrieval,
    ScaleOut,
    Setting,
    load_records,
    parse,
    typed,
)
from benchmark.faults import Row as Fault
from benchmark.report import tied_with

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
MARKER = re.compile(r"(<!-- table:([\w-]+):start -->\n)(.*?)(<!-- table:\2:end -->)", re.S)


# --- tables ----------------------------------------------------------------------------------------


def _label(name: str) -> str:
    from selproj_plugin.components import kind_and_layer

    kind, layer = kind_and_layer(name)
    return kind if layer is None else f"L{layer} {kind}"


def _acc(value: float, ci: tuple[float, ...] | None, digits: int = 3) -> str:
    return f"{value:.{digits}f}" + ("" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def _p(test: PairedTest) -> str:
    return f"p = {test.p_value:.2g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _one(records: list[Record], name: str) -> Record:
    if len(records) != 1:
        raise RecordError(f"table {name} takes one record, found {len(records)}")
    return records[0]


def _result(tp: Any, record: Record) -> Any:
    return parse(tp, record.result, f"{record.source}: result")


def quickstart(records: list[Record]) -> str:
    """Each setting's greedy, full-gradient and BM25 figures; a model column where several runs share the table."""
    runs = [(rec.label, _result(Retrieval, rec)) for rec in records]
    several = len(runs) > 1
    rows = []
    for name in runs[0][1].settings:
        for label, r in runs:
            s = r.settings[name]
            greedy = s.results["greedy"]
            full = s.results.get("full") or s.baselines["full_gradient"]  # a strategy where run, else the baseline
            picked = ", ".join(_label(c) for c in greedy.components)
            tied = greedy.path[0].tied if greedy.path and len(greedy.components) == 1 else None
            sample = f"{_acc(greedy.accuracy, greedy.accuracy_ci)} ({picked}; {100 * greedy.param_fraction:.2g}% of parameters"
            sample += f"; {tied_with(tied)})" if tied_with(tied) else ")"
            held = (
                f"{_acc(greedy.heldout_accuracy, greedy.heldout_accuracy_ci)}; vs full "
                f"{100 * greedy.vs_full.difference:+.1f} pts, {_p(greedy.vs_full)}"
            )
            rows.append(
                [
                    name,
                    *([label] if several else []),
                    sample,
                    held,
                    _acc(full.accuracy, full.accuracy_ci),
                    _acc(s.baselines["bm25"].accuracy, s.baselines["bm25"].accuracy_ci),
                    f"{s.baselines['chance'].accuracy:.2f}",
                ]
            )
    return _table(
        ["setting", *(["model"] if several else []), "greedy, in-sample", "greedy, held-out (5-fold)", "full gradient", "BM25", "chance"],
        rows,
    )


PAPER_RP = "random_projection_per_component"  # on the reference tables: the paper's own stored projections


def paper(records: list[Record]) -> str:
    r = _result(Retrieval, _one(records, "paper"))
    cols = list(r.settings.values())

    def row(title: str, cell: Callable[[Setting], str]) -> list[str]:
        return [title] + [cell(s) for s in cols]

    def test(t: PairedTest) -> str:
        won = "" if t.better is None else f" ({t.better:g} won, {t.worse:g} lost)"
        return f"{t.difference:+.3f}, {_p(t)}{won}"

    res = lambda s, n: s.results[n]  # noqa: E731
    rows = [
        row("full gradient", lambda s: _acc(res(s, "full").accuracy, res(s, "full").accuracy_ci, 4)),
        row(
            "greedy, in-sample (as the paper reported)",
            lambda s: (
                _acc(res(s, "greedy").accuracy, res(s, "greedy").accuracy_ci, 4)
                + " ("
                + ", ".join(_label(c) for c in res(s, "greedy").components)
                + ")"
            ),
        ),
        row(
            "greedy, held-out (5-fold over queries)",
            lambda s: _acc(res(s, "greedy").heldout_accuracy, res(s, "greedy").heldout_accuracy_ci, 4),
        ),
        row("greedy held-out vs full gradient", lambda s: test(res(s, "greedy").vs_full)),
        row(
            "greedy_fidelity, first pick (fidelity)",
            lambda s: f"{_label(res(s, 'greedy_fidelity').path[0].component)} ({res(s, 'greedy_fidelity').path[0].fidelity:.4f})",
        ),
        row(
            "paper's random projection, 1% dims: accuracy / fidelity",
            lambda s: _acc(res(s, PAPER_RP).accuracy, res(s, PAPER_RP).accuracy_ci, 4) + f" / {res(s, PAPER_RP).fidelity:.4f}",
        ),
        row("random projection vs full gradient", lambda s: f"{res(s, PAPER_RP).vs_full.difference:+.3f}, {_p(res(s, PAPER_RP).vs_full)}"),
        row(
            "BM25 alone / chance",
            lambda s: f"{_acc(s.baselines['bm25'].accuracy, s.baselines['bm25'].accuracy_ci, 4)} / {s.baselines['chance'].accuracy:g}",
        ),
    ]
    return _table([""] + list(r.settings), rows)


def _gib_mb(mb: float | None) -> str:
    return "" if mb is None else f"{mb / 1024:.2f}"


def _engine_cells(e: EngineVsLoop) -> list[str]:
    """Engine time (capture + dots), dots / capture, loop time, speedup and largest differences."""
    t, extra = e.engine_timings, []
    if t is not None and t.store_s is not None:
        extra.append(f"{t.store_s:.1f} s storing")
    if e.engine_spilled_bytes is not None:
        extra.append(f"{e.engine_spilled_bytes / GiB:.1f} GiB spilled" if e.engine_spilled_bytes else "nothing spilled")
    engine = f"{e.engine_seconds:.1f} s" + ("" if t is None else f": {t.capture_s:.1f} + {t.dots_s:.1f} s")
    engine += f" ({'; '.join(extra)})" if extra else ""
    ratio = e.dots_over_capture if e.dots_over_capture is not None or t is None else t.dots_s / t.capture_s
    loop = f"{e.loop_seconds_measured:.1f} -> {e.loop_seconds_extrapolated:,.1f} s"
    errors = "" if e.max_rel_error is None else f"{e.max_rel_error:.2g} / {e.max_rel_error_self:.2g}"
    return [engine, "" if ratio is None else f"{ratio:.2f}", loop, f"**{e.speedup:.3g}x**", errors]


def speed_engine(records: list[Record]) -> str:
    rows = []
    for rec in records:
        e = _result(EngineVsLoop, rec)
        allowed = "" if e.flop_ratio is None else f"{e.flop_ratio:.1f}x"
        rows.append([rec.label, *_engine_cells(e), allowed, f"{_gib_mb(e.engine_peak_rss_mb)} / {_gib_mb(e.loop_peak_rss_mb)} GiB"])
    return _table(
        [
            "run",
            "engine: capture + dots",
            "dots / capture",
            "loop (timed -> all queries)",
            "`speedup_vs_loop`",
            "largest relative difference (pairs / self)",
            "FLOP ratio",
            "peak RSS engine / loop",
        ],
        rows,
    )


def speed_fullset(records: list[Record]) -> str:
    rows = []
    for rec in records:
        part = rec.result.get("fullset", rec.result) if isinstance(rec.result, dict) else rec.result
        e = typed(EngineVsLoop, part, f"{rec.source}: result.fullset")
        allowed = "" if e.flop_ratio is None else f"{e.flop_ratio:.1f}x"
        rows.append([rec.label, *_engine_cells(e), allowed, f"{_gib_mb(e.engine_peak_rss_mb)} GiB"])
    return _table(
        [
            "run",
            "engine: capture + dots",
            "dots / capture",
            "loop (timed -> all queries)",
            "`speedup_vs_loop_fullset`",
            "largest relative difference (pairs / self)",
            "FLOP ratio",
            "peak RSS engine",
        ],
        rows,
    )


def speed_gpu(records: list[Record]) -> str:
    rows = []
    for rec in records:
        e = _result(EngineVsLoop, rec)
        cells = _engine_cells(e)
        rows.append(
            [e.dtype, cells[0], cells[2], cells[3], f"{e.engine_peak_gpu_mb / 1024:.1f} / {e.engine_peak_rss_mb / 1024:.1f} GiB", cells[4]]
        )
    return _table(
        [
            "dtype",
            "engine: capture + dots",
            "loop (timed -> all queries)",
            "`speedup_vs_loop`",
            "peak GPU / RSS, engine",
            "largest difference to the loop (pairs / self)",
        ],
        rows,
    )


def projection(records: list[Record]) -> str:
    p = _result(Projection, _one(records, "projection")).projection
    rows = []
    for key, m in p.maps.items():
        ci = (
            "" if m.distortion_vs_dense_jl_95ci is None else f" ({m.distortion_vs_dense_jl_95ci[0]:g}-{m.distortion_vs_dense_jl_95ci[1]:g})"
        )
        seconds = "" if m.seconds_per_sample is None else f"{m.seconds_per_sample:g}"
        rows.append([f"`{key}`", f"{m.dim:,}", f"{m.distortion_vs_dense_jl:g}{ci}", seconds])
    rows.append(["TRAK's `BasicProjector` (extrapolated)", "", "", f"{p.trak_seconds_per_sample_extrapolated:,g}"])
    return _table(["map", "dimension", "`distortion_vs_dense_jl` (95% bootstrap)", "seconds a sample"], rows)


def adapters(records: list[Record]) -> str:
    a = _result(Adapters, _one(records, "adapters"))
    rows = [
        [
            c.strategy,
            c.adapter,
            f"{c.dim:,}",
            f"{c.seconds:.0f}",
            f"{c.peak_rss_bytes / GiB:.2f} GB",
            f"{c.hits}/{c.queries}",
            f"{c.engine_hits}/{c.queries}",
            f"{c.store_bytes / GiB:.2f} GB" if c.adapter == "trak" else "",
        ]
        for c in a.cells
    ]
    return _table(["strategy", "adapter", "dimension", "seconds", "peak RSS", "hits (adapter)", "hits (engine)", "TRAK store"], rows)


def _differences(records: list[Record]) -> list:
    return [d for r in records for d in _result(Parity, r).differences]


def parity(records: list[Record]) -> str:
    """Reducers x paths, one column per model state: the largest relative difference to the engine's table."""
    diffs = _differences(records)
    conditions = list(dict.fromkeys(d.condition for d in diffs))
    cell = {(d.reducer, d.path, d.condition): d for d in diffs}
    rows = [
        [reducer, path]
        + [
            ("" if (d := cell.get((reducer, path, c))) is None else f"{d.relative:.1e}" + ("" if d.state_kept else " (state changed)"))
            for c in conditions
        ]
        for reducer, path in dict.fromkeys((d.reducer, d.path) for d in diffs)
    ]
    return _table(["reducer", "path", *conditions], rows)


def parity_summary(records: list[Record]) -> str:
    """One row per model state: the largest difference over every reducer and path, and the state kept."""
    diffs = _differences(records)
    rows = []
    for c in dict.fromkeys(d.condition for d in diffs):
        mine = [d for d in diffs if d.condition == c]
        worst = max(mine, key=lambda d: d.relative)
        rows.append([c, f"{worst.relative:.1e} ({worst.reducer}, {worst.path})", f"{sum(d.state_kept for d in mine)} of {len(mine)}"])
    return _table(["model state", "largest relative difference", "state put back"], rows)


def plancheck(records: list[Record]) -> str:
    rows = []
    for rec in records:
        for r in _result(list[CheckRow], rec):
            kept = "" if r.kept is None else f"{r.dot_order}; keep {r.kept} ({r.kept_in_ram} in RAM, {r.kept - r.kept_in_ram} on disk)"
            rows.append(
                [
                    rec.label,
                    str(r.size),
                    kept,
                    f"{r.predicted_peak_bytes / GiB:.2f} GiB",
                    f"{r.measured_peak_bytes / GiB:.2f} GiB ({r.predicted_peak_bytes / r.measured_peak_bytes:.2f})",
                    f"{r.planned_captures} / {r.measured_captures}",
                ]
            )
    return _table(
        ["check", "`--max-samples`", "plan", "predicted peak RSS", "measured (predicted / measured)", "captures planned / measured"], rows
    )


def paper_plan(records: list[Record]) -> str:
    plans = [(rec.label, _result(PaperPlan, rec)) for rec in records]

    def row(title: str, cell: Callable[[PaperPlan], str]) -> list[str]:
        return [title] + [cell(p) for _, p in plans]

    rows = [
        row(
            "kept candidates (on the GPU + in RAM) + on disk",
            lambda p: (
                f"{p.plan.kept - p.plan.kept_spilled} "
                f"({p.plan.kept_device_bytes / GiB:.1f} + {p.plan.kept_ram_bytes / GiB:.1f} GiB) + {p.plan.kept_spilled}"
                f" of {p.queries_per_setting}"
            ),
        ),
        row("captures", lambda p: f"{p.plan.captures:,} ({p.plan.recomputed:,} recomputed)"),
        row(
            "peak host / GPU memory (predicted)",
            lambda p: f"{p.host_peak_bytes / GiB:.1f} GiB / {p.device_peak_bytes / GiB:.1f} GiB of {p.device_memory_gb:g}",
        ),
        row("FLOPs: capture + dots", lambda p: f"{p.plan.capture_flops / 1e15:.1f} + {p.plan.dot_flops / 1e15:.1f} PFLOP"),
        row("GPU-hours at an assumed throughput", lambda p: f"{p.gpu_hours:.2f} at {p.tflops_assumed:g} TFLOP/s"),
    ]
    return _table([""] + [label for label, _ in plans], rows)


def faults(records: list[Record]) -> str:
    rows = _result(list[Fault], _one(records, "faults"))
    return _table(["fault", "outcome", "seconds to exit", "kept"], [[r.fault, r.outcome, f"{r.seconds:.1f}", r.kept] for r in rows])


def scaleout(records: list[Record]) -> str:
    s = _result(ScaleOut, _one(records, "scaleout"))
    one = s.wall_seconds["1"]
    rows = [
        [n, f"{w:.1f}", f"{one / w:.2f}x", "reference" if n == "1" else ("identical" if s.identical else "differs")]
        for n, w in s.wall_seconds.items()
    ]
    return _table([f"processes ({s.threads_per_process} thread each)", "wall seconds", "speedup", "JSON apart from timings"], rows)


def runs(records: list[Record]) -> str:
    def peak(c: Cost) -> str:
        if c.peak_rss_gib is None:
            return ""
        return f"{c.peak_rss_gib:.2f} GiB" + ("" if c.peak_rss_kib is None else f" ({c.peak_rss_kib:,} KiB)")

    rows = [
        [rec.label, "" if rec.cost.wall_seconds is None else _minutes(rec.cost.wall_seconds), peak(rec.cost), rec.note] for rec in records
    ]
    return _table(["run", "wall time", "peak RSS", "what it included"], rows)


def _headline(f: Any) -> str:
    """A result's figure to read (held-out for a fitted strategy) with its interval."""
    return _acc(f.heldout_accuracy, f.heldout_accuracy_ci) if f.heldout_accuracy is not None else _acc(f.accuracy, f.accuracy_ci)


def finetune(records: list[Record]) -> str:
    """Each fine-tuned run: its lineage, the mean losses before and after, and top-1 of the BM25 candidates."""
    rows = []
    for rec in records:
        r = _result(FinetuneRun, rec)
        ft = r.finetune
        if ft is None or not ft.epochs:  # the model as loaded: nothing trained, no losses to show
            continue
        losses = [
            f"{ft.loss_before[k]:.3f} to {ft.loss_after[k]:.3f} ({ft.loss_after[k] - ft.loss_before[k]:+.3f})"
            for k in ("originals", "paraphrases")
        ]
        for name, s in r.settings.items():
            greedy, full = s.results.get("greedy"), s.baselines["full_gradient"]
            rows.append(
                [
                    rec.label,
                    f"{ft.epochs} x {ft.samples} originals, lr {ft.lr:g}, {ft.steps} steps",
                    *losses,
                    name,
                    "" if greedy is None else _headline(greedy),
                    _acc(full.accuracy, full.accuracy_ci),
                    _acc(s.baselines["bm25"].accuracy, s.baselines["bm25"].accuracy_ci),
                ]
            )
    return _table(
        ["run", "fine-tune", "mean loss, originals", "mean loss, paraphrases", "setting", "greedy, held-out", "full gradient", "BM25"], rows
    )


def pool(records: list[Record]) -> str:
    """Whole-pool MRR and recall@k of each ranking, per run and setting."""
    rows = []
    for rec in records:
        r = _result(FinetuneRun, rec)
        for name, s in r.settings.items():
            if s.pool is None:
                continue
            ranked = list(s.pool.results.items()) + [(f"{n} (baseline)", b) for n, b in s.pool.baselines.items()]
            for who, f in ranked:
                rows.append(
                    [
                        rec.label,
                        f"{name} ({s.pool.queries} x {s.pool.candidates})",
                        who,
                        _acc(f["mrr"], f["mrr_ci"]),
                        f"{f['recall@1']:.3f}",
                        f"{f['recall@5']:.3f}",
                        f"{f['recall@10']:.3f}",
                        f["rank_basis"],
                    ]
                )
    return _table(["run", "setting (queries x pool)", "ranking", "MRR", "recall@1", "recall@5", "recall@10", "scored"], rows)


def checkpoints(records: list[Record]) -> str:
    """Per checkpoint each strategy's headline accuracy, the transfer matrix and the TracIn rows."""
    rows = []
    for rec in records:
        r = _result(FinetuneRun, rec)
        study = r.checkpoints
        if study is None:
            raise RecordError(f"{rec.source}: a checkpoints record needs the run's 'checkpoints' part")
        for name, part in study.settings.items():
            if part.skipped:
                continue
            for strategy in part.per_checkpoint[0].results:
                rows.append([f"{name}: {strategy}"] + [_headline(c.results[strategy]) for c in part.per_checkpoint])
            for strategy, m in part.transfer.items():
                for i, row in enumerate(m["accuracy"]):
                    rows.append([f"{name}: {strategy} fitted at {i}, held-out at each"] + [f"{v:.3f}" for v in row])
                for i, row in enumerate(part.jaccard[strategy]):
                    rows.append([f"{name}: {strategy} Jaccard with {i}'s selection"] + [f"{v:.2f}" for v in row])
            for strategy, f in part.tracin.items():
                rows.append(
                    [
                        f"{name}: {strategy} (all checkpoints)",
                        _headline(f) + f"; vs full (last) {100 * f.vs_full.difference:+.1f} pts, {_p(f.vs_full)}",
                    ]
                    + [""] * (len(study.steps) - 1)
                )
    header = [""] + [f"checkpoint {i} (step {s})" for i, s in enumerate(study.steps)]
    return _table(header, rows)


def speed_ops(records: list[Record]) -> str:
    """The GPU cost proxy: a table's aten calls against a plain batched forward+backward of the same samples."""
    rows = []
    for rec in records:
        o = typed(OpCount, rec.result["ops"], f"{rec.source}: result.ops")
        batches = "CPU batches" if o.engine_batch_size is None else f"batches of {o.engine_batch_size}"
        rows.append(
            [
                rec.label,
                f"{o.queries} x {o.pairs // max(1, o.queries)} ({o.distinct_samples} samples, {o.dot_order} order, {batches})",
                f"{o.table_ops:,} / {o.plain_ops:,} (batches of {o.plain_batch})",
                f"**{o.table_ops_over_plain:.2f}x**",
                f"{o.ops_per_pair:,.0f}",
                f"{o.capture_ops_over_plain:.2f}x",
                f"{o.capture_tokens_per_s:,.0f} / {o.plain_tokens_per_s:,.0f}",
            ]
        )
    return _table(
        [
            "run",
            "table",
            "aten calls: table / plain forward+backward",
            "ratio",
            "per pair",
            "capture / plain on its batches",
            "tokens/s: capture / plain",
        ],
        rows,
    )


def memory_bound(records: list[Record]) -> str:
    rows = []
    for rec in records:
        m, c = _result(MemoryBound, rec), rec.cost
        peak = c.peak_rss_kib * 1024 if c.peak_rss_kib is not None else c.peak_rss_gib * GiB
        limit = m.memory_limit_gb * 2**30
        load = "" if m.load_average is None else " / ".join(f"{v:.2f}" for v in m.load_average)
        rows.append(
            [
                rec.label,
                f"{m.memory_limit_gb:g} GB",
                f"{peak / GiB:.2f} GiB ({peak / limit:.2f})",
                f"{m.predicted_peak_bytes / GiB:.2f} GiB ({m.predicted_peak_bytes / peak:.2f})",
                "" if c.wall_seconds is None else _minutes(c.wall_seconds),
                load,
            ]
        )
    return _table(
        ["run", "limit", "peak RSS (/ limit)", "`--plan` predicted (/ measured)", "wall time", "load average before (1 / 5 / 15 min)"], rows
    )


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


TABLES: dict[str, Callable[[list[Record]], str]] = {
    "quickstart": quickstart,
    "paper": paper,
    "speed-engine": speed_engine,
    "speed-fullset": speed_fullset,
    "speed-gpu": speed_gpu,
    "projection": projection,
    "adapters": adapters,
    "plancheck": plancheck,
    "paper-plan": paper_plan,
    "faults": faults,
    "scaleout": scaleout,
    "runs": runs,
    "parity": parity,
    "parity-summary": parity_summary,
    "finetune": finetune,
    "pool": pool,
    "checkpoints": checkpoints,
    "memory-bound": memory_bound,
    "speed-ops": speed_ops,
}


def provenance(records: list[Record], brief: bool) -> str:
    """The table's one line: command and machine, and in the docs the date and commit of every record."""

    def cost(r: Record) -> str:
        return (
            ""
            if r.cost is None or r.cost.wall_seconds is None
            else f": {_minutes(r.cost.wall_seconds)}, peak RSS {r.cost.peak_rss_gib:.2f} GiB"
        )

    if brief and len(records) > 1:  # several runs feed one table: name each command (the quick start's cost too)
        return (
            "; ".join(f"`{r.command}`" + (f"{cost(r)} ({r.note})" if r.table == "quickstart" and cost(r) else "") for r in records)
            + f" on the {records[0].machine}."
        )
    if brief:
        r = records[0]
        return f"`{r.command}` on the {r.machine}{cost(r)}" + (f" ({r.note})." if r.note else ".")
    shared = [f for f in ("command", "machine", "date", "commit") if len({getattr(r, f) for r in records}) == 1]
    head = ", ".join(f"`{records[0].command}`" if f == "command" else getattr(records[0], f) for f in shared)
    if len(records) == 1:
        return f"Measured: {head}" + (f" ({records[0].note})." if records[0].note else ".")
    rows = "; ".join(
        f"{r.label}: "
        + ", ".join(
            f"`{r.command}`" if f == "command" else getattr(r, f) for f in ("command", "machine", "date", "commit") if f not in shared
        )
        for r in records
    )
    return f"Measured: {head}; {rows}."


def render(name: str, records: list[Record], brief: bool) -> str:
    if name not in TABLES:
        raise RecordError(f"unknown table {name!r} in a marker (known: {', '.join(TABLES)})")
    if name == "runs":  # every timed command, oldest first, numbered so the line below can date each
        timed = sorted((r for r in records if r.cost is not None), key=lambda r: r.date)
        mine = [replace(r, label=f"{i}. {r.label or r.command}") for i, r in enumerate(timed, 1)]
    else:
        # tables that show one part of another table's records: the parity summary; the op count of an engine
        # run that counted aten calls; the quick start's fine-tune lineage and whole-pool rankings
        tables = {
            "parity-summary": {"parity"},
            "speed-ops": {"speed-engine", "speed-ops"},
            "finetune": {"quickstart"},
            "pool": {"quickstart"},
        }.get(name, {name})
        part = {"speed-ops": "ops", "finetune": "finetune"}.get(name)
        mine = [r for r in records if r.table in tables and (part is None or part in r.result)]
    if not mine:
        raise RecordError(f"no record for table {name!r}")
    try:
        table = TABLES[name](mine)
    except KeyError as exc:  # a part the table shows is missing from a record's result
        raise RecordError(f"table {name!r}: a record's result has no {exc} ({', '.join(r.source for r in mine)})") from None
    return f"{table}\n\n{provenance(mine, brief)}\n"


def rebuild(root: Path) -> dict[Path, str]:
    """Every documentation file with markers, as the records say it should read."""
    records = load_records(root / "benchmark" / "records")
    unknown = {r.table for r in records} - set(TABLES)
    if unknown:
        raise RecordError(f"records name unknown table(s): {', '.join(sorted(unknown))}")
    out = {}
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = path.read_text()
        brief = path.name == "README.md"  # the README carries no dates or commits
        out[path] = MARKER.sub(lambda m: m.group(1) + render(m.group(2), records, brief) + m.group(4), text)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.docs", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed file differs")
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = p.parse_args(argv)
    try:
        wanted = rebuild(args.root)
    except (RecordError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stale = [path for path, text in wanted.items() if path.read_text() != text]
    for path in stale:
        rel = path.relative_to(args.root)
        if args.check:
            print(f"{rel} differs from its records: run python -m benchmark.docs", file=sys.stderr)
        else:
            path.write_text(wanted[path])
            print(f"rewrote {rel}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
