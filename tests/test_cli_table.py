"""``python -m benchmark.retrieval --table``: the JSON schema, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark.retrieval import cli
from tests.conftest import make_arrays, reference_path

ROOT = Path(__file__).resolve().parents[1]


def test_json_schema_on_reference(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli(["--table", str(reference_path("model_generated")), "--strategy", "full,greedy,random_projection_per_component",
                "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    greedy = doc["results"]["greedy"]
    for key in ("accuracy", "heldout_accuracy", "components", "param_fraction", "fidelity", "seconds"):
        assert key in greedy
    assert greedy["components"][:2] == ["model.layers.1.self_attn.o_proj.weight", "model.layers.2.self_attn.q_proj.weight"]
    assert round(doc["results"]["full"]["accuracy"], 4) == 0.2176
    assert doc["results"]["full"]["heldout_accuracy"] is None
    assert round(doc["settings"]["model_generated"]["baselines"]["bm25"], 4) == 0.8360
    printed = capsys.readouterr().out
    assert "greedy" in printed and "bm25 (baseline)" in printed


def one_line_error(capsys, argv) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


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


def test_unknown_strategy_lists_registered(capsys, tmp_path):
    err = one_line_error(capsys, ["--table", "x.npz", "--strategy", "greedi"])
    assert "unknown strategy 'greedi'; registered: full, greedy, greedy_fidelity" in err


def test_bad_option(capsys):
    assert "has no option nope" in one_line_error(capsys, ["--table", "x.npz", "--strategy", "greedy",
                                                           "--option", "greedy.nope=1"])


def test_broken_plugin_exits_nonzero_without_traceback(tmp_path):
    (tmp_path / "selproj_bad.py").write_text("raise RuntimeError('plugin exploded')\n")
    info = tmp_path / "selproj_bad-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: selproj-bad\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[selproj]\nbad = selproj_bad\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "benchmark.retrieval", "--table", "x.npz", "--strategy", "bad"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and [line.split(":")[0] for line in lines] == ["warning", "error"]
    assert lines[0] == "warning: selproj plugin bad disabled: failed to load: RuntimeError: plugin exploded"
    assert "unknown strategy 'bad'" in out.stderr and "bad (failed to load: RuntimeError: plugin exploded)" in out.stderr
