"""``python -m benchmark.retrieval`` end to end on a tiny random-init model saved to disk (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark import pipeline
from benchmark.scaleout import comparable as strip_timings
from benchmark.retrieval import cli
from tests import tiny


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tinyllama")
    tiny.model("llama", tied=True).save_pretrained(path)
    tiny.tokenizer().save_pretrained(path)
    return path


TOPICS = ["cats sleep", "rivers flow", "bread rises", "stars burn", "coins save", "code runs"]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Six short samples (the tiny byte-level tokenizer makes long texts long)."""
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    rows = [{"id": f"t{i}", "prompt": f"Why {t}?", "response": f"Because {t} a lot.",
             "paraphrased_prompt": f"Reason {t}?", "paraphrased_response": f"{t} often, that is why."}
            for i, t in enumerate(TOPICS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def argv(model_dir, dataset, cache, *extra):
    return ["--model", str(model_dir), "--dataset", str(dataset), "--cache-dir", str(cache), "--max-length", "160",
            "--max-new-tokens", "6", "--no-progress", *extra]


def test_end_to_end_outputs(tiny_model_dir, small_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli(argv(tiny_model_dir, small_dataset, tmp_path / "cache", "--strategy", "full,greedy,random_projection",
                    "--proj-dim", "64,1%", "--out", str(out)))
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["settings"]) == {"paraphrased", "generated"}
    para = doc["settings"]["paraphrased"]
    assert para["queries"] == 6 and para["candidates"] == 5
    assert set(para["results"]) == {"full", "greedy", "random_projection@64", "random_projection@1%"}
    assert para["results"]["random_projection@64"]["dim"] == 64
    assert para["results"]["greedy"]["heldout_accuracy"] is not None
    assert set(para["baselines"]) == {"bm25", "chance", "full_gradient"}
    assert doc["identity"]["dataset_samples"] == 6 and doc["identity"]["model"] == str(tiny_model_dir)
    assert {"dataset", "model", "candidates", "generate", "table", "evaluate"} <= set(doc["stages"])
    assert doc["peak_memory"]["rss_gb"] > 0
    for name in ("components-paraphrased.png", "greedy-generated.png", "report.md",
                 "selection-paraphrased-greedy.json"):
        assert (out / name).is_file(), name
    selection = json.loads((out / "selection-paraphrased-greedy.json").read_text())
    assert selection["components"] == para["results"]["greedy"]["components"]
    # the same selection for other tools: module names and parameters the model really has
    import torch  # noqa: F401  (the tiny model is reloaded from disk for its names)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert selection["export"]["modules"] == selection["components"]
    assert set(selection["export"]["modules"]) <= dict(model.named_modules()).keys()
    assert set(selection["export"]["parameters"]) <= dict(model.named_parameters()).keys()
    assert "![components-paraphrased.png]" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "== paraphrased ==" in printed and "bm25 (baseline)" in printed


def test_interrupted_table_stage_resumes_to_the_same_json(tiny_model_dir, small_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    reference = tmp_path / "reference.json"
    assert cli(argv(tiny_model_dir, small_dataset, tmp_path / "other-cache", "--json", str(reference))) == 0

    real = pipeline.ComponentTable.save

    def killed(self, path):  # the run dies while the table is being written
        Path(str(path) + ".partial").write_bytes(b"garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.ComponentTable, "save", killed)
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(tmp_path / "never.json"))) == 130
    assert not (tmp_path / "never.json").exists()
    assert not list((cache / "benchmark").glob("table-*.npz"))  # no table file, so no corrupt one
    assert list((cache / "benchmark").glob("generations-*.json"))  # the finished stage survived

    monkeypatch.setattr(pipeline.ComponentTable, "save", real)
    resumed = tmp_path / "resumed.json"
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(resumed))) == 0
    assert strip_timings(json.loads(resumed.read_text())) == strip_timings(json.loads(reference.read_text()))

    again = tmp_path / "again.json"
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(again))) == 0
    assert json.loads(again.read_text())["run"]["table_reused"] is True
    assert strip_timings(json.loads(again.read_text())) == strip_timings(json.loads(reference.read_text()))


def one_line_error(capsys, args) -> str:
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


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


def test_full_set_reports_rank_metrics(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "full.json"
    assert cli(argv(tiny_model_dir, small_dataset, tmp_path / "cache", "--setting", "paraphrased", "--full-set",
                    "--strategy", "full", "--json", str(out))) == 0
    section = json.loads(out.read_text())["settings"]["paraphrased"]
    assert section["candidates"] == 6  # every original is a candidate of every query
    full = section["results"]["full"]
    assert {"mrr", "recall@1", "recall@5", "recall@10"} <= set(full)
    assert full["recall@1"] == full["accuracy"] and full["recall@10"] == 1.0
    assert 1 / 6 <= full["mrr"] <= 1.0
