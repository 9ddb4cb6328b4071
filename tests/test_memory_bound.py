"""The memory limit holds with random projections and every original a candidate: peak RSS (VmHWM) measured.

A model of about 9.5M parameters sketched to 2M dimensions: a sample's projection is 16 MB in float64, so
holding every sample's (as the engine did) or a whole gradient with the sketch's codes outside the budget
puts the process hundreds of MB over a limit set just above what it needs.  What it needs is measured:
the same table without the projection, in a process of its own, plus room for one sample being projected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIM = 2_000_000
MiB = 2**20
# one sample projected: the sketch's fp32 sums (a bucket per sign) and output, float64 copies of two outputs,
# the codes of every component and the largest component's gradient twice, plus allocator slack
ROOM = 2 * 4 * DIM + 4 * DIM + 2 * 8 * DIM + 4 * 9_600_000 + 2 * 4 * 512 * 1536 + 48 * MiB

WORKER = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, LlamaConfig
sys.path.insert(0, "tests")
import tiny
from selproj_plugin.components import catalogue
from selproj_plugin.engine import EngineConfig, build_table
from selproj_plugin.projection import CountSketch
from selproj_plugin.samples import Sample

mode, limit_gb, order = sys.argv[1], float(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
config = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=3,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
n = 12
queries = [Sample(f"q{i}", f"Question number {i} about trees", "An answer " * (3 + i % 4)) for i in range(n)]
pool = [Sample(f"o{i}", f"Original question {i} on forests", "A reply " * (4 + i % 3)) for i in range(n)]
index = np.tile(np.arange(n), (n, 1))  # every original a candidate of every query
transforms = [CountSketch(catalogue(model), {DIM}, seed=1)] if mode == "projected" else []
table = build_table(model, tiny.tokenizer(), queries, pool, index, np.arange(n), transforms=transforms,
                    config=EngineConfig(memory_limit_gb=limit_gb, dot_order=order, progress=False, max_spill_gb=1.0))
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"hwm": hwm, "predicted": table.meta["plan"]["predicted_peak_bytes"],
                  "order": table.meta["plan"]["dot_order"]}))
""".replace("{DIM}", str(DIM))


def _run(mode: str, limit_gb: float, order: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(limit_gb), order], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", ["gram", "stream"])
def test_projections_of_a_whole_pool_stay_within_a_limit_just_above_need(order):
    need = _run("plain", 64.0, order)["hwm"] + ROOM
    limit = need / 2**30
    got = _run("projected", limit, order)
    assert got["order"] == order
    assert got["hwm"] <= 1.05 * need, f"peak {got['hwm'] / MiB:.0f} MiB over the {need / MiB:.0f} MiB limit"
    assert abs(got["predicted"] / got["hwm"] - 1) <= 0.25, (got["predicted"] / MiB, got["hwm"] / MiB)
