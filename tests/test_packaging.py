"""Packaging promises: the console script survives a user's own `benchmark/` folder; torch is not capped."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_console_script_ignores_a_local_benchmark_folder(tmp_path):
    shadow = tmp_path / "benchmark"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise SystemExit('the user benchmark package was imported')\n")
    script = Path(sys.executable).parent / "selproj-retrieval"
    plain = subprocess.run([sys.executable, "-m", "benchmark.retrieval", "--list-strategies"], capture_output=True, text=True, cwd=tmp_path)
    assert "the user benchmark package was imported" in plain.stderr  # the hazard the script avoids
    done = subprocess.run([str(script), "--list-strategies"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "greedy  [plugin: builtin]" in done.stdout


def test_torch_requirement_accepts_newer_releases():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.20.1") and torch.specifier.contains("3.0")


@pytest.mark.slow
def test_the_wheel_carries_the_data_its_code_reads(tmp_path):
    """Installed from a wheel (not editable), the embedded dataset loads and benchmark.plan finds its config."""
    source = tmp_path / "source"  # a clean copy: setuptools reuses a build/ folder left in the tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "wheel"),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    assert "absent from the `packages` configuration" not in built.stderr  # a folder setuptools may stop shipping
    site = tmp_path / "site"
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    code = (
        "import benchmark, benchmark.data as d; assert benchmark.__file__.startswith(%r), benchmark.__file__; "
        "print(len(d.load_dataset()))" % str(site)
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert loaded.returncode == 0 and int(loaded.stdout) > 0, loaded.stderr[-2000:]
    planned = subprocess.run([sys.executable, "-m", "benchmark.plan"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "GPU-hours" in planned.stdout


def test_torch_floor_loads_checkpoints_without_pickle_code():
    """Captum's default checkpoint loader calls ``torch.load(path)``: only torch>=2.6 makes that weights-only."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    assert not torch.specifier.contains("2.5.1") and torch.specifier.contains("2.6.0")
