"""Faults the engine must survive: unused parameters, aliased modules, coinciding shapes, killed runs' spill dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests import tiny
from selproj_plugin.capture import SampleFactors
from selproj_plugin.engine import EngineConfig, FactorStore, build_table, sample_features
from selproj_plugin.loss import encode_samples
from selproj_plugin.samples import Sample
from selproj_plugin import spill as spill_module
from selproj_plugin.spill import OWNER, PREFIX, SpillError

ROOT = Path(__file__).resolve().parents[1]
CFG = EngineConfig(batch_size=3, progress=False)


def _naive_rows(model, tok, samples, names, max_length=512):
    """{component: [N, params]} from a plain backward per sample; unreached parameters give zeros."""
    enc, _ = encode_samples(tok, samples, max_length)
    params = dict(model.named_parameters())
    grads = [tiny.naive_grads(model, e) for e in enc]
    return {n: torch.stack([g[n].reshape(-1) if n in g else torch.zeros(params[n].numel()) for g in grads]) for n in names}


def test_a_parameter_the_forward_never_uses_has_zero_gradient():
    model = tiny.model("llama")
    model.extra = nn.Linear(4, 3)  # trainable, never called
    model.extra_norm = type(model.model.norm)(16)  # a torch.func component, never called
    tok = tiny.tokenizer()
    feats = sample_features(model, tok, tiny.SAMPLES, config=CFG, scope="all")  # "extra" is of no paper kind
    for name in ("extra.weight", "extra.bias", "extra_norm"):
        assert name in feats and float(feats[name].abs().max()) == 0.0, name
    down = "model.layers.1.mlp.down_proj"
    ref = _naive_rows(model, tok, tiny.SAMPLES, [f"{down}.weight"])[f"{down}.weight"]
    torch.testing.assert_close(feats[down], ref, rtol=1e-5, atol=1e-6)
    table = build_table(
        model, tok, tiny.SAMPLES[:2], tiny.SAMPLES, np.array([[0, 1, 2], [1, 2, 3]]), np.zeros(2, dtype=int), config=CFG, scope="all"
    )
    used = list(table.components).index(down)
    extra = list(table.components).index("extra.weight")
    assert float(np.abs(table.cross[..., extra]).max()) == 0.0 and float(np.abs(table.cross[..., used]).min()) > 0


def test_a_module_under_two_names_is_hooked_once():
    model = tiny.model("llama")
    model.alias = model.model.layers[0].mlp  # the same module registered a second time
    tok = tiny.tokenizer()
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"]
    feats = sample_features(model, tok, tiny.SAMPLES, components=names, config=CFG)
    ref = _naive_rows(model, tok, tiny.SAMPLES, [f"{n}.weight" for n in names])
    for n in names:  # counted twice, the gradient would be 2x the reference
        torch.testing.assert_close(feats[n], ref[f"{n}.weight"], rtol=1e-5, atol=1e-6)


def test_split_does_not_guess_from_shapes_when_dimensions_coincide():
    """Batch of B=2 samples of T=16 tokens with one trained token each: the LM head sees [N=2, hidden=16] = [B, T]."""
    model = tiny.model("llama")  # untied: the LM head is its own component
    tok = tiny.tokenizer()
    samples = [Sample("a", "abcdefghijklm", "xy"), Sample("b", "nopqrstuvwxyz", "zw")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is the point here
        enc, _ = encode_samples(tok, samples, 16)
        assert [len(e.input_ids) for e in enc] == [16, 16] and [e.n_targets for e in enc] == [1, 1]
        assert model.config.hidden_size == 16
        feats = sample_features(
            model, tok, samples, components=["lm_head"], config=EngineConfig(batch_size=2, max_length=16, progress=False)
        )
    ref = _naive_rows(model, tok, samples, ["lm_head.weight"], max_length=16)["lm_head.weight"]
    torch.testing.assert_close(feats["lm_head"], ref, rtol=1e-5, atol=1e-6)


def _factors(n: int = 64) -> SampleFactors:
    return SampleFactors("s", {"t": torch.ones(n, 8)}, {}, {"v": torch.arange(n, dtype=torch.float32)})


def _spill_dirs(parent: Path) -> list[Path]:
    return sorted(parent.glob(f"{PREFIX}*"))


def test_spill_dir_is_removed_on_close_and_factors_read_back(tmp_path):
    store = FactorStore(0, str(tmp_path))
    f = _factors()
    store.put("k", f)
    [spill] = _spill_dirs(tmp_path)
    assert (spill / OWNER).is_file() and store.spilled == f.nbytes
    back = store.get("k")
    assert torch.equal(back.tensors["t"], f.tensors["t"]) and torch.equal(back.vectors["v"], f.vectors["v"])
    # one file holds a sample's tensors of any dtype and size; a partial read returns just the named ones
    mixed = SampleFactors(
        "m",
        {"ids": torch.tensor([3, 1, 4], dtype=torch.int64), "none": torch.zeros(0, 5), "x": torch.randn(3, 7)},
        {},
        {"v": torch.randn(11)},
    )
    store.put("m", mixed)
    part = store.get("m", {"ids", "none", "v"})
    assert set(part.tensors) == {"ids", "none"} and set(part.vectors) == {"v"}
    assert part.tensors["ids"].dtype == torch.int64 and torch.equal(part.tensors["ids"], mixed.tensors["ids"])
    assert part.tensors["none"].shape == (0, 5) and torch.equal(part.vectors["v"], mixed.vectors["v"])
    assert torch.equal(store.get("m").tensors["x"], mixed.tensors["x"]) and store.get("m", set()).tensors == {}
    assert len(list(spill.glob("*.bin"))) == 2  # one file per sample
    store.close()
    assert not spill.exists()


CHILD = """
import sys, time, torch
from selproj_plugin.capture import SampleFactors
from selproj_plugin.engine import FactorStore
store = FactorStore(0, sys.argv[1])
store.put(0, SampleFactors("s", {"t": torch.ones(4096, 16)}, {}, {}))
print("spilled", flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)  # without close(): the exit itself must clean up
time.sleep(120)
"""


def _child(parent: Path, how: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(parent), how],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "spilled"
    return proc


@pytest.mark.slow
def test_spill_dir_goes_at_exit_and_a_killed_runs_at_the_next_start(tmp_path, capsys):
    assert _child(tmp_path, "exit").wait(30) == 0
    assert _spill_dirs(tmp_path) == []
    killed = _child(tmp_path, "sleep")
    live = _child(tmp_path, "sleep")  # a run still working: its directory must stay
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert len(_spill_dirs(tmp_path)) == 2
        capsys.readouterr()
        store = FactorStore(0, str(tmp_path))  # the next run
        assert "removed 0.00 GB of spill directories" in capsys.readouterr().err
        store.put(0, _factors())
        left = _spill_dirs(tmp_path)
        assert len(left) == 2 and store._dir.path in left  # the dead run's went, the live one's stayed
        store.close()
        assert len(_spill_dirs(tmp_path)) == 1
    finally:
        live.kill()
        live.wait(30)


@pytest.mark.slow
def test_sigterm_to_the_cli_runs_the_spill_cleanup(tmp_path):
    """The launcher's stop (torchrun sends SIGTERM) must run finally blocks, so the spill dir goes."""
    script = f"""
import sys, time, torch
import benchmark.retrieval as retrieval
from selproj_plugin.capture import SampleFactors
from selproj_plugin.engine import FactorStore

def build_tables(opts):
    store = FactorStore(0, {str(tmp_path)!r})
    try:
        store.put(0, SampleFactors("s", {{"t": torch.ones(64, 8)}}, {{}}, {{}}))
        print("spilled", flush=True)
        time.sleep(120)
    finally:
        store.close()

retrieval.build_tables = build_tables
sys.exit(retrieval.cli(["--no-progress"]))
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "spilled" and len(_spill_dirs(tmp_path)) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 130
    assert "interrupted" in proc.stderr.read()
    assert _spill_dirs(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_spill_parent_is_one_line_error(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(SpillError, match=f"cannot create a spill directory in {tmp_path}: Permission denied"):
            FactorStore(0, str(tmp_path)).put(0, _factors())
    finally:
        tmp_path.chmod(0o755)


def test_full_disk_while_spilling_is_one_line_error(tmp_path, monkeypatch):
    store = FactorStore(0, str(tmp_path))

    def full(f, array):  # what a write meets on a full file system, after part of the file is written
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spill_module, "_write", full)
    with pytest.raises(SpillError, match="cannot spill gradient factors to .*: No space left on device; free space"):
        store.put(0, _factors())
    [spill] = _spill_dirs(tmp_path)
    assert [p.name for p in spill.iterdir()] == [OWNER]  # the partial file went
    store.close()
    assert _spill_dirs(tmp_path) == []


@pytest.mark.slow
def test_fault_table_fast_rows_on_a_tiny_model(tiny_model_dir, small_dataset, capsys):
    """``benchmark.faults``' quick rows: each run ends with a one-line error and exit code 2 (its seconds are the
    benchmark's figure, not a test's: this machine is shared)."""
    from benchmark import faults

    code = faults.main(
        [
            "--only",
            "full-disk,nan-loss",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(small_dataset),
            "--max-length",
            "160",
            "--max-new-tokens",
            "6",
        ]
    )
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "fault" not in line]
    assert code == 0 and len(rows) == 2, table
    assert "full disk on the spill dir" in rows[0] and "exit 2: error: cannot " in rows[0]
    assert "NaN in one sample's loss" in rows[1] and "exit 2: error: sample " in rows[1] and "NaN or inf" in rows[1]


def test_named_keys_of_a_kept_sample_are_all_a_get_returns_wherever_it_is_kept(tmp_path):
    """The component order asks for one component's few tensors of a sample, block after block: a sample kept
    in memory gave all of them, and moving those to the device (a no-op call per tensor on the CPU) took
    2.5 s of a 32-sample full set's 24.7 s of dots."""
    store = FactorStore(1e9, str(tmp_path))
    store.put("ram", _factors())
    store.put("disk", _factors(), spill=True)
    try:
        for key in ("ram", "disk"):
            part = store.get(key, {"t"})
            assert set(part.tensors) == {"t"} and part.vectors == {} and torch.equal(part.tensors["t"], torch.ones(64, 8))
            assert set(store.get(key, {"v"}).vectors) == {"v"} and store.get(key, set()).tensors == {}
            assert set(store.get(key).tensors) == {"t"} and set(store.get(key).vectors) == {"v"}
    finally:
        store.close()


def test_kept_factors_fill_the_device_then_ram_then_disk(tmp_path):
    """On an accelerator the store keeps factors there first (no host copy per pair), then in RAM up to the
    whole limit, then spills; the 'meta' device stands in for a GPU here."""
    f = _factors()  # 64 x 8 + 64 float32: 2304 bytes
    store = FactorStore(2 * f.nbytes, str(tmp_path), device="meta", device_bytes=f.nbytes)
    for key in "abc":
        store.put(key, _factors())
    store.put("d", _factors(), spill=False)  # the plan keeps it in memory: RAM, the device being full
    try:
        assert store.get("a").tensors["t"].device.type == "meta"
        assert store.get("b").tensors["t"].device.type == "cpu" and store.get("d").tensors["t"].device.type == "cpu"
        assert store.on_device == f.nbytes and store.in_ram == 2 * f.nbytes and store.spilled == f.nbytes
        assert torch.equal(store.get("c").tensors["t"], f.tensors["t"])  # read back from disk
    finally:
        store.close()
    on_cpu = FactorStore(0, str(tmp_path), device="cpu")  # no device share given: as before, all spilled
    on_cpu.put("a", _factors())
    assert on_cpu.spilled == f.nbytes
    on_cpu.close()
