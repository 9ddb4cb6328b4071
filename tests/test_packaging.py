"""Packaging promises: the console script survives a user's own `benchmark/` folder; torch is not capped."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_ignores_a_local_benchmark_folder(tmp_path):
    shadow = tmp_path / "benchmark"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise SystemExit('the user benchmark package was imported')\n")
    script = Path(sys.executable).parent / "selproj-retrieval"
    plain = subprocess.run([sys.executable, "-m", "benchmark.retrieval", "--list-strategies"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert "the user benchmark package was imported" in plain.stderr  # the hazard the script avoids
    done = subprocess.run([str(script), "--list-strategies"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "greedy  [plugin: builtin]" in done.stdout


def test_torch_requirement_accepts_newer_releases():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.20.1") and torch.specifier.contains("3.0")
