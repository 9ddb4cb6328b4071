"""One right number on every path: the engine, TRAK and Captum agree for every reducer in any model state.

For every registered reducer (plugins included) the query x candidate cosines of its reduced
gradients are computed five ways and compared with the reference, the engine's component table
built on the model in eval mode with eager attention:

- ``engine table``: :func:`~selproj_plugin.engine.build_table` (a concatenation's cosine from
  the per-component dot products, a projection's from the similarities stored under its key);
- ``engine features``: the engine's per-sample vectors (:func:`projected_features` for a
  projection, the reducer's transform on :func:`sample_features` otherwise), cosines taken here;
- ``ReducedTRAKer`` and ``TRAKer`` (plain TRAK with :func:`traker_kwargs`): TRAK's cosine scores;
- ``ReducedTracInCP``: Captum's influence with ``normalize=True``, i.e. cosines.

Each path runs on the model in every :data:`CONDITIONS` (train or eval mode, sdpa or eager
attention) and must hand the model back in the state it came in.  The difference is relative:
``max |path - reference| / max |reference|`` over the whole ``[queries, candidates]`` matrix, so a
near-zero cosine is held to the same absolute error as the largest one.

``python -m benchmark.parity`` runs it on the embedded model and a few embedded samples;
``tests/test_parity.py`` runs the same code on a tiny model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from selproj_plugin.adapters._common import ModelState, encode, plan
from selproj_plugin.adapters._rows import RowFile, streamed_cosine
from selproj_plugin.budget import release_freed_memory
from selproj_plugin.engine import EngineConfig, build_table, projected_features, sample_features
from selproj_plugin.registry import get_strategy, list_strategies
from selproj_plugin.samples import Sample
from selproj_plugin.strategies.base import Reducer
from selproj_plugin.table import ComponentTable
from selproj_plugin.transforms import Transform

TOLERANCE = 1e-5
PATHS = ("engine table", "engine features", "ReducedTRAKer", "TRAKer", "ReducedTracInCP")
ROW_LIMIT_BYTES = 256 * 2**20  # column blocks when cosines are taken of stored rows


@dataclass(frozen=True)
class Condition:
    """A state a user may hand the model over in."""

    training: bool
    attention: str  # "eager" or "sdpa"

    def __str__(self) -> str:
        return f"{'train' if self.training else 'eval'}/{self.attention}"

    def apply(self, model: nn.Module) -> None:
        model.train(self.training)
        model.set_attn_implementation(self.attention)


CONDITIONS = tuple(Condition(t, a) for t in (True, False) for a in ("sdpa", "eager"))
REFERENCE = Condition(False, "eager")


@dataclass(frozen=True)
class Setting:
    """The samples every path scores: queries x candidates, each truncated to ``max_length`` tokens."""

    queries: tuple[Sample, ...]
    candidates: tuple[Sample, ...]
    max_length: int = 64
    scope: str = "paper"

    @property
    def config(self) -> EngineConfig:
        """One sample per capture batch: the engine's peak memory then stays near the adapters'."""
        return EngineConfig(progress=False, max_length=self.max_length, batch_tokens=self.max_length)


@dataclass(frozen=True)
class Difference:
    """One reducer, path and model state: its largest relative difference and whether the state was kept."""

    reducer: str
    path: str
    condition: str
    relative: float
    state_kept: bool

    @property
    def ok(self) -> bool:
        return self.relative <= TOLERANCE and self.state_kept


def relative(got: np.ndarray, reference: np.ndarray) -> float:
    """``max |got - reference| / max |reference|`` (shapes must agree)."""
    got, reference = np.asarray(got, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if got.shape != reference.shape:
        raise ValueError(f"a path gave shape {got.shape}, the reference {reference.shape}")
    return float(np.abs(got - reference).max() / np.abs(reference).max())


def projects(transform: Transform) -> bool:
    """Whether a table can score the transform only from similarities stored under its key (a projection)."""
    return type(transform).on_table is Transform.on_table


def table(model: nn.Module, tokenizer: Any, setting: Setting, transforms: Sequence[Transform]) -> ComponentTable:
    """The engine's table of every component in scope, with the projections' similarities."""
    n_q, n_k = len(setting.queries), len(setting.candidates)
    return build_table(
        model,
        tokenizer,
        list(setting.queries),
        list(setting.candidates),
        np.tile(np.arange(n_k), (n_q, 1)),
        np.zeros(n_q, dtype=np.int64),
        scope=setting.scope,
        transforms=list(transforms),
        config=setting.config,
    )


def reducers(names: Sequence[str], fit_on: Callable[[], ComponentTable]) -> dict[str, Reducer]:
    """Each named reducer with default options; one that learns its selection is fitted on ``fit_on()``."""
    out, fitted = {}, None
    for name in names:
        reducer = get_strategy(name)
        if getattr(reducer, "fitted", False):
            fitted = fitted if fitted is not None else fit_on()
            reducer.fit(fitted)
        out[name] = reducer
    return out


def table_cosines(tab: ComponentTable, transform: Transform) -> np.ndarray:
    sims = transform.on_table(tab)
    if sims is None:
        raise ValueError(f"the engine's table cannot score transform {transform.key}")
    return np.asarray(sims, dtype=np.float64)


def row_cosines(rows: Iterator[torch.Tensor], setting: Setting, width: int, workdir: Path) -> np.ndarray:
    """``[queries, candidates]`` cosines of rows given one at a time (queries first), kept on disk meanwhile:
    a full gradient's rows would not fit in memory together."""
    n_q, n_k = len(setting.queries), len(setting.candidates)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        q = RowFile.open(Path(tmp) / "queries.npy", (n_q, width), np.float32, "w+")
        k = RowFile.open(Path(tmp) / "candidates.npy", (n_k, width), np.float32, "w+")
        for i, row in enumerate(rows):
            if i < n_q:
                q[i] = row.reshape(1, -1)
            else:
                k[i - n_q] = row.reshape(1, -1)
        return streamed_cosine(q, k, ROW_LIMIT_BYTES).numpy()


def engine_feature_rows(model: nn.Module, tokenizer: Any, setting: Setting, reducer: Reducer) -> Iterator[torch.Tensor]:
    """The engine's reduced vector of every sample, queries first, one sample at a time."""
    p = plan(model, reducer, setting.scope)
    names = [c.name for c in p.chosen]
    for sample in (*setting.queries, *setting.candidates):
        if projects(p.reduction.transform):
            yield projected_features(model, tokenizer, [sample], p.reduction.transform, setting.config, scope=setting.scope)[0]
        else:
            features = sample_features(model, tokenizer, [sample], names, setting.config, scope=setting.scope)
            row = p.reduction.transform({n: features[n] for n in names})[0]  # selection order, not model order
            del features  # a full gradient: not twice in memory while the row is written
            yield row


def engine_feature_cosines(model: nn.Module, tokenizer: Any, setting: Setting, reducer: Reducer, workdir: Path) -> np.ndarray:
    return row_cosines(
        engine_feature_rows(model, tokenizer, setting, reducer), setting, plan(model, reducer, setting.scope).dimension, workdir
    )


def reduced_trak_cosines(model: nn.Module, tokenizer: Any, setting: Setting, reducer: Reducer, workdir: Path) -> np.ndarray:
    from selproj_plugin.adapters.trak import ReducedTRAKer

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        traker = ReducedTRAKer(
            model, reducer, train_set_size=len(setting.candidates), save_dir=tmp, scope=setting.scope, logging_level=logging.ERROR
        )
        traker.load_checkpoint(model.state_dict(), model_id=0)
        traker.featurize(batch=encode(tokenizer, setting.candidates, max_length=setting.max_length), num_samples=len(setting.candidates))
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="parity", checkpoint=model.state_dict(), model_id=0, num_targets=len(setting.queries))
        traker.score(batch=encode(tokenizer, setting.queries, max_length=setting.max_length), num_samples=len(setting.queries))
        return np.asarray(traker.finalize_scores(exp_name="parity"), dtype=np.float64).T


def trak_cosines(model: nn.Module, tokenizer: Any, setting: Setting, reducer: Reducer, workdir: Path) -> np.ndarray:
    """Plain ``TRAKer`` from :func:`traker_kwargs`, a sample per call (it refuses batches whose rows exceed the limit)."""
    from trak import TRAKer

    from selproj_plugin.adapters.trak import traker_kwargs

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        traker = TRAKer(
            train_set_size=len(setting.candidates),
            save_dir=tmp,
            logging_level=logging.ERROR,
            **traker_kwargs(model, reducer, scope=setting.scope),
        )
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for i, sample in enumerate(setting.candidates):
            traker.featurize(batch=encode(tokenizer, [sample], max_length=setting.max_length), inds=np.array([i]))
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="parity", checkpoint=model.state_dict(), model_id=0, num_targets=len(setting.queries))
        for i, sample in enumerate(setting.queries):
            traker.score(batch=encode(tokenizer, [sample], max_length=setting.max_length), inds=np.array([i]))
        return np.asarray(traker.finalize_scores(exp_name="parity"), dtype=np.float64).T


def tracin_cosines(model: nn.Module, tokenizer: Any, setting: Setting, reducer: Reducer, workdir: Path) -> np.ndarray:
    from selproj_plugin.adapters.captum import ReducedTracInCP, dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that integer token ids take no gradient
        tracin = ReducedTracInCP(
            model,
            dataset(tokenizer, setting.candidates, max_length=setting.max_length),
            None,
            reducer,
            scope=setting.scope,
            spill_dir=workdir,
        )
        scores = tracin.influence(encode(tokenizer, setting.queries, max_length=setting.max_length))
    return scores.detach().double().numpy()


ADAPTER_PATHS = {
    "engine features": engine_feature_cosines,
    "ReducedTRAKer": reduced_trak_cosines,
    "TRAKer": trak_cosines,
    "ReducedTracInCP": tracin_cosines,
}


def compare(
    model: nn.Module,
    tokenizer: Any,
    setting: Setting,
    names: Sequence[str] | None = None,
    conditions: Sequence[Condition] = CONDITIONS,
    workdir: str | Path | None = None,
    report: Callable[[Difference], None] | None = None,
) -> list[Difference]:
    """Every named reducer (default: all registered) on every path in every condition, against the reference.

    The model is handed back as it came, whatever a path does to it.
    """
    names = list(list_strategies() if names is None else names)
    user = ModelState.of(model)
    out: list[Difference] = []
    with _workdir(workdir) as work:
        try:
            REFERENCE.apply(model)
            chosen = reducers(names, lambda: table(model, tokenizer, setting, ()))
            transforms = {n: plan(model, r, setting.scope).reduction.transform for n, r in chosen.items()}
            projections = [t for t in transforms.values() if projects(t)]
            ref_table = table(model, tokenizer, setting, projections)
            reference = {n: table_cosines(ref_table, t) for n, t in transforms.items()}
            for condition in conditions:
                condition.apply(model)
                state = ModelState.of(model)

                def record(name: str, path: str, got: np.ndarray) -> None:
                    kept = ModelState.of(model) == state
                    state.restore(model)  # the next path starts from the condition, whatever this one did
                    release_freed_memory()  # a full gradient's freed pages, before the next path allocates its own
                    out.append(Difference(name, path, str(condition), relative(got, reference[name]), kept))
                    if report is not None:
                        report(out[-1])

                tab = table(model, tokenizer, setting, projections)
                for name in chosen:
                    record(name, "engine table", table_cosines(tab, transforms[name]))
                for name, reducer in chosen.items():
                    for path, cosines in ADAPTER_PATHS.items():
                        record(name, path, cosines(model, tokenizer, setting, reducer, work))
        finally:
            user.restore(model)
    return out


@contextlib.contextmanager
def _workdir(path: str | Path | None) -> Iterator[Path]:
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="selproj-parity-") as tmp:
        yield Path(tmp)


def format_table(differences: Sequence[Difference]) -> str:
    """Reducers x paths, one column per condition: the relative difference (``!state`` where the state changed)."""
    conditions = list(dict.fromkeys(d.condition for d in differences))
    cell = {(d.reducer, d.path, d.condition): d for d in differences}
    rows = list(dict.fromkeys((d.reducer, d.path) for d in differences))
    width = max([len(r) for r, _ in rows] + [len("reducer")])
    lines = [f"{'reducer':<{width}}  {'path':<16}" + "".join(f"  {c:>13}" for c in conditions)]
    for reducer, path in rows:
        cells = []
        for c in conditions:
            d = cell.get((reducer, path, c))
            cells.append("" if d is None else f"{d.relative:.2e}" + ("" if d.state_kept else " !state"))
        lines.append(f"{reducer:<{width}}  {path:<16}" + "".join(f"  {x:>13}" for x in cells))
    worst = max(differences, key=lambda d: d.relative)
    changed = [d for d in differences if not d.state_kept]
    verdict = "PASS" if worst.relative <= TOLERANCE and not changed else "FAIL"
    lines.append(
        f"largest relative difference {worst.relative:.2e} ({worst.reducer}, {worst.path}, {worst.condition}); "
        f"tolerance {TOLERANCE:.0e}; model state changed on {len(changed)} of {len(differences)}: {verdict}"
    )
    return "\n".join(lines)


def with_attention_dropout(model: nn.Module, p: float) -> int:
    """Set attention dropout ``p`` on every module that has one; the number of modules set.

    The embedded model is configured without dropout, so train mode would change nothing;
    with it, the train-mode conditions test what they are meant to.
    """
    touched = 0
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
            touched += 1
    if hasattr(getattr(model, "config", None), "attention_dropout"):
        model.config.attention_dropout = p
    return touched


def embedded_setting(queries: int, candidates: int, max_length: int) -> Setting:
    """Paraphrases of the first ``queries`` embedded records against the originals of the first ``candidates``."""
    from benchmark.data import load_dataset

    records = load_dataset(max_samples=max(queries, candidates)).records
    return Setting(tuple(r.paraphrase for r in records[:queries]), tuple(r.original for r in records[:candidates]), max_length)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.parity", description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2, help="embedded paraphrases scored (default 2)")
    parser.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="embedded originals they are scored against (default 1: plain TRAKer holds every candidate's full gradient when it finalizes)",
    )
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sample (default 64)")
    parser.add_argument("--strategy", action="append", help="a reducer to check (repeatable; default: every one)")
    parser.add_argument(
        "--condition", action="append", choices=[str(c) for c in CONDITIONS], help="a model state to try (repeatable; default: all four)"
    )
    parser.add_argument("--dropout", type=float, default=0.1, help="attention dropout for the train-mode states")
    parser.add_argument("--json", type=Path, help="write the differences here")
    args = parser.parse_args(argv)
    try:
        if min(args.queries, args.candidates, args.max_length) < 1:
            raise ValueError("--queries, --candidates and --max-length must be at least 1")
        if args.json is not None and not args.json.parent.is_dir():
            raise ValueError(f"--json: no directory {args.json.parent}")
        unknown = sorted(set(args.strategy or ()) - set(list_strategies()))
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}; registered: {', '.join(list_strategies())}")
        from selproj_plugin.models import load_model

        setting = embedded_setting(args.queries, args.candidates, args.max_length)
        model, tokenizer = load_model()
        with_attention_dropout(model, args.dropout)
        conditions = [c for c in CONDITIONS if args.condition is None or str(c) in args.condition]
        differences = compare(
            model,
            tokenizer,
            setting,
            args.strategy,
            conditions,
            report=lambda d: print(f"  {d.reducer} / {d.path} / {d.condition}: {d.relative:.2e}", file=sys.stderr, flush=True),
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = format_table(differences)
    print(text)
    if args.json is not None:
        record = {
            "model": type(model).__name__,
            "queries": [s.id for s in setting.queries],
            "candidates": [s.id for s in setting.candidates],
            "max_length": setting.max_length,
            "dropout": args.dropout,
            "tolerance": TOLERANCE,
            "differences": [asdict(d) for d in differences],
            "largest": max(d.relative for d in differences),
            "ok": all(d.ok for d in differences),
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0 if all(d.ok for d in differences) else 1


if __name__ == "__main__":
    sys.exit(main())
