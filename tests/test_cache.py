"""Model and stage caches: one converter under concurrency, partial or corrupt entries rebuilt, weights in keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import tiny
from benchmark.retrieval import cli
from benchmark.scaleout import comparable
from selproj_plugin import models
from tests.helpers import argv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fake_convert(tmp_path, monkeypatch):
    count = tmp_path / "conversions"
    monkeypatch.setattr(models, "_convert_default", tiny.convert_tiny(count))
    return lambda: len(count.read_text()) if count.exists() else 0


def _entry(cache: Path) -> Path:
    return cache / models._CACHE_SUBDIR


def test_first_use_converts_once_and_marks_the_entry_complete(tmp_path, fake_convert):
    cache = tmp_path / "cache"
    model, tok = models.load_model(cache=cache)
    assert fake_convert() == 1 and models.entry_problem(_entry(cache)) is None
    marker = json.loads((_entry(cache) / models.MARKER).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
    models.load_model(cache=cache)
    assert fake_convert() == 1  # reused
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == [f".{models._CACHE_SUBDIR}.lock"]


@pytest.mark.parametrize("damage", ["tokenizer files only", "truncated weights", "garbled config"])
def test_partial_or_corrupt_entry_is_reported_in_one_line_and_rebuilt(tmp_path, fake_convert, capsys, damage):
    cache = tmp_path / "cache"
    entry = models.default_model_dir(cache)
    if damage == "tokenizer files only":  # what two racing converters used to leave behind
        for p in entry.iterdir():
            if not p.name.startswith("tokenizer"):
                p.unlink()
        expected = "no completion marker"
    elif damage == "truncated weights":
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        expected = "model.safetensors has 1000 bytes"
    else:  # same size, so only loading it can tell
        config = entry / "config.json"
        config.write_text("x" * config.stat().st_size)
        expected = "it does not load"
    (cache / f".{entry.name}.dead").mkdir()  # the temporary of a conversion that was killed
    capsys.readouterr()
    model, _ = models.load_model(cache=cache)
    err = [line for line in capsys.readouterr().err.splitlines() if "[selproj]" in line]  # not the progress bars
    assert len(err) == 2 and f"model cache {entry} is incomplete or corrupt ({expected}" in err[0]
    assert err[1].startswith("[selproj] converting the embedded")
    assert fake_convert() == 2 and models.entry_problem(entry) is None
    assert not (cache / f".{entry.name}.dead").exists()
    ref = tiny.model("llama", tied=True)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


RACER = """
import sys, time
from pathlib import Path
from selproj_plugin import models
from tests.tiny import convert_tiny
cache, count, go = sys.argv[1:]
models._convert_default = convert_tiny(Path(count), delay=1.0)
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.005)
entry = models.default_model_dir(cache)
assert models.entry_problem(entry) is None
models.load_model(cache=cache)
"""


@pytest.mark.slow
def test_concurrent_first_runs_convert_once(tmp_path, monkeypatch):
    cache, count, go = tmp_path / "cache", tmp_path / "conversions", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(cache), str(count), str(go)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    assert [r.stdout.readline().strip() for r in racers] == ["ready", "ready"]
    monkeypatch.setattr(models, "_convert_default", tiny.convert_tiny(count, delay=1.0))
    go.touch()
    models.load_model(cache=cache)  # this process races too
    for r in racers:
        assert r.wait(60) == 0, r.stderr.read()[-2000:]
    assert count.read_text() == "x"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [models._CACHE_SUBDIR]


def test_weights_fingerprint_follows_the_weights_not_the_object():
    a, b = tiny.model("llama"), tiny.model("llama")
    assert models.weights_fingerprint(a) == models.weights_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].self_attn.q_proj.weight[2, 3] += 1e-4
    assert models.weights_fingerprint(a) != models.weights_fingerprint(b)
    assert models.weights_fingerprint(a.to(torch.bfloat16)) != models.weights_fingerprint(b.to(torch.bfloat16))


@pytest.mark.slow
def test_a_model_changed_at_the_same_path_gets_new_tables(tmp_path, small_dataset):
    path, cache = tmp_path / "model", tmp_path / "cache"
    tiny.model("llama", tied=True).save_pretrained(path)
    tiny.tokenizer().save_pretrained(path)
    args = argv(path, small_dataset, cache, "--setting", "paraphrased", "--strategy", "full")
    assert cli([*args, "--json", str(tmp_path / "a.json")]) == 0
    tuned = tiny.model("llama", tied=True, seed=1)  # "fine-tuned": other weights, same path
    tuned.save_pretrained(path)
    assert cli([*args, "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert b["run"]["table_reused"] is False and a["identity"]["weights"] != b["identity"]["weights"]
    assert len(list((cache / "benchmark").glob("table-*.npz"))) == 2  # the old table stays under its own key


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["table", "generations"])
def test_unreadable_stage_file_is_reported_and_recomputed(tiny_model_dir, small_dataset, tmp_path, capsys, stage):
    cache = tmp_path / "cache"
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(tmp_path / "first.json"))) == 0
    [path] = (cache / "benchmark").glob(f"{stage}-*.{'npz' if stage == 'table' else 'json'}")
    path.write_bytes(b"\x00garbage" * 10)
    capsys.readouterr()
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(tmp_path / "again.json"))) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "unreadable" in line]
    assert len(err) == 1 and f"cached {path.name} is unreadable" in err[0] and "recomputing" in err[0]
    first, again = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "again"))
    assert comparable(first) == comparable(again)
    assert again["run"]["table_reused"] is (stage != "table")


@pytest.mark.slow
def test_a_tokenizer_chat_template_or_release_change_gets_new_tables(tmp_path, small_dataset, monkeypatch):
    """The same weights at the same path with another chat template wrap every prompt differently, so
    their gradients differ; a table from another release of this package may differ too."""
    from benchmark import pipeline

    path, cache = tmp_path / "model", tmp_path / "cache"
    tiny.model("llama", tied=True).save_pretrained(path)
    tiny.tokenizer().save_pretrained(path)
    args = argv(path, small_dataset, cache, "--setting", "paraphrased", "--strategy", "full")

    def run(name: str) -> dict:
        assert cli([*args, "--json", str(tmp_path / f"{name}.json")]) == 0
        return json.loads((tmp_path / f"{name}.json").read_text())

    first = run("first")
    tok = tiny.tokenizer()
    tok.chat_template = tiny.CHAT_TEMPLATE.replace("'<|' + m['role'] + '|>'", "'<|' + m['role'] + '|>\\n'")
    tok.save_pretrained(path)
    templated = run("templated")
    assert templated["run"]["table_reused"] is False
    assert templated["identity"]["chat_template"] != first["identity"]["chat_template"]
    assert templated["run"]["table_cache"] != first["run"]["table_cache"]
    monkeypatch.setattr(pipeline, "package_version", lambda: "999.0")
    assert run("released")["run"]["table_reused"] is False
    assert len(list((cache / "benchmark").glob("table-*.npz"))) == 3


def test_tokenizer_digest_follows_vocabulary_special_tokens_and_normalisation():
    from tokenizers import normalizers

    from benchmark.cache import tokenizer_digest

    base = tokenizer_digest(tiny.tokenizer())
    assert tokenizer_digest(tiny.tokenizer()) == base
    assert tokenizer_digest(tiny.tokenizer(bos=True)) != base  # post-processing adds <bos>
    lower = tiny.tokenizer()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert tokenizer_digest(lower) != base
    other_pad = tiny.tokenizer()
    other_pad.pad_token = "<eos>"
    assert tokenizer_digest(other_pad) != base


def _under_a_file(path: Path) -> Path:
    """A path that cannot be created: its parent is a file (what no chmod can do to root)."""
    path.write_text("a file where a directory should be")
    return path / "cache"


def _refuse_writes_under(root: Path, error: int, suffix: str = ""):
    """An atomic writer that fails with ``error`` for files under ``root`` (ending in ``suffix``), as a read-only
    or full cache does (tests run as root, which chmod does not stop)."""
    from selproj_plugin import atomic

    real = atomic.atomic_write

    def write(path, data):
        if Path(root) in Path(path).parents and str(path).endswith(suffix):
            raise OSError(error, os.strerror(error), str(path))
        return real(path, data)

    return write


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["read-only", "full for the table", "not a directory"])
def test_an_unwritable_cache_keeps_the_results_and_says_so_in_one_line(tiny_model_dir, small_dataset, tmp_path, capsys, monkeypatch, fault):
    import errno

    from benchmark import report
    from selproj_plugin import table as table_module

    reference = tmp_path / "reference.json"
    assert (
        cli(argv(tiny_model_dir, small_dataset, tmp_path / "good-cache", "--json", str(reference), "--out", str(tmp_path / "reference")))
        == 0
    )
    cache = tmp_path / "cache"
    if fault == "not a directory":
        cache, message = _under_a_file(cache), "Not a directory"
    else:
        error, suffix = (errno.EROFS, "") if fault == "read-only" else (errno.ENOSPC, ".npz")
        for module in (report, table_module):
            monkeypatch.setattr(module, "atomic_write", _refuse_writes_under(cache, error, suffix))
        message = os.strerror(error)
    capsys.readouterr()
    out, result = tmp_path / "out", tmp_path / "result.json"
    assert cli(argv(tiny_model_dir, small_dataset, cache, "--json", str(result), "--out", str(out))) == 0
    captured = capsys.readouterr()
    assert "== paraphrased ==" in captured.out and "== generated ==" in captured.out
    err = [line for line in captured.err.splitlines() if "cache" in line]  # not the progress lines
    assert len(err) == 1 and err[0].startswith(f"[selproj] cannot write the cache {cache}/benchmark/"), err
    assert message in err[0] and ("table-" in err[0]) is (fault == "full for the table"), err
    doc = json.loads(result.read_text())
    assert doc["run"]["table_cache"] is None and doc["run"]["table_reused"] is False
    assert comparable(doc) == comparable(json.loads(reference.read_text()))
    assert comparable(json.loads((out / "results.json").read_text())) == comparable(doc)


@pytest.mark.parametrize("fault", ["root under a file", "full under the lock"])
def test_an_unwritable_model_cache_converts_into_a_temporary_directory(tmp_path, fake_convert, capsys, monkeypatch, fault):
    import errno

    cache = tmp_path / "cache"
    if fault == "root under a file":
        cache, expected = _under_a_file(cache), "Not a directory"
    else:
        real = models._write_entry

        def full(target):
            if target.parent == cache:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
            return real(target)

        monkeypatch.setattr(models, "_write_entry", full)
        expected = os.strerror(errno.ENOSPC)
    capsys.readouterr()
    model, _ = models.load_model(cache=cache)
    err = [line for line in capsys.readouterr().err.splitlines() if "[selproj]" in line]
    assert len(err) == (1 if fault == "root under a file" else 2), err
    assert err[-1].startswith(f"[selproj] cannot write the model cache {cache / models._CACHE_SUBDIR} (")
    assert expected in err[-1]
    assert "for this run only" in err[-1] and fake_convert() == 1
    assert torch.equal(model.lm_head.weight, tiny.model("llama", tied=True).lm_head.weight)
    private = Path(err[-1].split(" into ")[1].split(" for this run")[0])
    assert models.entry_problem(private) is None and not private.is_relative_to(tmp_path)
