"""Reports: the console table, the baselines, the JSON document, the selection file and atomic writes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from selproj_plugin.atomic import atomic_write
from selproj_plugin.stats import HELD_OUT, NOT_FITTED, PairedTest
from selproj_plugin.strategies.base import StrategyResult

# How the report's figures are computed, stated once in the JSON and the Markdown report.
METHODS = {
    "ties": "a query whose original shares the top score with m-1 other candidates earns 1/m "
    "(the expected credit of a random tie-break); MRR and recall@k are expectations the same way",
    "selection_ties": "greedy and single_component break equal accuracies by the mean margin of the original "
    "over the best other candidate, then by model order; 'tied' counts the components "
    "that shared the best accuracy",
    "intervals": "95% exact binomial (Clopper-Pearson) over queries; a fractional, tie-credited number of hits "
    "takes the bounds of its floor and ceiling; MRR: seeded percentile bootstrap over queries",
    "vs_full": "paired test against the full gradient on the same queries: exact McNemar on per-query hits "
    "(sign-flip randomisation when ties make credits fractional); a fitted strategy is tested "
    "on its held-out hits",
    "headline": "a fitted strategy's accuracy to read is held-out (k-fold over queries: selected on the other "
    "folds); its in-sample accuracy is the one the selection was chosen on; a strategy that learns "
    "nothing from the queries is scored on all of them ('not fitted')",
}


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text so that readers see the old file or the whole new one, never a part."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, document: Mapping[str, Any]) -> Path:
    return write_atomic(path, json.dumps(document, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def tied_with(tied: int | None) -> str:
    """``tied with 21 others`` when ``tied`` components (this one included) shared a step's best accuracy, else ''."""
    if not tied or tied < 2:
        return ""
    return f"tied with {tied - 1} other{'s' if tied > 2 else ''}"


def _path_step(step: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """``L23 o 100.00 (tied with 21 others)``: a greedy step's component, in-sample accuracy % and ties."""
    tie = tied_with(step["tied"])
    return f"{labels.get(step['component'], step['component'])} {_pct(step['accuracy'])}" + (f" ({tie})" if tie else "")


def ci_text(interval: tuple[float, float] | list[float] | None, percent: bool = True) -> str:
    """``[84.8, 98.3]`` in percent (or ``[0.848, 0.983]``), or empty."""
    if interval is None:
        return ""
    return f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if percent else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def headline(result: Mapping[str, Any]) -> tuple[float, list[float] | None, str]:
    """A result's JSON read as :attr:`StrategyResult.headline` reads the result: value, interval and basis."""
    if result["heldout_accuracy"] is not None:
        return result["heldout_accuracy"], result["heldout_accuracy_ci"], HELD_OUT
    return result["accuracy"], result["accuracy_ci"], NOT_FITTED


def vs_full_text(test: PairedTest | Mapping[str, Any] | None, percent: bool = True) -> str:
    """``-1.6 pts, p=0.63`` (or ``-0.016, p=0.63``) against the full gradient, or ``-``."""
    if test is None:
        return "-"
    diff, p = (test.difference, test.p_value) if isinstance(test, PairedTest) else (test["difference"], test["p_value"])
    return f"{100 * diff:+.1f} pts, p={p:.2g}" if percent else f"{diff:+.4f}, p={p:.2g}"


@dataclass
class Baseline:
    """A floor every strategy is read against: its accuracy, interval, paired test against ``full``, rank figures."""

    name: str
    accuracy: float
    basis: str  # how the figure was obtained
    accuracy_ci: tuple[float, float] | None = None
    vs_full: PairedTest | None = None
    ranks: dict[str, Any] = field(default_factory=dict)  # full-set runs: MRR and recall@k, with intervals

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "accuracy_ci": None if self.accuracy_ci is None else list(self.accuracy_ci),
            "vs_full": None if self.vs_full is None else self.vs_full.to_json(),
            "basis": self.basis,
            **self.ranks,
        }


def format_setting(
    setting: str, results: Mapping[str, StrategyResult], baselines: Mapping[str, Baseline], labels: Mapping[str, str] | None = None
) -> str:
    """A readable table of one setting's strategies and baselines; components by short label.

    The first accuracy is the one to read: held-out for a fitted strategy, else over every query (not fitted); the
    in-sample column is a fitted strategy's accuracy on the queries it was fitted on.
    """
    labels = labels or {}
    header = (
        f"{'strategy':<26} {'acc %':>6} {'95% CI':>13} {'scored':>10} {'in-sample %':>20} "
        f"{'vs full':>21} {'fidelity':>8} {'params %':>8} {'dim':>11} {'sec':>7}  components"
    )
    lines = [f"== {setting} ==", header, "-" * len(header)]
    for name, r in results.items():
        if labels and len(r.components) == len(labels):
            shown = f"all {len(labels)}"
        else:
            shown = ", ".join(labels.get(c, c) for c in r.components[:4])
            shown += f", ... ({len(r.components)})" if len(r.components) > 4 else ""
        value, interval, basis = r.headline
        sample = "" if r.heldout_accuracy is None else f"{_pct(r.accuracy)} {ci_text(r.accuracy_ci)}"
        lines.append(
            f"{name:<26} {_pct(value):>6} {ci_text(interval):>13} {basis:>10} {sample:>20} "
            f"{vs_full_text(r.vs_full):>21} {r.fidelity:8.4f} {100 * r.param_fraction:8.3f} {r.dim:11d} "
            f"{r.seconds:7.2f}  {shown}"
        )
    for name, b in baselines.items():
        lines.append(
            f"{name + ' (baseline)':<26} {_pct(b.accuracy):>6} {ci_text(b.accuracy_ci):>13} {'':>10} {'':>20} {vs_full_text(b.vs_full):>21}"
        )
    for name, r in results.items():
        if r.path:
            steps = "; ".join(_path_step(s, labels) for s in r.path[:8])
            more = f"; ... ({len(r.path)} steps)" if len(r.path) > 8 else ""
            lines.append(f"{name} path (in-sample accuracy %): {steps}{more}")
        elif "tied" in r.extra:
            lines.append(f"{name}: picked among {r.extra['tied']} tied on the best accuracy, by mean margin")
    return "\n".join(lines)
