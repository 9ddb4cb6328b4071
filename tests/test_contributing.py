"""CONTRIBUTING.md's examples, run as written: a plugin through a real entry point everywhere a reducer goes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from selproj_plugin import registry as registry_module
from selproj_plugin.registry import get_strategy, list_strategies
from selproj_plugin.table import ComponentTable
from selproj_plugin.testing import check_reducer
from tests.helpers import ROOT, contributing_python_blocks, synthetic_path

PLUGIN, WEIGHTED, CONFORMANCE = contributing_python_blocks()


def test_documented_plugin_is_registered_under_its_entry_point(attention_plugin):
    assert list_strategies()["attention_only"] == "every attention projection (q, k, v, o)"
    assert registry_module.plugin_names()["attention_only"] == "attention"


@pytest.mark.slow
def test_documented_plugin_in_the_cli_table_mode(attention_plugin, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(attention_plugin), str(ROOT)])}
    out_json = tmp_path / "out.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmark.retrieval",
            "--table",
            str(synthetic_path("paraphrased")),
            "--strategy",
            "attention_only",
            "--option",
            "attention_only.layers=4",
            "--json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out_json.read_text())["results"]["attention_only"]
    table = ComponentTable.load(synthetic_path("paraphrased"))
    expected = [str(n) for n, k, layer in zip(table.components, table.kinds, table.layers) if k in {"q", "k", "v", "o"} and 0 <= layer < 4]
    assert result["components"] == expected and len(expected) == 16


@pytest.mark.slow
def test_documented_plugin_by_name_in_trak_and_captum(attention_plugin, tmp_path):
    import logging

    from trak import TRAKer

    from selproj_plugin.adapters.captum import ReducedTracInCP, dataset
    from selproj_plugin.adapters.trak import encode, traker_kwargs
    from selproj_plugin.engine import EngineConfig, pairwise_dots
    from selproj_plugin.testing import QUERIES, TRAIN, tiny_model

    model, tokenizer = tiny_model()
    names = [
        c
        for c in [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.0.self_attn.o_proj",
        ]
    ]
    config = EngineConfig(progress=False)
    cross = pairwise_dots(model, tokenizer, QUERIES, TRAIN, names, config).sum(-1)
    q_self = np.einsum("iic->i", pairwise_dots(model, tokenizer, QUERIES, QUERIES, names, config))
    t_self = np.einsum("iic->i", pairwise_dots(model, tokenizer, TRAIN, TRAIN, names, config))
    expected = cross / np.sqrt(np.outer(q_self, t_self))

    traker = TRAKer(
        train_set_size=len(TRAIN),
        save_dir=str(tmp_path / "trak"),
        logging_level=logging.ERROR,
        **traker_kwargs(model, "attention_only", {"layers": 1}),
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(batch=encode(tokenizer, TRAIN), num_samples=len(TRAIN))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="q", checkpoint=model.state_dict(), model_id=0, num_targets=len(QUERIES))
    traker.score(batch=encode(tokenizer, QUERIES), num_samples=len(QUERIES))
    trak = np.asarray(traker.finalize_scores(exp_name="q"), dtype=np.float64).T
    np.testing.assert_allclose(trak, expected, atol=1e-4)

    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracin = ReducedTracInCP(model, dataset(tokenizer, TRAIN), [str(checkpoint)], "attention_only", {"layers": 1})
        captum = tracin.influence(encode(tokenizer, QUERIES)).detach().double().numpy()
    np.testing.assert_allclose(captum, expected, atol=1e-4)


@pytest.mark.slow
def test_documented_plugin_passes_the_conformance_kit(attention_plugin):
    from selproj_attention import AttentionOnly

    check_reducer(AttentionOnly)
    check_reducer(AttentionOnly, {"layers": 1})


def test_documented_weighted_transform_scores_the_same_on_tables_and_gradients(synthetic_paraphrased):
    paraphrased = synthetic_paraphrased
    namespace: dict = {}
    exec(compile(WEIGHTED, "CONTRIBUTING.md", "exec"), namespace)
    cls = namespace["WeightedMLP"]
    check_reducer(cls)
    result = cls().evaluate(paraphrased)
    # by hand from the table's arrays: each down projection's dot products count 3^2 times
    mlp = np.isin(paraphrased.kinds, ["gate", "up", "down"])
    w = np.where(paraphrased.kinds == "down", 9.0, 1.0) * mlp
    sim = (paraphrased.cross @ w) / np.sqrt((paraphrased.query_self @ w)[:, None] * (paraphrased.candidate_self @ w))
    hand = np.mean(np.argmax(sim, axis=1) == np.argmax(paraphrased.is_original, axis=1))
    assert result.accuracy == pytest.approx(hand)
    unweighted = get_strategy("greedy", selection=[str(n) for n in paraphrased.components[mlp]]).evaluate(paraphrased)
    assert not np.allclose(result.similarity, unweighted.similarity)  # the weights were applied


@pytest.mark.slow
def test_documented_conformance_test_runs_under_pytest(attention_plugin, tmp_path):
    test_file = tmp_path / "test_plugin_conforms.py"
    test_file.write_text(textwrap.dedent(CONFORMANCE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(attention_plugin), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert "7 passed" in done.stdout


@pytest.mark.slow
def test_documented_pyproject_installs_a_plugin_pip_finds(tmp_path):
    """The plugin folder exactly as documented (its module and its pyproject.toml), installed by pip."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    toml = text.split("```toml\n", 1)[1].split("```", 1)[0]
    source = tmp_path / "src"
    (source / "selproj_attention").mkdir(parents=True)
    (source / "selproj_attention" / "__init__.py").write_text(PLUGIN)
    (source / "pyproject.toml").write_text(toml)
    site = tmp_path / "site"
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    listed = subprocess.run(
        [sys.executable, "-m", "benchmark.retrieval", "--list-strategies"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    at = lines.index("attention_only  [plugin: attention]")  # the entry point's name, from the documented toml
    assert lines[at + 1].strip() == "every attention projection (q, k, v, o)" and "warning" not in listed.stderr
