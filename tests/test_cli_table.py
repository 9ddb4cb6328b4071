"""``python -m benchmark.retrieval --table``: the JSON schema, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark.retrieval import cli
from tests.helpers import one_line_error, make_arrays, reference_path, synthetic_path

ROOT = Path(__file__).resolve().parents[1]


def test_json_schema_on_reference(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        cli(
            [
                "--table",
                str(reference_path("model_generated")),
                "--strategy",
                "full,greedy,random_projection_per_component",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    greedy = doc["results"]["greedy"]
    for key in (
        "accuracy",
        "accuracy_ci",
        "heldout_accuracy",
        "heldout_accuracy_ci",
        "vs_full",
        "components",
        "param_fraction",
        "fidelity",
        "seconds",
    ):
        assert key in greedy
    assert greedy["components"][:2] == ["model.layers.1.self_attn.o_proj.weight", "model.layers.2.self_attn.q_proj.weight"]
    low, high = greedy["heldout_accuracy_ci"]
    assert low < greedy["heldout_accuracy"] < high and high - low < 0.07  # 988 queries: about +-0.03
    assert greedy["vs_full"]["basis"] == "held-out" and greedy["vs_full"]["p_value"] < 1e-6
    assert [step["tied"] for step in greedy["path"]] == [1, 1, 1]
    full = doc["results"]["full"]
    assert round(full["accuracy"], 4) == 0.2176 and full["heldout_accuracy"] is None
    assert full["heldout_accuracy_ci"] is None and full["vs_full"]["p_value"] == 1.0
    bm25 = doc["settings"]["model_generated"]["baselines"]["bm25"]
    assert round(bm25["accuracy"], 4) == 0.8360 and bm25["accuracy_ci"][0] < 0.8360 < bm25["accuracy_ci"][1]
    assert doc["settings"]["model_generated"]["component_set"] == "paper"
    assert {"ties", "intervals", "vs_full", "headline"} <= set(doc["methods"])
    printed = capsys.readouterr().out
    assert "greedy" in printed and "bm25 (baseline)" in printed and "held-out" in printed


def test_fixed_selection_reports_no_heldout_and_says_it_learnt_nothing(tmp_path, capsys):
    """A selection fixed in advance is scored on every query: 'not fitted', never 'in-sample' over an empty column."""
    out = tmp_path / "r.json"
    assert (
        cli(
            [
                "--table",
                str(reference_path("paraphrased")),
                "--strategy",
                "greedy",
                "--option",
                'greedy.selection=["model.layers.9.mlp.down_proj.weight"]',
                "--json",
                str(out),
                "--out",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    greedy = json.loads(out.read_text())["results"]["greedy"]
    assert greedy["heldout_accuracy"] is None and greedy["heldout_accuracy_ci"] is None
    assert round(greedy["accuracy"], 4) == 0.9980 and greedy["vs_full"]["basis"] == "not fitted"
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("greedy "))
    assert "not fitted" in row and "in-sample" not in row, row
    markdown = next(line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if line.startswith("| greedy |"))
    assert "| not fitted |" in markdown and "in-sample" not in markdown, markdown


def test_out_draws_the_greedy_path_only_when_a_strategy_has_one(tmp_path):
    table = str(synthetic_path("paraphrased"))
    assert cli(["--table", table, "--strategy", "full,single_component", "--out", str(tmp_path / "a")]) == 0
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert not any(f.startswith("greedy-") for f in files), files
    assert "selection-paraphrased-single_component.json" in files  # learnt from the table
    assert "selection-paraphrased-full.json" not in files  # fixed: nothing learnt to export
    assert "greedy-" not in (tmp_path / "a" / "report.md").read_text()  # greedy's plot: test_end_to_end_outputs


def test_missing_file(capsys, tmp_path):
    assert "table file not found" in one_line_error(capsys, ["--table", str(tmp_path / "no.npz")])


def test_wrong_shapes_and_nan(capsys, tmp_path):
    arrays = make_arrays()
    arrays["candidate_self"] = arrays["candidate_self"][:, :2]
    np.savez(tmp_path / "shape.npz", **arrays)
    assert "shapes disagree: candidate_self" in one_line_error(capsys, ["--table", str(tmp_path / "shape.npz")])
    arrays = make_arrays()
    arrays["cross"][0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    assert "NaN" in one_line_error(capsys, ["--table", str(tmp_path / "nan.npz")])


def test_components_needs_a_model(capsys):
    err = one_line_error(capsys, ["--table", str(synthetic_path("paraphrased")), "--components", "all"])
    assert "--components applies when building tables" in err


def test_unknown_strategy_lists_registered(capsys, tmp_path):
    err = one_line_error(capsys, ["--table", "x.npz", "--strategy", "greedi"])
    assert "unknown strategy 'greedi'; registered: full, greedy, greedy_fidelity" in err


def test_bad_option(capsys):
    assert "has no option nope" in one_line_error(capsys, ["--table", "x.npz", "--strategy", "greedy", "--option", "greedy.nope=1"])


@pytest.mark.slow
def test_broken_plugin_exits_nonzero_without_traceback(tmp_path):
    (tmp_path / "selproj_bad.py").write_text("raise RuntimeError('plugin exploded')\n")
    info = tmp_path / "selproj_bad-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: selproj-bad\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[selproj]\nbad = selproj_bad\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmark.retrieval", "--table", "x.npz", "--strategy", "bad"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and [line.split(":")[0] for line in lines] == ["warning", "error"]
    assert lines[0] == "warning: selproj plugin bad disabled: failed to load: RuntimeError: plugin exploded"
    assert "unknown strategy 'bad'" in out.stderr and "bad (failed to load: RuntimeError: plugin exploded)" in out.stderr


def test_argument_errors_are_one_line(capsys):
    from benchmark.retrieval import cli

    with pytest.raises(SystemExit) as done:
        cli(["--components", "bogus"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: argument --components: invalid choice: 'bogus' (choose from 'paper', 'all')"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--memory-limit-gb", "0"], "error: --memory-limit-gb must be a positive number of GB, got 0"),
        (["--memory-limit-gb", "-2", "--table", "x.npz"], "error: --memory-limit-gb must be a positive number of GB, got -2"),
        (["--folds", "1"], "error: --folds must be at least 2, got 1"),
        (
            ["--max-samples", "4"],
            "error: --folds 5 needs at least 5 queries, and --max-samples 4 gives 4: lower --folds or raise --max-samples",
        ),
    ],
)
def test_numbers_out_of_range_fail_before_any_work(capsys, monkeypatch, argv, message):
    """A zero limit ran the engine unbounded, a negative one was taken by a cached table, and too many folds
    for the queries failed only after the table was built (194 s at 4 samples)."""
    from benchmark import retrieval

    monkeypatch.setattr(retrieval, "build_tables", lambda *a, **k: pytest.fail("work began"))
    monkeypatch.setattr(retrieval.ComponentTable, "load", lambda *a, **k: pytest.fail("work began"))
    assert one_line_error(capsys, argv) == message


def test_a_seed_sweep_on_a_table_holding_one_seed_is_a_one_line_error(capsys, tmp_path):
    """Seed 1 scored with seed 0's similarities would show a sweep no variance."""
    from selproj_plugin import get_strategy
    from selproj_plugin.strategies.base import reduction
    from selproj_plugin.table import ComponentTable

    table = ComponentTable(**make_arrays())
    key = reduction(get_strategy("random_projection", dim=8, seed=0), table.component_list).transform.key
    path = tmp_path / "seed0.npz"
    ComponentTable(**make_arrays(), rp_dims=np.array([8]), rp_similarity=np.full((1, 6, 3), 0.5), rp_keys=np.array([key])).save(path)
    args = ["--table", str(path), "--strategy", "random_projection", "--proj-dim", "8"]
    assert cli([*args, "--json", str(tmp_path / "seed0.json")]) == 0
    err = one_line_error(capsys, [*args, "--option", "random_projection.seed=1"])
    assert "no count_sketch projection seed1 at dim 8" in err and "it holds seed0 at dim 8" in err


def test_the_greedy_path_counts_ties_as_the_docs_tables_do():
    """A step tied with 21 other components reads 'tied with 21 others' in the console, as in the README's table."""
    from benchmark.report import format_setting
    from selproj_plugin.strategies.base import StrategyResult

    path = [
        {"component": "a", "accuracy": 1.0, "tied": 22},
        {"component": "b", "accuracy": 0.5, "tied": 1},
        {"component": "c", "accuracy": 0.25, "tied": 2},
    ]
    result = StrategyResult("greedy", 1.0, 1.0, ["a", "b", "c"], 0.01, 10, 0.0, path=path)
    line = next(x for x in format_setting("paraphrased", {"greedy": result}, {}).splitlines() if "path" in x)
    assert line.endswith(": a 100.00 (tied with 21 others); b 50.00; c 25.00 (tied with 1 other)"), line
