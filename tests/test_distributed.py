"""Scale-out on torch.distributed: 2 CPU processes (gloo) give the table and JSON of 1 process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from tests import tiny
from tests.test_benchmark_pipeline import argv, small_dataset, strip_timings, tiny_model_dir  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
QUERIES = [tiny.Sample(f"q{i}", f"Question {i} about trees?", f"Reply {i}: they grow.") for i in range(4)] + [
    tiny.Sample("q4", "Question 4 about tall trees in old forests?", "Reply 4: they grow slowly but surely.")]
INDEX = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 0], [4, 0, 1]])
MAX_LENGTH = 70  # truncates s3 (a candidate on both ranks) and q4 (a query of rank 1 only)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from selproj_plugin.engine import EngineConfig, build_table_distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shard = lambda r, w: Path(out).with_name(f"shard{r}of{w}.npz")  # noqa: E731
        table = build_table_distributed(tiny.model("llama", tied=True), tiny.tokenizer(), QUERIES, tiny.SAMPLES,
                                        INDEX, np.zeros(5, dtype=int), proj_dims=(32,), shard_path=shard,
                                        config=EngineConfig(batch_size=2, max_length=MAX_LENGTH, progress=False))
        if rank == 0:
            table.save(out)
    finally:
        dist.destroy_process_group()


def test_two_processes_build_the_same_table(tmp_path):
    from selproj_plugin.engine import EngineConfig, build_table
    from selproj_plugin.table import ComponentTable

    out = tmp_path / "two.npz"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    two = ComponentTable.load(out)
    one = build_table(tiny.model("llama", tied=True), tiny.tokenizer(), QUERIES, tiny.SAMPLES, INDEX,
                      np.zeros(5, dtype=int), proj_dims=(32,),
                      config=EngineConfig(batch_size=2, max_length=MAX_LENGTH, progress=False))
    assert list(two.query_ids) == [q.id for q in QUERIES]
    for name in ("cross", "query_self", "candidate_self", "rp_similarity"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), rtol=1e-6, atol=1e-9, err_msg=name)
    np.testing.assert_array_equal(two.is_original, one.is_original)
    assert one.meta["truncated"] == 2 and two.meta["truncated"] == 2  # the union: s3 once, q4 from rank 1
    assert two.meta["truncated_ids"] == ["q4", "s3"]
    # each rank left its finished shard behind for a rerun, and no two ranks wrote the same file
    assert sorted(p.name for p in tmp_path.glob("shard*")) == ["shard0of2.npz", "shard1of2.npz"]
    assert ComponentTable.load(tmp_path / "shard1of2.npz").n_queries == 2


def test_torchrun_benchmark_json_equals_single_process(tiny_model_dir, small_dataset, tmp_path):  # noqa: F811
    from benchmark.retrieval import cli

    one = tmp_path / "one.json"
    assert cli(argv(tiny_model_dir, small_dataset, tmp_path / "c1", "--json", str(one))) == 0
    two = tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "benchmark.retrieval", *argv(tiny_model_dir, small_dataset, tmp_path / "c2", "--json", str(two))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["run"]["world_size"] == 2
    assert _same(strip_timings(a), strip_timings(b))
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "c2" / "benchmark").glob("table-*.shard*")) == \
        ["shard0of2.npz", "shard1of2.npz"]


def _same(a, b, tol=1e-6) -> bool:
    """Equal JSON; floats to a relative ``tol``: shards batch samples differently, so fp32 sums differ in the last bits."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return all(_same(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_same(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=tol, abs=tol)
        return True
    assert a == b
    return True
