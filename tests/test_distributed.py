"""Scale-out on torch.distributed: 2 CPU processes (gloo) give the table and JSON of 1 process, bit for bit."""

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
from benchmark.scaleout import comparable as strip_timings
from tests.helpers import argv

ROOT = Path(__file__).resolve().parents[1]
QUERIES = [tiny.Sample(f"q{i}", f"Question {i} about trees?", f"Reply {i}: they grow.") for i in range(4)] + [
    tiny.Sample("q4", "Question 4 about tall trees in old forests?", "Reply 4: they grow slowly but surely.")
]
INDEX = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 0], [4, 0, 1]])
MAX_LENGTH = 70  # truncates s3 and q4


def config(dot_order: str = "stream"):
    from selproj_plugin.engine import EngineConfig

    return EngineConfig(batch_size=2, max_length=MAX_LENGTH, progress=False, dot_order=dot_order)


def sketches(model):
    from selproj_plugin.components import catalogue
    from selproj_plugin.projection import CountSketch

    return [CountSketch(catalogue(model), 32, seed=1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, seed: int = 0) -> None:
    import torch.distributed as dist

    from selproj_plugin.engine import build_table

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shard = lambda r, w: Path(out).with_name(f"shard{r}of{w}.npz")  # noqa: E731
        model = tiny.model("llama", tied=True, seed=seed)
        table = build_table(
            model,
            tiny.tokenizer(),
            QUERIES,
            tiny.SAMPLES,
            INDEX,
            np.zeros(5, dtype=int),
            transforms=sketches(model),
            config=config(),
            across_ranks=True,
            shard_path=shard,
        )
        if rank == 0:
            table.save(out)
    finally:
        dist.destroy_process_group()


ARRAYS = ("cross", "query_self", "candidate_self", "rp_similarity", "is_original", "candidate_ids", "query_ids")


@pytest.mark.slow
def test_two_processes_build_the_same_table_bit_for_bit(tmp_path):
    from selproj_plugin.engine import build_table
    from selproj_plugin.shards import TableShard
    from selproj_plugin.table import ComponentTable

    out = tmp_path / "two.npz"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    two = ComponentTable.load(out)
    model = tiny.model("llama", tied=True)
    one = build_table(
        model, tiny.tokenizer(), QUERIES, tiny.SAMPLES, INDEX, np.zeros(5, dtype=int), transforms=sketches(model), config=config()
    )
    # ranks capture each sample in the batch one process would use: the same fp32 sums, so equal bits
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(two, name), getattr(one, name), err_msg=name)
    assert float(np.abs(one.cross).max()) > 0
    # left to choose, one process takes this table component by component (ranks always stream): the same
    # dots summed in another order, so close but not equal bits
    auto = build_table(
        model, tiny.tokenizer(), QUERIES, tiny.SAMPLES, INDEX, np.zeros(5, dtype=int), transforms=sketches(model), config=config("auto")
    )
    assert auto.meta["plan"]["dot_order"] == "gram" and two.meta["plan"]["dot_order"] == "stream"
    scale = np.sqrt(two.query_self[:, None, :] * two.candidate_self)
    assert 0 < np.max(np.abs(auto.cross - two.cross) / np.maximum(scale, 1e-30)) <= 1e-4
    np.testing.assert_allclose(auto.query_self, two.query_self, rtol=1e-4)
    assert one.meta["truncated"] == 2 and two.meta["truncated"] == 2
    assert two.meta["truncated_ids"] == ["q4", "s3"] and two.meta["world_size"] == 2
    # each rank left its own finished shard; together they hold every pair exactly once
    assert sorted(p.name for p in tmp_path.glob("shard*")) == ["shard0of2.npz", "shard1of2.npz"]
    shards = [TableShard.load(tmp_path / f"shard{r}of2.npz") for r in range(2)]
    assert shards[0].cross and shards[1].cross and not set(shards[0].cross) & set(shards[1].cross)
    assert set(shards[0].cross) | set(shards[1].cross) == {
        tuple(sorted((q.id, tiny.SAMPLES[c].id))) for q, row in zip(QUERIES, INDEX) for c in row
    }


@pytest.mark.slow
def test_rerun_reuses_the_finished_shard_of_a_rank(tmp_path):
    """A run where rank 0's shard is lost: rank 1 reuses its shard, rank 0 recomputes (here with other weights)."""
    from selproj_plugin.shards import TableShard
    from selproj_plugin.table import ComponentTable

    out = tmp_path / "two.npz"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    first = ComponentTable.load(out)
    kept = TableShard.load(tmp_path / "shard1of2.npz")
    (tmp_path / "shard0of2.npz").unlink()
    mp.spawn(_worker, args=(2, free_port(), str(out), 1), nprocs=2, join=True)
    second = ComponentTable.load(out)
    reused = np.array([[tuple(sorted((q, c))) in kept.cross for c in row] for q, row in zip(first.query_ids, first.candidate_ids)])
    assert reused.any() and not reused.all()
    np.testing.assert_array_equal(second.cross[reused], first.cross[reused])
    assert not np.isclose(second.cross[~reused], first.cross[~reused]).all()


def test_a_shard_from_another_run_is_refused(tmp_path):
    from selproj_plugin.shards import TableShard
    from selproj_plugin.table import TableError

    shard = TableShard(
        ["a", "b"], {"x": np.ones(2)}, {("x", "y"): np.ones(2)}, {("x", "y"): np.ones(1)}, {}, rp_keys=["count_sketch@8:abc:seed0"]
    )
    path = shard.save(tmp_path / "s.npz")
    loaded = TableShard.load(path)
    loaded.check(path, ["a", "b"], {"x"}, {("x", "y")}, ["count_sketch@8:abc:seed0"])  # the share it was written for
    with pytest.raises(TableError, match="other components; delete it"):
        loaded.check(path, ["a"], {"x"}, {("x", "y")}, ["count_sketch@8:abc:seed0"])
    with pytest.raises(TableError, match="other samples"):
        loaded.check(path, ["a", "b"], {"x"}, {("x", "z")}, ["count_sketch@8:abc:seed0"])
    with pytest.raises(TableError, match="other projections"):
        loaded.check(path, ["a", "b"], {"x"}, {("x", "y")}, ["count_sketch@8:abc:seed1"])
    with pytest.raises(TableError, match="other projections"):
        loaded.check(path, ["a", "b"], {"x"}, {("x", "y")}, [])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(TableError, match="cannot read table shard"):
        TableShard.load(tmp_path / "bad.npz")


def _features_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        arrays = _features(across_ranks=True)
        if rank == 0:
            np.savez(out, **arrays)
    finally:
        dist.destroy_process_group()


def _features(across_ranks: bool) -> dict[str, np.ndarray]:
    from selproj_plugin.components import catalogue
    from selproj_plugin.engine import pairwise_dots, projected_features, sample_features
    from selproj_plugin.projection import CountSketch

    model, tok = tiny.model("qwen2"), tiny.tokenizer()
    samples = QUERIES + tiny.SAMPLES
    kw = dict(config=config(), across_ranks=across_ranks)
    feats = sample_features(model, tok, samples, components=["model.layers.1.mlp.down_proj"], **kw)
    return {
        "features": feats["model.layers.1.mlp.down_proj"].numpy(),
        "projected": projected_features(model, tok, samples, CountSketch(catalogue(model), 48, seed=3), **kw).numpy(),
        "dots": pairwise_dots(model, tok, QUERIES[:2], samples, **kw),
    }


@pytest.mark.slow
def test_library_features_shard_over_ranks(tmp_path):
    out = tmp_path / "features.npz"
    mp.spawn(_features_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    one = _features(across_ranks=False)
    with np.load(out) as two:
        for name, value in one.items():
            assert np.abs(value).sum(axis=tuple(range(1, value.ndim))).min() > 0, name  # every row was filled
            np.testing.assert_array_equal(two[name], value, err_msg=name)


@pytest.mark.slow
def test_torchrun_benchmark_json_equals_single_process(tiny_model_dir, small_dataset, tmp_path):
    from benchmark.retrieval import cli

    one = tmp_path / "one.json"
    same_order = ("--dot-order", "stream")  # what the ranks do; one process alone would go component by component
    assert cli(argv(tiny_model_dir, small_dataset, tmp_path / "c1", "--json", str(one), *same_order)) == 0
    two = tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "benchmark.retrieval"]
    planned = subprocess.run(
        launch + argv(tiny_model_dir, small_dataset, tmp_path / "c2", "--plan"),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert planned.stdout.count("plan: ") == 1  # both ranks plan, rank 0 reports
    assert not list((tmp_path / "c2" / "benchmark").glob("table-*"))
    cmd = launch + argv(tiny_model_dir, small_dataset, tmp_path / "c2", "--json", str(two), *same_order)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["run"]["world_size"] == 2
    assert strip_timings(a) == strip_timings(b)  # every float equal, not merely close
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "c2" / "benchmark").glob("table-*.shard*")) == [
        "shard0of2.npz",
        "shard1of2.npz",
    ]


def _failing_worker(rank: int, world: int, port: int, out: str, where: str) -> None:
    """Rank 1 fails ``where``; every rank writes how its run ended to ``rank{r}.txt``."""
    import datetime
    import time

    import torch.distributed as dist

    from selproj_plugin import distributed
    from selproj_plugin.engine import build_table

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    start = time.perf_counter()
    try:
        with distributed.session():
            if where == "after the last gather" and rank == 1:
                distributed.gather("work")
                raise ValueError("boom while rank 0 already left")
            distributed.gather("work")
            if where == "in its shard":
                build_table(
                    tiny.model("llama", tied=True),
                    tiny.tokenizer(),
                    QUERIES,
                    tiny.SAMPLES,
                    INDEX,
                    np.zeros(5, dtype=int),
                    config=config(),
                    across_ranks=True,
                    shard_path=lambda r, w: Path(out) / f"shard{r}of{w}.npz",
                )
        ending = "ok"
    except Exception as exc:
        ending = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.txt").write_text(f"{time.perf_counter() - start:.1f}\n{ending}")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["after the last gather", "in its shard"])
def test_one_ranks_error_stops_every_rank_with_its_message(tmp_path, where):
    """Without agreement the healthy rank waits in its collective until the timeout (here 120 s)."""
    (tmp_path / "shard1of2.npz").write_bytes(np.random.default_rng(0).bytes(100))  # corrupt, on rank 1 only
    mp.spawn(_failing_worker, args=(2, free_port(), str(tmp_path), where), nprocs=2, join=True)
    endings = [(tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in range(2)]
    message = {
        "after the last gather": "boom while rank 0 already left",
        "in its shard": f"cannot read table shard {tmp_path / 'shard1of2.npz'}",
    }[where]
    assert endings[1][1].startswith(("ValueError: " if where != "in its shard" else "TableError: ") + message)
    assert endings[0][1].startswith(f"RankError: rank 1 failed: {message}") and "\n" not in endings[0][1]
    assert max(float(seconds) for seconds, _ in endings) < 60


def _generate_worker(rank: int, world: int, port: int, out: str) -> None:
    import time

    import torch.distributed as dist

    from benchmark.cache import StageCache
    from benchmark.generate import generate_responses

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cache = StageCache(out)
    if rank == 1:  # reads the cache late: a rank that planned from a peer's fresh answers would plan other batches
        real = cache.load_json
        cache.load_json = lambda path: (time.sleep(1.0), real(path))[1]
    items = [(s.id, s.prompt) for s in tiny.SAMPLES]
    try:
        answers = generate_responses(
            tiny.model("llama"),
            tiny.tokenizer(),
            items,
            cache_path=Path(out) / "gen.json",
            cache=cache,
            max_new_tokens=3,
            batch_size=2,
            progress=False,
        )
        Path(out, f"rank{rank}.json").write_text(json.dumps(answers))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_plan_generation_batches_from_the_same_cache_state(tmp_path):
    mp.spawn(_generate_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    answers = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert answers[0] == answers[1] and sorted(answers[0]) == sorted(s.id for s in tiny.SAMPLES)
    assert json.loads((tmp_path / "gen.json").read_text()) == answers[0]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_leaving_the_session_ends_the_gloo_threads(tmp_path):
    """A gloo thread alive at interpreter exit can drop a collective's last tensor then and abort the
    process (SIGABRT, ~1 torchrun run in 100); leaving the session must end them."""
    from tests.session_worker import leave_after_building_a_model

    mp.spawn(leave_after_building_a_model, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        left = [n for n in (tmp_path / f"rank{rank}.txt").read_text().split("\n") if "gloo" in n]
        assert not left, f"rank {rank} still runs {left}"
