"""The fine-tune stage, whole-pool ranking and the checkpoint study, on tiny random-init models."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark import checkpoints as study
from benchmark.cache import StageCache
from benchmark.finetune import FinetuneError, FinetuneSettings, finetune, stage_key
from benchmark.pipeline import Run
from benchmark.retrieval import cli, pool_section
from selproj_plugin.samples import Sample
from selproj_plugin.table import ComponentTable
from tests import tiny
from tests import helpers
from tests.helpers import error_line, write_dataset

ORIGINALS = tiny.SAMPLES
PARAPHRASES = [Sample(f"{s.id}#p", s.prompt + " please", s.response.lower()) for s in tiny.SAMPLES]
BASE = {"weights": "w0", "dataset_digest": "d0"}
FAST = FinetuneSettings(epochs=2, lr=1e-3, batch_size=2, save_every=1, max_length=128)


def run_finetune(cache_dir: Path, settings: FinetuneSettings = FAST, **kwargs):
    model = tiny.model("llama", tied=True)
    result = finetune(
        model, tiny.tokenizer(), ORIGINALS, PARAPHRASES, settings, cache=StageCache(cache_dir), base=BASE, progress=False, **kwargs
    )
    return model, result


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_finetune_is_deterministic_trains_every_matrix_and_records_its_lineage(tmp_path):
    a, ra = run_finetune(tmp_path / "a")
    b, rb = run_finetune(tmp_path / "b")
    assert same_weights(a, b)
    base = tiny.model("llama", tied=True)
    changed = {n for (n, p), q in zip(a.named_parameters(), base.parameters()) if not torch.equal(p, q)}
    from selproj_plugin.components import catalogue

    assert {p for c in catalogue(base) for p in c.param_names} <= changed  # every listed matrix trained
    rec = ra.record
    assert rec["steps"] == 6 and rec["epochs"] == 2 and rec["lr"] == 1e-3 and rec["base_weights"] == "w0"
    assert set(rec["loss_before"]) == {"originals", "paraphrases"}
    assert rec["loss_after"]["originals"] < rec["loss_before"]["originals"]
    assert {k: v for k, v in rec.items() if k != "seconds"} == {k: v for k, v in rb.record.items() if k != "seconds"}
    assert not a.training  # back in eval mode, as the engine expects


def test_a_step_in_pieces_trains_as_one_batch_would(tmp_path):
    """Pieces bound the activations; the step's gradient is still the batch's mean loss's."""
    whole, _ = run_finetune(tmp_path / "whole", dataclasses.replace(FAST, batch_tokens=10_000))
    cut, _ = run_finetune(tmp_path / "cut", dataclasses.replace(FAST, batch_tokens=1))  # one sample a piece
    for a, b in zip(whole.parameters(), cut.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    base = tiny.model("llama", tied=True)
    assert not all(torch.equal(a, b) for a, b in zip(base.parameters(), cut.parameters()))
    from benchmark.finetune import _pieces
    from selproj_plugin.loss import encode_samples

    encoded, _ = encode_samples(tiny.tokenizer(), ORIGINALS, 128)
    lengths = [len(e.input_ids) for e in encoded]
    pieces = _pieces(encoded, 2 * max(lengths))
    assert [e for p in pieces for e in p] == encoded
    assert all(len(p) * max(len(e.input_ids) for e in p) <= 2 * max(lengths) for p in pieces)


def test_rerun_reuses_the_finished_fine_tune(tmp_path):
    first, r1 = run_finetune(tmp_path)
    second, r2 = run_finetune(tmp_path, on_step=lambda step, loss: pytest.fail("trained again"))
    assert not r1.reused and r2.reused and same_weights(first, second)
    assert not list((tmp_path / "benchmark").glob("*.resume.pt"))  # finished: no resume point left behind


def test_a_fine_tune_with_other_settings_reuses_the_base_models_losses(tmp_path, monkeypatch):
    from benchmark import finetune as module

    _, first = run_finetune(tmp_path)
    calls = []
    real = module.mean_loss
    monkeypatch.setattr(module, "mean_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, other = run_finetune(tmp_path, dataclasses.replace(FAST, lr=2e-3))
    assert len(calls) == 2  # only the losses after: the base model's were cached
    assert other.record["loss_before"] == first.record["loss_before"]
    assert other.record["loss_after"] != first.record["loss_after"]


def test_every_setting_changes_the_cache_key(tmp_path):
    cache = StageCache(tmp_path)

    def path(s, base=BASE, originals=ORIGINALS):
        return cache.path("finetune", stage_key(s, base, "paper", originals), "json")

    seen = {path(FAST)}
    changed = {
        "epochs": 3,
        "lr": 2e-3,
        "batch_size": 3,
        "weight_decay": 0.1,
        "seed": 1,
        "max_length": 129,
        "checkpoints": 3,
        "batch_tokens": 100,
    }
    assert set(changed) == set(FAST.key())  # a new setting must be listed here too
    for name, value in changed.items():
        seen.add(path(dataclasses.replace(FAST, **{name: value})))
    seen.add(path(FAST, {**BASE, "weights": "w1"}))
    seen.add(path(FAST, {**BASE, "dataset_digest": "d1"}))
    seen.add(path(FAST, originals=ORIGINALS[:4]))
    assert len(seen) == len(changed) + 4
    assert path(dataclasses.replace(FAST, save_every=5)) == path(FAST)  # where resume points fall changes nothing


def test_an_interrupted_fine_tune_resumes_from_its_last_save_and_ends_as_an_uninterrupted_one(tmp_path, capsys):
    whole, _ = run_finetune(tmp_path / "whole")

    def stop(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(tmp_path / "cut", on_step=stop)
    assert list((tmp_path / "cut" / "benchmark").glob("*.resume.pt"))
    assert not list((tmp_path / "cut" / "benchmark").glob("finetune-*.json"))  # not finished
    steps = []
    resumed, record = run_finetune(tmp_path / "cut", on_step=lambda step, loss: steps.append(step))
    assert steps == [4, 5, 6]
    assert "resumes at step 3 of 6" in capsys.readouterr().err
    assert same_weights(whole, resumed)


def test_a_stop_while_a_resume_point_is_written_stays_a_stop_and_leaves_no_file(tmp_path, monkeypatch):
    """torch's zip writer, stopped mid-record, fails again on closing; the stop must reach the CLI as a stop."""
    from benchmark import finetune as module

    class Stopping(io.RawIOBase):
        def __init__(self, fh):
            self.fh, self.writes = fh, 0

        def writable(self):
            return True

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                self.fh.write(bytes(data)[:7])  # part of a record, then the stop
                raise KeyboardInterrupt
            return self.fh.write(data)

        def flush(self):
            self.fh.flush()

    real = module.atomic_write
    monkeypatch.setattr(module, "atomic_write", lambda path, write: real(path, lambda fh: write(Stopping(fh))))
    with pytest.raises(KeyboardInterrupt):
        module._save_torch(tmp_path / "state.pt", {"a": torch.zeros(100_000), "b": torch.ones(100_000)})
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_are_evenly_spaced_and_each_stored(tmp_path):
    model, result = run_finetune(tmp_path, dataclasses.replace(FAST, checkpoints=3))
    assert [c.step for c in result.checkpoints] == [0, 3, 6] and result.checkpoints[0].path is None
    assert all(Path(c.path).is_file() for c in result.checkpoints[1:])
    with pytest.raises(FinetuneError, match="needs at least 7 optimiser steps"):
        run_finetune(tmp_path, dataclasses.replace(FAST, checkpoints=8))


def test_a_diverging_fine_tune_stops_before_saving_diverged_weights(tmp_path):
    model = tiny.model("llama", tied=True)

    def diverge(step, loss):
        if step == 2:
            with torch.no_grad():
                model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))

    with pytest.raises(FinetuneError, match="diverged at step 3 of 6"):
        finetune(
            model, tiny.tokenizer(), ORIGINALS, PARAPHRASES, FAST, cache=StageCache(tmp_path), base=BASE, progress=False, on_step=diverge
        )
    assert not list((tmp_path / "benchmark").glob("finetune-*.json"))
    saved = torch.load(next((tmp_path / "benchmark").glob("*.resume.pt")), weights_only=False)
    assert saved["step"] == 2  # the last resume point holds finite weights
    assert all(bool(torch.isfinite(t).all()) for t in saved["model"].values())


# ---- the CLI -----------------------------------------------------------------------------------------


# greedy on 6 samples after a 2-step fine-tune, 3 candidates a query
ONE_EPOCH_GREEDY = ("--strategy", "greedy", "--finetune-epochs", "1", "--finetune-batch-size", "3", "--candidates", "3")


def argv(model_dir, dataset, cache, *extra):
    return helpers.argv(model_dir, dataset, cache, "--setting", "paraphrased", "--folds", "2", *extra)


def test_cli_checkpoint_study_pool_ranking_and_reuse(tiny_model_dir, tmp_path, capsys):
    data = write_dataset(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    args = argv(
        tiny_model_dir,
        data,
        tmp_path / "cache",
        "--strategy",
        "full,greedy,random_projection",
        "--proj-dim",
        "64",
        "--finetune-epochs",
        "2",
        "--finetune-lr",
        "1e-3",
        "--finetune-batch-size",
        "2",
        "--checkpoints",
        "3",
        "--candidates",
        "3",
        "--out",
        str(out),
    )
    assert cli(args) == 0
    doc = json.loads((out / "results.json").read_text())
    ft = doc["finetune"]
    assert ft["epochs"] == 2 and ft["steps"] == 6 and ft["checkpoint_steps"] == [0, 3, 6] and not ft["reused"]
    assert ft["loss_after"]["originals"] < ft["loss_before"]["originals"]
    section = doc["settings"]["paraphrased"]
    assert section["candidates"] == 3
    pool = section["pool"]
    assert pool["candidates"] == 6 and set(pool["results"]) == {"full", "greedy", "random_projection"}
    assert pool["results"]["greedy"]["rank_basis"] == "held-out"
    assert pool["baselines"]["bm25"]["rank_basis"] == "BM25 scores over the whole pool"
    study_part = doc["checkpoints"]["settings"]["paraphrased"]
    assert doc["checkpoints"]["steps"] == [0, 3, 6] and len(set(doc["checkpoints"]["weights"])) == 3
    assert len(study_part["per_checkpoint"]) == 3
    assert np.shape(study_part["transfer"]["greedy"]["accuracy"]) == (3, 3)
    for i, part in enumerate(study_part["per_checkpoint"]):  # the diagonal is each checkpoint's held-out accuracy
        assert study_part["transfer"]["greedy"]["accuracy"][i][i] == part["results"]["greedy"]["heldout_accuracy"]
        assert study_part["jaccard"]["greedy"][i][i] == 1.0
    assert set(study_part["tracin"]) == {"tracin:full", "tracin:greedy"}  # projections are per checkpoint
    assert study_part["tracin"]["tracin:greedy"]["vs_full"]["basis"] == "held-out"
    for name in ("checkpoints-paraphrased.png", "transfer-paraphrased-greedy.png", "report.md"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "Whole pool" in report and "transfer matrix" in report and "## fine-tune" in report
    # the last checkpoint is the trained model: its results are the run's
    assert section["results"]["greedy"] == study_part["per_checkpoint"][-1]["results"]["greedy"] | {
        k: v for k, v in section["results"]["greedy"].items() if k == "seconds"
    }
    from benchmark import docs
    from benchmark.doc_records import Record

    record = Record(
        table="checkpoints", command="c", machine="m", date="d", commit="x", result=doc, label="tiny", source="tiny.json"
    )  # what the run wrote is a record the docs' tables read
    assert "2 x 6 originals, lr 0.001, 6 steps" in docs.finetune([record])
    assert "| tiny | paraphrased (6 x 6) | bm25 (baseline) |" in docs.pool([record])
    assert "paraphrased: greedy fitted at 2, held-out at each" in docs.checkpoints([record])
    capsys.readouterr()
    assert cli(args + ["--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["finetune"]["reused"] and again["run"]["table_reused"]
    assert again["checkpoints"]["settings"]["paraphrased"]["transfer"] == study_part["transfer"]


def test_cli_empty_response_and_divergence_exit_2_in_one_line_keeping_what_was_written(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "keep.json"
    out.write_text('{"earlier": true}\n')
    bad = write_dataset(tmp_path / "bad.jsonl", empty_response=True)
    assert cli(argv(tiny_model_dir, bad, tmp_path / "cache", "--finetune-epochs", "1", "--json", str(out))) == 2
    assert "'response' is empty" in error_line(capsys.readouterr().err)
    good = write_dataset(tmp_path / "good.jsonl")
    from selproj_plugin import loss

    real = loss.forward_losses
    monkeypatch.setattr(
        loss,
        "forward_losses",  # training diverges: NaN losses once gradients are taken
        lambda model, batch: real(model, batch) * (float("nan") if torch.is_grad_enabled() else 1.0),
    )
    assert cli(argv(tiny_model_dir, good, tmp_path / "cache", "--finetune-epochs", "1", "--json", str(out))) == 2
    assert "diverged" in error_line(capsys.readouterr().err)
    assert out.read_text() == '{"earlier": true}\n'
    assert (tiny_model_dir / "config.json").is_file()


def test_no_progress_logs_each_phase_as_lines_not_bars(tiny_model_dir, tmp_path, capsys):
    """With bars off a long run still says what it is doing: a line as each phase starts and ends, no \\r."""
    assert cli(argv(tiny_model_dir, write_dataset(tmp_path / "d.jsonl"), tmp_path / "cache", *ONE_EPOCH_GREEDY)) == 0
    printed = capsys.readouterr()
    assert "\r" not in printed.err
    stamped = [re.fullmatch(r"\[selproj\] \d\d:\d\d:\d\d (.*)", line) for line in printed.err.splitlines()]
    assert all(stamped), printed.err  # every line timed, for a log file
    lines = [m.group(1) for m in stamped]
    assert "fine-tune: 2 steps" in lines, lines
    assert any(line.startswith("fine-tune: 2/2 steps in ") and "batch_loss=" in line for line in lines), lines
    assert any(line.startswith("table: 6 queries x 6 candidates") for line in lines), lines
    assert any(line.startswith("stage table: done in ") for line in lines), lines
    assert "capture: 12 samples" in lines and any(  # the engine's, 6 queries and 6 candidates
        line.startswith("capture: 12/12 samples in ") for line in lines
    ), lines
    assert not any(line.startswith("generate") for line in lines), lines  # paraphrased only: nothing to generate
    # the run's output says what the fine-tune did to the loss, as the report's table does
    summary = next(line for line in printed.out.splitlines() if line.startswith("fine-tune: "))
    record = json.loads(next((tmp_path / "cache" / "benchmark").glob("finetune-*.json")).read_text())
    before, after = record["loss_before"]["originals"], record["loss_after"]["originals"]
    assert summary.startswith("fine-tune: 2 steps on 6 originals (1 epoch(s), lr 0.0001)"), summary
    assert f"originals {before:.3f} -> {after:.3f}" in summary, summary


def test_trained_model_is_the_runs_fine_tuned_model_from_its_cache(tiny_model_dir, tmp_path, monkeypatch):
    """What a run measured, handed to TRAK or Captum: the same weights, read from the cache, not trained again."""
    from benchmark.pipeline import PipelineOptions, trained_model
    from selproj_plugin.models import load_model, weights_fingerprint

    data, cache, out = write_dataset(tmp_path / "d.jsonl"), tmp_path / "cache", tmp_path / "run.json"
    assert cli(argv(tiny_model_dir, data, cache, *ONE_EPOCH_GREEDY, "--json", str(out))) == 0
    measured = json.loads(out.read_text())["identity"]["weights"]
    monkeypatch.setattr(torch.optim, "AdamW", None)  # any training now fails
    model, tokenizer = trained_model(
        PipelineOptions(
            model=str(tiny_model_dir), dataset=str(data), cache_dir=str(cache), finetune=FinetuneSettings(epochs=1, batch_size=3)
        )
    )
    assert weights_fingerprint(model) == measured != weights_fingerprint(load_model(str(tiny_model_dir))[0])
    assert not model.training and tokenizer is not None


def test_trained_models_default_is_what_make_bench_runs():
    from benchmark.pipeline import make_bench_options
    from benchmark.retrieval import finetune_settings, parse_args

    args, opts = parse_args([]), make_bench_options()
    assert opts.finetune == finetune_settings(args) and opts.finetune.epochs >= 1
    assert (opts.model, opts.dataset, opts.max_samples, opts.scope, opts.dtype, opts.seed) == (
        args.model,
        args.dataset,
        args.max_samples,
        args.components or "paper",
        args.dtype,
        args.seed,
    )


# ---- whole-pool ranking, transfer, Jaccard and TracIn on hand-made tables ------------------------------


def one_component_table(cross: np.ndarray, is_original: np.ndarray) -> ComponentTable:
    q, k = cross.shape
    return ComponentTable(
        cross=cross[:, :, None].astype(float),
        query_self=np.ones((q, 1)),
        candidate_self=np.ones((q, k, 1)),
        is_original=is_original,
        components=np.array(["model.layers.0.mlp.down_proj"]),
        num_params=np.array([10]),
    )


def test_a_checkpoint_study_with_a_generated_setting_writes_its_report(tiny_model_dir, tmp_path):
    """Generated queries differ by checkpoint, so that setting has no study; the report and plots still come out."""
    out = tmp_path / "out"
    args = argv(
        tiny_model_dir,
        write_dataset(tmp_path / "d.jsonl"),
        tmp_path / "cache",
        "--strategy",
        "full,greedy",
        "--setting",
        "paraphrased,generated",
        "--max-new-tokens",
        "8",
        "--finetune-epochs",
        "1",
        "--finetune-batch-size",
        "3",
        "--checkpoints",
        "2",
        "--candidates",
        "3",
        "--out",
        str(out),
    )
    assert cli(args) == 0
    doc = json.loads((out / "results.json").read_text())
    assert "skipped" in doc["checkpoints"]["settings"]["generated"]
    assert len(doc["checkpoints"]["settings"]["paraphrased"]["per_checkpoint"]) == 2
    assert (out / "checkpoints-paraphrased.png").is_file() and not (out / "checkpoints-generated.png").exists()
    assert "transfer matrix" in (out / "report.md").read_text()


def test_pool_mrr_and_recall_match_hand_computed_ranks():
    scores = np.array(
        [
            [0.9, 0.5, 0.1, 0.2],  # original first: rank 1
            [0.8, 0.3, 0.9, 0.1],  # two above: rank 3
            [0.5, 0.5, 0.5, 0.9],
        ]
    )  # one above, three-way tie: ranks 2, 3, 4 equally likely
    is_original = np.eye(3, 4, dtype=bool)
    # BM25: q0 and q2 have one candidate above and a three-way tie (ranks 2-4), q1 ranks its original first
    bm25 = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    pool = pool_section(one_component_table(scores, is_original), bm25, [Run("full", "full")], folds=2, seed=0, similarity=None)
    full = pool["results"]["full"]
    assert full["mrr"] == pytest.approx((1 + 1 / 3 + (1 / 2 + 1 / 3 + 1 / 4) / 3) / 3)
    assert full["recall@1"] == pytest.approx(1 / 3)
    assert full["recall@5"] == 1.0 and full["recall@10"] == 1.0
    assert pool["baselines"]["full_gradient"]["mrr"] == pytest.approx(full["mrr"])
    b = pool["baselines"]["bm25"]
    tie = (1 / 2 + 1 / 3 + 1 / 4) / 3
    assert b["mrr"] == pytest.approx((tie + 1 + tie) / 3)
    assert b["recall@1"] == pytest.approx(1 / 3) and b["recall@5"] == 1.0
    assert pool["candidates"] == 4 and pool["queries"] == 3


def two_component_table(good: int) -> ComponentTable:
    """Four queries, two candidates (the original first): component ``good`` ranks the original first,
    the other component ranks it last, and both together tie."""
    cross = np.zeros((4, 2, 2))
    cross[:, 0, good], cross[:, 1, good] = 1.0, -1.0
    cross[:, 0, 1 - good], cross[:, 1, 1 - good] = -1.0, 1.0
    return ComponentTable(
        cross=cross,
        query_self=np.ones((4, 2)),
        candidate_self=np.ones((4, 2, 2)),
        is_original=np.tile([True, False], (4, 1)),
        components=np.array(["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
        num_params=np.array([10, 10]),
    )


def test_transfer_matrix_and_jaccard_on_a_hand_made_pair_of_checkpoints():
    from selproj_plugin.strategies.greedy import Greedy

    tables = [two_component_table(0), two_component_table(1)]
    m = study.transfer_matrix(tables, Greedy, folds=2, seed=0)
    assert m["accuracy"] == [[1.0, 0.0], [0.0, 1.0]]  # each checkpoint's selection fails at the other
    selections = []
    for t in tables:
        g = Greedy()
        g.fit(t)
        selections.append(g.select(t.component_list))
    assert selections == [["model.layers.0.mlp.down_proj"], ["model.layers.1.mlp.down_proj"]]
    assert study.jaccard_matrix(selections) == [[1.0, 0.0], [0.0, 1.0]]
    assert study.jaccard(["a", "b", "c"], ["b", "c", "d"]) == 0.5


def test_tracin_sums_the_checkpoints_dot_products_weighted_by_learning_rate():
    # one query, one candidate, one component: gradients q=(1,0), c=(1,1) at checkpoint 0; q=(0,2), c=(1,0) at 1
    a = ComponentTable(
        cross=np.array([[[1.0]]]),
        query_self=np.array([[1.0]]),
        candidate_self=np.array([[[2.0]]]),
        is_original=np.array([[True]]),
        components=np.array(["model.layers.0.mlp.down_proj"]),
        num_params=np.array([2]),
    )
    b = dataclasses.replace(a, cross=np.array([[[0.0]]]), query_self=np.array([[4.0]]), candidate_self=np.array([[[1.0]]]))
    t = study.tracin_table([a, b], [1.0, 0.25])
    assert t.cross[0, 0, 0] == 1.0 and t.query_self[0, 0] == 2.0 and t.candidate_self[0, 0, 0] == 2.25
    from selproj_plugin import scoring

    # the cosine of the concatenated gradients, checkpoint 1's scaled by sqrt(0.25): (1,0,0,1) and (1,1,0.5,0)
    assert scoring.subset_similarity(t)[0, 0] == pytest.approx(1 / (np.sqrt(2) * 1.5))
    with pytest.raises(ValueError, match="one positive weight per checkpoint"):
        study.tracin_table([a, b], [1.0])
