"""Helpers shared by the test modules (fixtures live in conftest.py). Test modules import helpers from
here, tests.tiny and tests.attribution, never from one another: ``from tests.helpers import ...``."""

from __future__ import annotations

import importlib
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The paper's published dot products: read-only, laid beside the clone, never copied into the repository.
PAPER = ROOT.parent / "shared" / "reference" / "paper-olmo1b-lima"
PAPER_SKIP = f"the paper's reference tables are absent from {PAPER} (lay ../shared beside the clone to run this)"
# Committed tables of the same schema from synthetic gradients (tests/data/make_reference.py writes them).
SYNTHETIC = ROOT / "tests" / "data" / "reference"
SETTINGS = ("paraphrased", "model_generated")


def reference_path(setting: str) -> Path:
    """The paper's table for ``setting``; the test skips, with one reason for all, when ../shared is absent."""
    path = PAPER / f"{setting}.npz"
    if not path.is_file():
        pytest.skip(PAPER_SKIP)
    return path


def synthetic_path(setting: str) -> Path:
    """The committed synthetic table for ``setting`` (same keys, dtypes and components as the paper's)."""
    return SYNTHETIC / f"{setting}.npz"


def make_arrays(q: int = 6, k: int = 3, c: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays of a small valid table: positive self products, original in column 0."""
    rng = np.random.default_rng(seed)
    is_original = np.zeros((q, k), dtype=bool)
    is_original[:, 0] = True
    return {
        "cross": rng.normal(size=(q, k, c)),
        "query_self": rng.uniform(1, 2, size=(q, c)),
        "candidate_self": rng.uniform(1, 2, size=(q, k, c)),
        "is_original": is_original,
        "components": np.array([f"model.layers.{i}.mlp.down_proj.weight" for i in range(c)]),
        "num_params": np.full(c, 10, dtype=np.int64),
    }


TOPICS = ["cats sleep", "rivers flow", "bread rises", "stars burn", "coins save", "code runs"]


def write_dataset(path: Path, empty_response: bool = False) -> Path:
    """Six short samples in the dataset schema (``empty_response``: the third has a blank response)."""
    rows = [
        {
            "id": f"t{i}",
            "prompt": f"Why {t}?",
            "response": f"Because {t} a lot.",
            "paraphrased_prompt": f"Reason {t}?",
            "paraphrased_response": f"{t} often, that is why.",
        }
        for i, t in enumerate(TOPICS)
    ]
    if empty_response:
        rows[2]["response"] = "  "
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def argv(model_dir, dataset, cache, *extra) -> list[str]:
    """``benchmark.retrieval`` arguments for the tiny model and dataset, short and quiet."""
    return [
        "--model",
        str(model_dir),
        "--dataset",
        str(dataset),
        "--cache-dir",
        str(cache),
        "--max-length",
        "160",
        "--max-new-tokens",
        "6",
        "--no-progress",
        *extra,
    ]


def contributing_python_blocks() -> list[str]:
    """Every ```python block of CONTRIBUTING.md, in order (the first is the documented plugin)."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    return [part.split("```", 1)[0] for part in text.split("```python\n")[1:]]


def install_plugin(site: Path, dist: str, entry: str, module: str, source: str) -> None:
    """A real distribution on sys.path: a module plus dist-info with an entry_points.txt."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"  # wheel naming: one dash
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[selproj]\n{entry} = {module}\n")
    importlib.invalidate_caches()  # importlib.metadata caches directory listings by mtime


def error_line(stderr: str) -> str:
    """The one line of error a CLI wrote: the last line, after progress lines (``--no-progress`` logs phases as
    ``[selproj] ...``) and one-line warnings only, so no traceback and nothing else."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), lines
    assert all(line.startswith(("[selproj] ", "warning: ")) for line in lines[:-1]), lines
    return lines[-1]


def one_line_error(capsys, args) -> str:
    """Run ``benchmark.retrieval``'s CLI on ``args``: it exits 2 with one line of error (:func:`error_line`)."""
    from benchmark.retrieval import cli

    assert cli(args) == 2
    return error_line(capsys.readouterr().err)
