"""The README's TRAK and Captum examples run as written, and their scores are right.

The ```python blocks between ``<!-- adapters:start -->`` and ``<!-- adapters:end -->``
are a setup block, the TRAK example and the Captum example.  Each example runs after
the setup alone, in a fresh namespace, in an empty working directory and with an empty
temporary directory, both of which it must leave empty; its scores are then checked
against the engine (cosines from per-component dot products) or against the reducer
applied to the engine's own materialised per-sample gradients.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from selproj_plugin.components import catalogue, select
from selproj_plugin.engine import EngineConfig, sample_features
from tests.attribution import assert_same_retrieval, engine_cosines

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[str]:
    text = README.read_text()
    section = text.split("<!-- adapters:start -->", 1)[1].split("<!-- adapters:end -->", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_clean(tmp_path, monkeypatch, *sources: str) -> dict:
    """Run the blocks in an empty working directory and temporary directory; both must stay empty."""
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    ns = run(*sources)
    assert sorted(p.name for p in work.iterdir()) == [] and sorted(p.name for p in temp.iterdir()) == []
    return ns


def run(*sources: str) -> dict:
    namespace: dict = {"__name__": "readme_example"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in sources:
            exec(compile(source, str(README), "exec"), namespace)
    return namespace


def test_readme_has_setup_trak_and_captum_examples():
    setup, trak_example, captum_example = blocks()
    assert "LlamaConfig" in setup and "TRAKer(" in trak_example and "ReducedTracInCP(" in captum_example


def test_trak_example(tmp_path, monkeypatch):
    setup, trak_example, _ = blocks()
    ns = run_clean(tmp_path, monkeypatch, setup, trak_example)
    model, tokenizer = ns["model"], ns["tokenizer"]
    names = [c.name for c in select(catalogue(model), ns["selection"]["selection"])]
    expected = engine_cosines(model, tokenizer, ns["queries"], ns["train"], names)
    assert_same_retrieval(np.asarray(ns["scores"], dtype=np.float64).T, expected)


def test_captum_example(tmp_path, monkeypatch):
    setup, _, captum_example = blocks()
    ns = run_clean(tmp_path, monkeypatch, setup, captum_example)
    model, tokenizer, _reducer = ns["model"], ns["tokenizer"], ns["tracin"].plan.reducer
    config = EngineConfig(progress=False)

    def projected(samples) -> torch.Tensor:  # the reducer on the engine's materialised gradients
        out = torch.as_tensor(ns["tracin"].plan.reduction.transform(sample_features(model, tokenizer, samples, config=config))).double()
        return out / out.norm(dim=1, keepdim=True)

    expected = (projected(ns["queries"]) @ projected(ns["train"]).T).numpy()
    influence = ns["influence"].detach().double().numpy()
    assert influence.shape == (len(ns["queries"]), len(ns["train"]))
    np.testing.assert_allclose(influence, expected, atol=1e-4)
    assert ns["tracin"].dim == 512
