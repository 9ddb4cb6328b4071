"""The adapters' memory_limit_gb bounds the whole process, as the engine's: their budget is what it leaves beside
what the process holds with the model loaded."""

from __future__ import annotations

import pytest

pytest.importorskip("trak")
pytest.importorskip("captum")

from selproj_plugin.adapters import _common  # noqa: E402
from selproj_plugin.adapters._common import DEFAULT_MEMORY_LIMIT_GB, AdapterError, memory_budget_bytes  # noqa: E402
from selproj_plugin.adapters.captum import ReducedTracInCP, dataset  # noqa: E402
from selproj_plugin.adapters.trak import ReducedTRAKer  # noqa: E402
from selproj_plugin.engine_config import EngineConfig  # noqa: E402
from tests.attribution import CANDIDATES  # noqa: E402

GiB = 2**30


def test_the_default_is_the_engines():
    assert DEFAULT_MEMORY_LIMIT_GB == EngineConfig().memory_limit_gb


def test_the_budget_shrinks_by_what_the_process_holds(model, tokenizer, monkeypatch, tmp_path):
    budgets = {}
    for held in (0, GiB // 2):
        monkeypatch.setattr(_common, "resident_bytes", lambda m, held=held: held)
        tracin = ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), None, "full", memory_limit_gb=2)
        traker = ReducedTRAKer(model, "full", train_set_size=len(CANDIDATES), save_dir=tmp_path / f"t{held}", memory_limit_gb=2)
        budgets[held] = (tracin.limit_bytes, traker.limit_bytes)
    assert budgets[0] == (2 * GiB, 2 * GiB)
    assert budgets[GiB // 2] == (2 * GiB - GiB // 2, 2 * GiB - GiB // 2)


def test_the_real_budget_leaves_out_the_models_weights(model):
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory_budget_bytes(2, model) <= 2 * GiB - weights


def test_a_limit_the_process_already_fills_is_one_line(model, tokenizer, monkeypatch, tmp_path):
    monkeypatch.setattr(_common, "resident_bytes", lambda m: 3 * GiB)
    for build in (
        lambda: ReducedTracInCP(model, dataset(tokenizer, CANDIDATES), None, "full", memory_limit_gb=2),
        lambda: ReducedTRAKer(model, "full", train_set_size=2, save_dir=tmp_path, memory_limit_gb=2),
    ):
        with pytest.raises(AdapterError) as err:
            build()
        message = str(err.value)
        assert "\n" not in message
        assert message == (
            "memory_limit_gb=2 bounds the whole process, which already holds 3.00 GB with the model loaded; raise memory_limit_gb"
        )
