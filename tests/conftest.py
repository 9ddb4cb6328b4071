"""Fixtures shared by the test modules (helpers: tests/helpers.py, tests/tiny.py, tests/attribution.py).

Tables: ``paraphrased`` and ``model_generated`` are the paper's (../shared, skipped with one reason when
absent); ``synthetic_paraphrased`` is a committed table of the same schema (tests/data/reference), so the
table paths run on a fresh clone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.helpers import PAPER, PAPER_SKIP, install_plugin, reference_path, synthetic_path, write_dataset  # noqa: E402


# ---- the paper's tables, and the fresh clone's report of their absence ------------------------
def pytest_report_header(config):
    found = all((PAPER / f"{s}.npz").is_file() for s in ("paraphrased", "model_generated"))
    return f"paper reference tables: {'found in ' + str(PAPER) if found else PAPER_SKIP + '; their tests skip'}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if isinstance(r.longrepr, tuple) and r.longrepr[2].endswith(PAPER_SKIP)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} tests skipped: {PAPER_SKIP}", yellow=True, bold=True)


def _table(path: Path):
    from selproj_plugin.table import ComponentTable

    return ComponentTable.load(path)


@pytest.fixture
def nothing_resident(monkeypatch):
    """The adapters' memory budgets as if the process held nothing yet: tests that size them to one sample
    (TINY_LIMIT_GB) then do not depend on the test process's resident memory."""
    from selproj_plugin.adapters import _common

    monkeypatch.setattr(_common, "resident_bytes", lambda model: 0)


@pytest.fixture(scope="session")
def paraphrased():
    return _table(reference_path("paraphrased"))


@pytest.fixture(scope="session")
def model_generated():
    return _table(reference_path("model_generated"))


@pytest.fixture(scope="session")
def synthetic_paraphrased():
    return _table(synthetic_path("paraphrased"))


# ---- the benchmark pipeline on a tiny model saved to disk ---------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests import tiny

    path = tmp_path_factory.mktemp("tinyllama")
    tiny.model("llama", tied=True).save_pretrained(path)
    tiny.tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Six short samples (the tiny byte-level tokenizer makes long texts long)."""
    return write_dataset(tmp_path_factory.mktemp("data") / "small.jsonl")


# ---- the adapters' tiny Llama and plugins -------------------------------------------------------
@pytest.fixture(scope="session")
def model():
    """The TRAK and Captum tests' tiny Llama (tests.attribution.make_model)."""
    from tests.attribution import make_model

    return make_model()


@pytest.fixture(scope="session")
def tokenizer():
    from tests import tiny

    return tiny.tokenizer(chat=True)


@pytest.fixture
def weighted_plugin(tmp_path, monkeypatch):
    """Install ``weighted_mlp`` through the ``selproj`` entry-point group; yields (names, weights) for a model."""
    from selproj_plugin import registry as registry_module
    from selproj_plugin.components import catalogue
    from tests.attribution import WEIGHTED_PLUGIN

    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "selproj-weighted", "weighted", "selproj_weighted_plugin", WEIGHTED_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    registry_module.registry(reload=True)

    def expected(model):
        names = [c.name for c in catalogue(model) if c.kind in ("gate", "up", "down")]
        return names, [3.0 if n.endswith("down_proj") else 1.0 for n in names]

    yield expected
    monkeypatch.undo()
    registry_module.registry(reload=True)


@pytest.fixture
def attention_plugin(tmp_path, monkeypatch):
    """CONTRIBUTING.md's plugin installed as `selproj_attention` with the documented entry point `attention`;
    yields the folder it is installed in."""
    from selproj_plugin import registry as registry_module
    from tests.helpers import contributing_python_blocks

    install_plugin(tmp_path, "selproj-attention", "attention", "selproj_attention", contributing_python_blocks()[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    registry_module.registry(reload=True)
    yield tmp_path
    monkeypatch.undo()
    registry_module.registry(reload=True)
