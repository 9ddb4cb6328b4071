"""Reports: the console table, the JSON document, the selection file and atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from selproj_plugin.strategies.base import StrategyResult


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, document: Mapping[str, Any]) -> Path:
    return write_atomic(path, json.dumps(document, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:6.2f}"


def format_setting(setting: str, results: Mapping[str, StrategyResult], baselines: Mapping[str, float],
                   labels: Mapping[str, str] | None = None) -> str:
    """A readable table of one setting's strategies and baselines; components by short label."""
    labels = labels or {}
    header = f"{'strategy':<26} {'acc %':>7} {'held-out %':>10} {'fidelity':>9} {'params %':>9} {'dim':>12} {'sec':>7}  components"
    lines = [f"== {setting} ==", header, "-" * len(header)]
    for name, r in results.items():
        if labels and len(r.components) == len(labels):
            shown = f"all {len(labels)}"
        else:
            shown = ", ".join(labels.get(c, c) for c in r.components[:4])
            shown += f", ... ({len(r.components)})" if len(r.components) > 4 else ""
        lines.append(
            f"{name:<26} {_pct(r.accuracy):>7} {_pct(r.heldout_accuracy):>10} {r.fidelity:9.4f} "
            f"{100 * r.param_fraction:9.3f} {r.dim:12d} {r.seconds:7.2f}  {shown}"
        )
    for name, value in baselines.items():
        lines.append(f"{name + ' (baseline)':<26} {_pct(value):>7}")
    return "\n".join(lines)
