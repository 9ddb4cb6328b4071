"""``python -m benchmark.retrieval`` end to end on a tiny random-init model saved to disk (no hub)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark import pipeline
from benchmark.scaleout import comparable as strip_timings
from benchmark.retrieval import cli
from tests.helpers import one_line_error, argv, install_plugin, synthetic_path


@pytest.mark.slow
def test_end_to_end_outputs(tiny_model_dir, small_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli(
        argv(
            tiny_model_dir,
            small_dataset,
            tmp_path / "cache",
            "--strategy",
            "full,greedy,random_projection,random_projection_per_component",
            "--proj-dim",
            "64,1%",
            "--out",
            str(out),
        )
    )
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["settings"]) == {"paraphrased", "generated"}
    para = doc["settings"]["paraphrased"]
    assert para["queries"] == 6 and para["candidates"] == 5
    assert set(para["results"]) == {
        "full",
        "greedy",
        "random_projection@64",
        "random_projection@1%",
        "random_projection_per_component@64",
        "random_projection_per_component@1%",
    }
    assert para["results"]["random_projection@64"]["dim"] == 64
    assert para["results"]["random_projection_per_component@64"]["dim"] == 64
    greedy = para["results"]["greedy"]
    assert greedy["heldout_accuracy_ci"][0] <= greedy["heldout_accuracy"] <= greedy["heldout_accuracy_ci"][1]
    assert greedy["vs_full"]["basis"] == "held-out" and 0 < greedy["vs_full"]["p_value"] <= 1
    assert set(para["baselines"]) == {"bm25", "chance", "full_gradient"}
    assert para["baselines"]["bm25"]["basis"] == "BM25 scores of the candidates"
    # the paper's gradient by default: embedding and weight matrices, no norm
    assert para["component_set"] == "paper"
    assert not [c for c in para["results"]["full"]["components"] if "norm" in c]
    assert doc["identity"]["dataset_samples"] == 6 and doc["identity"]["model"] == str(tiny_model_dir)
    assert {"dataset", "model", "candidates", "generate", "table", "evaluate"} <= set(doc["stages"])
    assert doc["peak_memory"]["rss_gb"] > 0
    for name in ("components-paraphrased.png", "greedy-generated.png", "report.md", "selection-paraphrased-greedy.json"):
        assert (out / name).is_file(), name
    selection = json.loads((out / "selection-paraphrased-greedy.json").read_text())
    assert selection["components"] == para["results"]["greedy"]["components"]
    # the same selection for other tools: module names and parameters the model really has
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert selection["export"]["modules"] == selection["components"]
    assert set(selection["export"]["modules"]) <= dict(model.named_modules()).keys()
    assert set(selection["export"]["parameters"]) <= dict(model.named_parameters()).keys()
    report = (out / "report.md").read_text()
    assert "![components-paraphrased.png]" in report and "component set `paper`" in report
    ci = greedy["heldout_accuracy_ci"]
    assert f"**{greedy['heldout_accuracy']:.4f}** | [{ci[0]:.3f}, {ci[1]:.3f}] | held-out" in report
    printed = capsys.readouterr().out
    assert "== paraphrased ==" in printed and "bm25 (baseline)" in printed
    # the cached table holds both settings; --table scores each apart, with the run's figures (it pooled them)
    cached = next((tmp_path / "cache").rglob("table-*.npz"))
    assert cli(["--table", str(cached), "--strategy", "full", "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["settings"]
    assert list(again) == [f"{cached.stem}-paraphrased", f"{cached.stem}-generated"]
    for setting, section in zip(("paraphrased", "generated"), again.values()):
        assert section["queries"] == doc["settings"][setting]["queries"]
        assert section["results"]["full"]["accuracy"] == doc["settings"][setting]["results"]["full"]["accuracy"]


@pytest.mark.slow
def test_a_dot_order_asked_for_gets_its_own_table(tiny_model_dir, small_dataset, tmp_path):
    """Left to choose, one process takes this small table component by component; asked to stream (for equal
    bits with torchrun), it must not reuse that table from the cache."""
    from selproj_plugin.table import ComponentTable

    cache = tmp_path / "cache"
    docs = {}
    for order in ("auto", "stream", "auto"):
        out = tmp_path / f"{order}.json"
        assert (
            cli(
                argv(
                    tiny_model_dir,
                    small_dataset,
                    cache,
                    "--setting",
                    "paraphrased",
                    "--strategy",
                    "full",
                    "--dot-order",
                    order,
                    "--json",
                    str(out),
                )
            )
            == 0
        )
        docs[order] = json.loads(out.read_text())
        table = ComponentTable.load(docs[order]["run"]["table_cache"])
        assert table.meta["plan"]["dot_order"] == ("gram" if order == "auto" else "stream")
    assert docs["stream"]["run"]["table_reused"] is False and docs["auto"]["run"]["table_reused"] is True


@pytest.mark.slow
def test_components_all_adds_norms_under_its_own_cache_key(tiny_model_dir, small_dataset, tmp_path):
    cache = tmp_path / "cache"
    docs = {}
    for scope in ("paper", "all"):
        out = tmp_path / f"{scope}.json"
        assert (
            cli(
                argv(
                    tiny_model_dir,
                    small_dataset,
                    cache,
                    "--setting",
                    "paraphrased",
                    "--strategy",
                    "full",
                    "--components",
                    scope,
                    "--json",
                    str(out),
                )
            )
            == 0
        )
        docs[scope] = json.loads(out.read_text())
    assert docs["all"]["run"]["table_reused"] is False  # not the paper table from the same cache
    paper, every = (docs[s]["settings"]["paraphrased"] for s in ("paper", "all"))
    assert paper["component_set"] == "paper" and every["component_set"] == "all"
    norms = [c for c in every["results"]["full"]["components"] if "norm" in c]
    assert "model.norm" in norms and every["components"] == paper["components"] + len(norms)


@pytest.mark.slow
def test_interrupted_table_save_leaves_no_table_and_resumes(tiny_model_dir, small_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    reference = tmp_path / "reference.json"
    assert cli(argv(tiny_model_dir, small_dataset, tmp_path / "other-cache", "--json", str(reference))) == 0

    real = np.savez
    written = []

    def killed(file, **arrays):  # the real ComponentTable.save runs; the run dies halfway through its bytes
        buffer = io.BytesIO()
        real(buffer, **arrays)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        file.flush()
        written.append(len(buffer.getvalue()) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed)
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(tmp_path / "never.json"))) == 130
    monkeypatch.setattr(np, "savez", real)
    assert written and written[0] > 1000  # the table's bytes were being written when the run died
    assert not (tmp_path / "never.json").exists()
    left = sorted(p.name for p in (cache / "benchmark").iterdir())
    assert [n for n in left if n.startswith("generations-")] and all(n.startswith("generations-") for n in left), left

    resumed = tmp_path / "resumed.json"
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(resumed))) == 0
    assert json.loads(resumed.read_text())["run"]["table_reused"] is False
    assert strip_timings(json.loads(resumed.read_text())) == strip_timings(json.loads(reference.read_text()))

    again = tmp_path / "again.json"
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(again))) == 0
    assert json.loads(again.read_text())["run"]["table_reused"] is True
    assert strip_timings(json.loads(again.read_text())) == strip_timings(json.loads(reference.read_text()))


@pytest.mark.slow
def test_bad_input_errors(tiny_model_dir, small_dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    err = one_line_error(capsys, argv(tmp_path / "no-such-model", small_dataset, cache))
    assert "cannot load model" in err and "no-such-model" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "p", "response": "r"}) + "\n")
    assert "missing field 'paraphrased_prompt'" in one_line_error(capsys, argv(tiny_model_dir, bad, cache))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "has no usable samples" in one_line_error(capsys, argv(tiny_model_dir, empty, cache))
    err = one_line_error(capsys, argv(tiny_model_dir, small_dataset, cache, "--setting", "paraphrase"))
    assert "unknown setting paraphrase; choose from paraphrased, generated" in err
    err = one_line_error(capsys, argv(tiny_model_dir, small_dataset, cache, "--strategy", "gredy"))
    assert "unknown strategy 'gredy'" in err
    err = one_line_error(capsys, argv(tiny_model_dir, small_dataset, cache, "--threads", "0"))
    assert "--threads must be at least 1, got 0" in err
    err = one_line_error(capsys, argv(tiny_model_dir, small_dataset, cache, "--max-spill-gb", "-1"))
    assert "--max-spill-gb must be at least 0, got -1.0" in err


@pytest.mark.slow
def test_full_set_reports_rank_metrics(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "full.json"
    assert (
        cli(
            argv(
                tiny_model_dir,
                small_dataset,
                tmp_path / "cache",
                "--setting",
                "paraphrased",
                "--full-set",
                "--strategy",
                "full,greedy",
                "--json",
                str(out),
            )
        )
        == 0
    )
    section = json.loads(out.read_text())["settings"]["paraphrased"]
    assert section["candidates"] == 6  # every original is a candidate of every query
    full = section["results"]["full"]
    assert {"mrr", "recall@1", "recall@5", "recall@10", "mrr_ci", "recall@1_ci"} <= set(full)
    assert full["recall@1"] == full["accuracy"] and full["recall@10"] == 1.0 and full["rank_basis"] == "not fitted"
    assert 1 / 6 <= full["mrr"] <= 1.0 and full["mrr_ci"][0] <= full["mrr"] <= full["mrr_ci"][1]
    greedy = section["results"]["greedy"]
    assert greedy["rank_basis"] == "held-out" and greedy["recall@1"] == greedy["heldout_accuracy"]
    # BM25 ranks the whole pool itself; its first column (sample t0) is the original of one query in six
    bm25 = section["baselines"]["bm25"]
    assert bm25["basis"] == "BM25 scores over the whole pool"
    assert bm25["accuracy"] >= 0.5 and bm25["recall@1"] == bm25["accuracy"] and bm25["recall@10"] == 1.0
    assert bm25["accuracy"] <= bm25["mrr"] <= 1.0


CUSTOM_PLUGIN = '''
from dataclasses import dataclass
import torch
from selproj_plugin import Reducer, Transform, hookimpl
from selproj_plugin.strategies.greedy import Greedy


class SignOf(Transform):
    """sign(g) of the selected gradients: no component table can express it."""
    def __init__(self, components):
        self.components = tuple(components)
        self.dim = sum(c.num_params for c in self.components)
        self.key = "sign@%d" % self.dim

    def __call__(self, features):
        self.check(features)
        return torch.cat([torch.sign(features[c.name]) for c in self.components], dim=1)


@dataclass
class SignMLP(Reducer):
    name = "sign_mlp"
    summary = "signs of the MLP gradients"

    def select(self, components):
        return [c.name for c in components if c.kind in ("gate", "up", "down")]

    def transform(self, selected):
        return SignOf(selected)


@dataclass
class SignGreedy(Greedy):
    name = "sign_greedy"
    summary = "greedy selection, then signs of the selected gradients"

    def transform(self, selected):
        return SignOf(selected)


@hookimpl
def selproj_strategies():
    return [SignMLP, SignGreedy]
'''


@pytest.mark.slow
def test_a_transform_no_table_can_express_is_scored_from_gradients(tiny_model_dir, small_dataset, tmp_path, monkeypatch, capsys):
    from selproj_plugin import registry as registry_module
    from selproj_plugin.engine import EngineConfig, sample_features
    from selproj_plugin.samples import Sample
    from transformers import AutoModelForCausalLM, AutoTokenizer

    install_plugin(tmp_path, "selproj-sign", "sign", "selproj_sign_plugin", CUSTOM_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry_module.registry(reload=True)
    try:
        out = tmp_path / "r.json"
        assert (
            cli(
                argv(
                    tiny_model_dir,
                    small_dataset,
                    tmp_path / "cache",
                    "--setting",
                    "paraphrased",
                    "--strategy",
                    "sign_mlp,sign_greedy,full",
                    "--json",
                    str(out),
                )
            )
            == 0
        )
        result = json.loads(out.read_text())["settings"]["paraphrased"]["results"]
        # by hand: signs of the engine's per-sample MLP gradients, cosine of each query with its candidates
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        rows = [json.loads(line) for line in small_dataset.read_text().splitlines()]
        names = [n for n in result["sign_mlp"]["components"]]
        config = EngineConfig(progress=False, max_length=160)

        def signs(samples):
            feats = sample_features(model, tokenizer, samples, names, config)
            v = torch.cat([torch.sign(feats[n]) for n in names], dim=1).double()
            return v / v.norm(dim=1, keepdim=True)

        queries = signs([Sample(r["id"], r["paraphrased_prompt"], r["paraphrased_response"]) for r in rows])
        originals = signs([Sample(r["id"], r["prompt"], r["response"]) for r in rows])
        cos = (queries @ originals.T).numpy()
        table = pipeline.ComponentTable.load(next((tmp_path / "cache").rglob("table-*.npz")))
        index = {r["id"]: i for i, r in enumerate(rows)}
        credits = []
        for _q, (qid, cands, orig) in enumerate(zip(table.query_ids, table.candidate_ids, table.is_original)):
            scores = np.array([cos[index[str(qid).split("#")[0]], index[str(c)]] for c in cands])
            top = np.isclose(scores, scores.max(), rtol=0, atol=1e-9)
            credits.append(top[orig.argmax()] / top.sum())
        assert result["sign_mlp"]["accuracy"] == pytest.approx(np.mean(credits))
        assert result["sign_mlp"]["dim"] == sum(p.numel() for n, p in model.named_parameters() if any(n.startswith(m) for m in names))
        assert result["sign_mlp"]["fidelity"] < 0.999  # not the plain concatenation
        assert result["sign_greedy"]["heldout_accuracy"] is not None  # fitted: held-out from gradients per fold
        # the run's table stores the unfitted transform's cosines, so --table mode scores it the same ...
        stored = tmp_path / "stored.json"
        table_file = next((tmp_path / "cache").rglob("table-*.npz"))
        assert cli(["--table", str(table_file), "--strategy", "sign_mlp", "--json", str(stored)]) == 0
        again = json.loads(stored.read_text())["results"]["sign_mlp"]
        assert again["accuracy"] == pytest.approx(result["sign_mlp"]["accuracy"])
        # ... and a table without them has no gradients to fall back on: one line, never scored as something else
        assert cli(["--table", str(synthetic_path("paraphrased")), "--strategy", "sign_mlp"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            err[-1].startswith("error: strategy 'sign_mlp': its transform (SignOf, sign@")
            and "cannot be scored from a component table" in err[-1]
        )
    finally:
        monkeypatch.undo()
        registry_module.registry(reload=True)


@pytest.mark.slow
def test_plan_predicts_the_runs_captures_before_any_gradient(tiny_model_dir, small_dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    for extra in ((), ("--memory-limit-gb", "0.01", "--max-spill-gb", "0")):  # keep all; recompute every candidate
        extra = ("--no-pool-ranking", *extra)  # BM25's 5 candidates only, not every original
        plan_json, run_json = tmp_path / "plan.json", tmp_path / "run.json"
        assert (
            cli(
                argv(
                    tiny_model_dir,
                    small_dataset,
                    cache,
                    "--setting",
                    "paraphrased",
                    "--strategy",
                    "full",
                    "--plan",
                    "--json",
                    str(plan_json),
                    *extra,
                )
            )
            == 0
        )
        assert "predicted peak memory" in capsys.readouterr().out
        assert not list((cache / "benchmark").glob("table-*"))  # planning built nothing
        plan = json.loads(plan_json.read_text())["plan"]
        assert (
            cli(
                argv(
                    tiny_model_dir, small_dataset, cache, "--setting", "paraphrased", "--strategy", "full", "--json", str(run_json), *extra
                )
            )
            == 0
        )
        assert json.loads(run_json.read_text())["notes"]["captures"] == plan["captures"]
        for table in (cache / "benchmark").glob("table-*"):
            table.unlink()
    # 6 queries x 5 candidates from 6 originals, nothing kept: each query with its 5 candidates
    assert plan["kept"] == 0 and plan["captures"] == 6 * 6


@pytest.mark.slow
def test_no_progress_silences_hugging_face_bars_too(tiny_model_dir, small_dataset, tmp_path):
    """``--no-progress`` promises no progress bars; transformers draws its own while loading weights."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "benchmark.retrieval", *argv(tiny_model_dir, small_dataset, tmp_path / "cache", "--plan")],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "it/s]" not in done.stderr and "Loading weights" not in done.stderr, done.stderr[-500:]


@pytest.mark.slow
def test_a_table_cached_before_query_groups_were_recorded_is_scored_per_setting(tiny_model_dir, small_dataset, tmp_path):
    """Tables cached before ``meta['query_groups']`` existed have no record; the run that reuses one knows its
    settings' order (the cache key holds the queries) and scores each apart, as it did when it built it."""
    from selproj_plugin.table import ComponentTable

    cache, first, again = tmp_path / "cache", tmp_path / "first.json", tmp_path / "again.json"
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(first))) == 0
    [path] = [p for p in (cache / "benchmark").iterdir() if p.name.startswith("table-") and p.suffix == ".npz"]
    old = ComponentTable.load(path)
    del old.meta["query_groups"]
    old.save(path)
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(again))) == 0
    doc = json.loads(again.read_text())
    assert doc["run"]["table_reused"] is True
    assert strip_timings(doc) == strip_timings(json.loads(first.read_text()))


@pytest.mark.slow
def test_a_cached_table_for_other_candidates_is_rebuilt_not_reused(tiny_model_dir, small_dataset, tmp_path, capsys, monkeypatch):
    """The key holds the candidate count, not which candidates: another BM25 ranking (a bm25s release) gives
    other rows, and their table must be built, not taken from the cache."""
    cache, first, other = tmp_path / "cache", tmp_path / "first.json", tmp_path / "other.json"
    args = argv(
        tiny_model_dir, small_dataset, cache, "--setting", "paraphrased", "--strategy", "full", "--candidates", "3", "--no-pool-ranking"
    )  # a whole-pool table's rows do not depend on BM25
    from selproj_plugin.table import ComponentTable

    assert cli([*args, "--json", str(first)]) == 0
    path = json.loads(first.read_text())["run"]["table_cache"]
    before = ComponentTable.load(path).candidate_ids
    real = pipeline.bm25_scores
    monkeypatch.setattr(pipeline, "bm25_scores", lambda queries, pool: -real(queries, pool))  # another ranking
    capsys.readouterr()
    assert cli([*args, "--json", str(other)]) == 0
    doc = json.loads(other.read_text())
    assert doc["run"]["table_reused"] is False and doc["run"]["table_cache"] == path  # same key, other rows
    err = [line for line in capsys.readouterr().err.splitlines() if "[selproj] cached" in line]
    assert len(err) == 1 and "was built for other rows (query t" in err[0] and "rebuilding it" in err[0], err
    after = ComponentTable.load(path).candidate_ids
    assert after.shape == before.shape and not np.array_equal(after, before)
    assert cli([*args, "--json", str(other)]) == 0
    assert json.loads(other.read_text())["run"]["table_reused"] is True  # the rebuilt table fits this run
