"""The table planner: factor sizes against captured factors, keep/recompute decisions, and the
recompute path against the naive per-sample loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests import tiny
from selproj_plugin.components import Component, catalogue
from selproj_plugin.engine import EngineConfig, MemoryLimitWarning, build_table, iter_factors, plan_table, prepare
from selproj_plugin.loss import encode_samples
from selproj_plugin.capture import ComponentSpec, GradientCapture
from selproj_plugin.gram import choose_modes
from selproj_plugin.planner import FactorTensor, FactorWidths, factor_widths, plan_pairs
from selproj_plugin.samples import Sample

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "paper-olmo1b-lima" / "paraphrased.npz"


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen2", False), ("gpt2", True)])
def test_factor_widths_predict_the_bytes_the_capture_stores(family, tied):
    model = tiny.model(family, tied)
    tok = tiny.tokenizer(chat=family != "gpt2")
    prep = prepare(model, tok, None)
    encoded, _ = encode_samples(tok, tiny.SAMPLES, 512)
    dense = [s.name for s in prep.specs if s.kind == "factor"][1::3]  # some components materialised
    for materialise in ((), dense):
        widths = factor_widths(prep.capture, prep.specs, materialise)
        got = {i: f.nbytes for i, f in iter_factors(prep, encoded, range(len(encoded)), EngineConfig(progress=False), set(materialise))}
        for i, e in enumerate(encoded):
            assert widths.sample_bytes(len(e.input_ids), e.n_targets) == got[i], (family, i, len(materialise))


def test_olmo_1b_geometry_from_its_config_without_weights():
    from transformers import AutoModelForCausalLM, OlmoConfig

    cfg = OlmoConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16, vocab_size=50304, tie_word_embeddings=True
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    comps = catalogue(model)
    if REFERENCE.is_file():  # the paper's 113 components, parameter for parameter
        with np.load(REFERENCE) as ref:
            assert [c.num_params for c in comps] == ref["num_params"].tolist()
    capture = GradientCapture(model, comps)
    widths = factor_widths(capture, [capture.specs[c.name] for c in comps])
    # per token and layer: the attention input (shared by q, k, v), o's input, the MLP input (shared by
    # gate, up), down's input, and the seven output gradients; plus the embedding's id and output gradient
    layer = (2048 + 2048 + 2048 + 8192) + (2048 + 2048 + 2048 + 2048 + 8192 + 8192 + 2048)
    assert widths.per_token == 16 * layer * 4 + 8 + 2048 * 4
    assert widths.per_target == (2048 + 50304) * 4  # the tied LM head on trained positions
    assert widths.per_sample == 0


def _widths(per_token: int) -> FactorWidths:
    return FactorWidths(per_token, 0, 0, 1)


def test_plan_keeps_the_most_reused_and_recomputes_the_rest_with_each_partner():
    # queries 0-3 (streamed), candidates 4-6; candidate 4 is paired with all four queries,
    # 5 with two, 6 with one; the budget holds one candidate in RAM and one on disk
    lengths = [10] * 7
    q_of = [0, 1, 2, 3]
    c_of = np.array([[4, 5], [4, 5], [4, 6], [4, 6]])
    plan = plan_pairs(
        lengths, [0] * 7, q_of, c_of, _widths(100), store_budget=1000, spill_allowance=1000, resident_bytes=0, batch_tokens=10
    )
    assert not plan.kept_queries  # 3 candidates < 4 queries
    assert plan.kept == [4, 5] and plan.ram_kept == 1  # most reused first: RAM, then disk; 6 fits neither
    assert plan.groups == [[0], [1], [2, 6], [3, 6]]
    assert plan.passes.tolist() == [1, 1, 1, 1, 1, 1, 2]
    assert plan.spill_bytes == 1000 and plan.ram_bytes == 1000
    nothing = plan_pairs(lengths, [0] * 7, q_of, c_of, _widths(100), store_budget=0, spill_allowance=0, resident_bytes=0, batch_tokens=10)
    assert nothing.kept == [] and nothing.passes.tolist() == [1, 1, 1, 1, 4, 2, 2]
    assert nothing.group_bytes == 3 * 1000  # a query with its two candidates


def test_plan_summary_counts_only_the_samples_it_captures():
    # sample 7 is given (a candidate pool can be larger than the candidates used) but paired with nothing
    q_of = [0, 1, 2, 3]
    c_of = np.array([[4, 5], [4, 5], [4, 6], [4, 6]])
    plan = plan_pairs(
        [10] * 7 + [50], [0] * 8, q_of, c_of, _widths(100), store_budget=1000, spill_allowance=1000, resident_bytes=0, batch_tokens=10
    )
    summary = plan.summary()
    assert plan.passes.tolist() == [1, 1, 1, 1, 1, 1, 2, 0]
    assert summary["samples"] == 7 and summary["recomputed"] == 1 and summary["captures"] == 8
    assert summary["mean_tokens"] == 10.0 and summary["passes_per_sample_mean"] == 8 / 7
    assert plan.describe().startswith("plan: 7 distinct samples (10 tokens mean)")


def test_component_order_reports_its_own_flops():
    """The plan's dots FLOPs are those of the order it runs: component by component, every sample's gradient
    is materialised once and the pairs are matrix products, not the factored Grams of streaming."""
    q_of = [0, 1]  # 2 queries, each with all 3 candidates; 5 samples of 10..50 tokens (150 in all)
    plan = plan_pairs(
        [10, 20, 30, 40, 50],
        [0] * 5,
        q_of,
        np.array([[2, 3, 4], [2, 3, 4]]),
        _widths(4),
        store_budget=1e9,
        spill_allowance=0,
        resident_bytes=0,
        batch_tokens=64,
    )
    gram = plan.in_gram_order(_widths(4), dense_params=1000)
    # 1000 parameters x 150 tokens materialised, 2 x 3 products and 5 squared norms: 2 flops a multiply-add
    assert gram.dot_flops() == gram.summary()["dot_flops"] == 2 * 1000 * (150 + 6 + 5)
    assert "every sample's 1,000 parameters materialised once" in gram.describe()
    # streamed, the same pairs cost their Grams: n_i n_j per stored number of a row (1 here), self pairs too
    assert plan.dot_flops() == 2 * ((10 + 20) * (30 + 40 + 50) + 10**2 + 20**2 + 30**2 + 40**2 + 50**2)


def _spec(name: str, rows: int, cols: int) -> ComponentSpec:
    return ComponentSpec(Component(name, name, 0, (f"{name}.weight",), rows * cols), "factor", rows, cols, "plain")


def test_choose_modes_counts_a_shared_input_once(monkeypatch):
    import selproj_plugin.gram as gram

    monkeypatch.setattr(gram, "MEMORY_BOUND_WEIGHT", 8.0)  # the costs below are worked with a pair dot at 8 flops
    # q (64 x 64), k and v (16 x 64) read one input X of width 64; 10 samples of 40 tokens, 20 pairs.
    # Per stored number of a row, a Gram costs 20 * 40^2 = 32,000; materialising k costs
    # (10 * 40 + 20 * 8) * 1024 = 573,440, doubled by the margin: 1,146,880.
    specs = [_spec("q", 64, 64), _spec("k", 16, 64), _spec("v", 16, 64)]
    out = [FactorTensor("tokens", 4 * w, frozenset({n})) for n, w in (("q", 64), ("k", 16), ("v", 16))]
    shared = out + [FactorTensor("tokens", 4 * 64, frozenset({"q", "k", "v"}))]
    # k alone pays X and its output: 32,000 * 80 = 2,560,000 > 1,146,880, so it is materialised; beside q,
    # X is paid anyway and k adds only 32,000 * 16 = 512,000 < 1,146,880, so it stays factored
    assert choose_modes(specs, [40] * 10, 20, shared) == set()
    apart = out + [FactorTensor("tokens", 4 * 64, frozenset({n})) for n in ("q", "k", "v")]
    assert choose_modes(specs, [40] * 10, 20, apart) == {"k", "v"}
    # 70 tokens: a Gram costs 20 * 70^2 = 98,000 per number; dense k 2 * (700 + 160) * 1024 = 1,761,280
    # and q 7,045,120. Each alone stays factored (k: > 98,000 * 16; q: > 98,000 * 64, X paid by the
    # others), but all three dense (10,567,680) beat all three factored (98,000 * 160 = 15,680,000)
    # and every other split: decided one by one they would never be
    assert choose_modes(specs, [70] * 10, 20, shared) == {"q", "k", "v"}


def test_choose_modes_past_max_joint_decides_each_alone_with_shared_tensors_paid(monkeypatch):
    """More linked components than MAX_JOINT: each is decided alone, its shared tensors paid by the others
    (the cases above, with the costs worked there)."""
    import selproj_plugin.gram as gram

    monkeypatch.setattr(gram, "MAX_JOINT", 2)
    monkeypatch.setattr(gram, "MEMORY_BOUND_WEIGHT", 8.0)
    specs = [_spec("q", 64, 64), _spec("k", 16, 64), _spec("v", 16, 64)]
    out = [FactorTensor("tokens", 4 * w, frozenset({n})) for n, w in (("q", 64), ("k", 16), ("v", 16))]
    shared = out + [FactorTensor("tokens", 4 * 64, frozenset({"q", "k", "v"}))]
    assert choose_modes(specs, [70] * 10, 20, shared) == set()  # jointly all three; alone none
    assert choose_modes(specs, [40] * 10, 20, shared) == set()
    apart = out + [FactorTensor("tokens", 4 * 64, frozenset({n})) for n in ("q", "k", "v")]
    assert choose_modes(specs, [40] * 10, 20, apart) == {"k", "v"}  # unlinked: never past MAX_JOINT


def test_recomputed_table_equals_the_naive_loop_and_the_kept_table():
    model = tiny.model("llama", tied=True)
    tok = tiny.tokenizer()
    comps = catalogue(model, "all")
    queries = [Sample(f"q{i}", f"Question number {i}?", f"Answer {i} is here.") for i in range(4)] + [tiny.SAMPLES[1]]
    cands = tiny.SAMPLES[:3]
    index = np.array([[0, 1], [1, 2], [0, 2], [2, 0], [1, 0]])  # the last query is also its own candidate
    original = np.zeros(5, dtype=int)
    kept = build_table(model, tok, queries, cands, index, original, config=EngineConfig(batch_size=3, progress=False), scope="all")
    none = EngineConfig(batch_size=3, progress=False, memory_limit_gb=0.0, max_spill_gb=0.0)
    with pytest.warns(MemoryLimitWarning):
        recomputed = build_table(model, tok, queries, cands, index, original, config=none, scope="all")
    assert kept.meta["captures"] == kept.meta["distinct_samples"] == 7
    assert recomputed.meta["plan"]["kept"] == 0 and recomputed.meta["spilled_bytes"] == 0
    assert recomputed.meta["captures"] == recomputed.meta["plan"]["captures"] > 7
    gq, gc = tiny.naive(model, tok, queries), tiny.naive(model, tok, cands)
    ref = np.stack([tiny.naive_dots(model, comps, [gq[q]], [gc[j] for j in index[q]])[0] for q in range(5)])
    scale = np.sqrt(recomputed.query_self[:, None, :] * recomputed.candidate_self)
    for table in (kept, recomputed):
        assert np.max(np.abs(table.cross - ref) / np.maximum(scale, 1e-30)) <= tiny.NAIVE_TOL
    np.testing.assert_allclose(recomputed.query_self, kept.query_self, rtol=1e-5)
    np.testing.assert_allclose(recomputed.candidate_self, kept.candidate_self, rtol=1e-5)


@pytest.mark.parametrize("block_bytes", [None, 1500])
def test_component_by_component_order_equals_the_naive_loop_and_the_streamed_table(monkeypatch, block_bytes):
    """Also with blocks of a few rows (1500 bytes): components split in several blocks, the last one shorter, all
    in one reused storage that holds the previous block's numbers."""
    from selproj_plugin import gram_order
    from selproj_plugin.projection import CountSketch

    if block_bytes is not None:
        monkeypatch.setattr(gram_order, "GRAM_BLOCK_BYTES", block_bytes)
    model = tiny.model("qwen2", tied=True)
    tok = tiny.tokenizer()
    comps = catalogue(model, "all")
    queries = [Sample(f"q{i}", f"Question number {i}?", f"Answer {i} is here.") for i in range(3)] + [tiny.SAMPLES[1]]
    cands = tiny.SAMPLES
    index = np.array([[0, 1, 2, 3], [1, 2, 3, 0], [3, 2, 1, 0], [1, 0, 2, 3]])  # every candidate; q3 is also one
    sketch = CountSketch(comps, 16, seed=3)
    disjoint = build_table(
        model,
        tok,
        queries[:3],
        cands,
        index[:3],
        np.zeros(3, dtype=int),
        scope="all",
        config=EngineConfig(batch_size=3, progress=False, dot_order="gram"),
    )
    tables = {
        order: build_table(
            model,
            tok,
            queries,
            cands,
            index,
            np.zeros(4, dtype=int),
            scope="all",
            transforms=[sketch],
            config=EngineConfig(batch_size=3, progress=False, dot_order=order),
        )
        for order in ("stream", "gram")
    }
    scale = np.sqrt(disjoint.query_self[:, None, :] * disjoint.candidate_self)  # queries apart from candidates:
    assert np.max(np.abs(disjoint.cross - tables["gram"].cross[:3]) / np.maximum(scale, 1e-30)) <= tiny.NAIVE_TOL  # no copies
    assert tables["gram"].meta["plan"]["dot_order"] == "gram" and tables["stream"].meta["plan"]["dot_order"] == "stream"
    gq, gc = tiny.naive(model, tok, queries), tiny.naive(model, tok, cands)
    ref = np.stack([tiny.naive_dots(model, comps, [gq[q]], [gc[j] for j in index[q]])[0] for q in range(4)])
    qself = np.stack([tiny.naive_dots(model, comps, [g], [g])[0, 0] for g in gq])
    for table in tables.values():
        scale = np.sqrt(table.query_self[:, None, :] * table.candidate_self)
        assert np.max(np.abs(table.cross - ref) / np.maximum(scale, 1e-30)) <= tiny.NAIVE_TOL
        assert np.max(np.abs(table.query_self - qself) / np.maximum(qself, 1e-30)) <= tiny.NAIVE_TOL
    # the same sketch of the same gradients (captured in other batches: fp32 rounding apart)
    np.testing.assert_allclose(tables["gram"].rp_similarity, tables["stream"].rp_similarity, rtol=0, atol=1e-5)


def test_many_partners_choose_the_component_by_component_order():
    model = tiny.model("llama", tied=True)
    tok = tiny.tokenizer()
    from selproj_plugin.engine import plan_table

    queries = [Sample(f"q{i}", f"Question {i}?", f"Answer {i}.") for i in range(16)]
    cands = [Sample(f"c{i}", f"Prompt {i} here?", f"Reply {i} there.") for i in range(16)]
    few = plan_table(model, tok, queries, cands, np.arange(16)[:, None], config=EngineConfig())
    every = plan_table(model, tok, queries, cands, np.tile(np.arange(16), (16, 1)), config=EngineConfig())
    assert few.dot_order == "stream" and every.dot_order == "gram"


def test_a_limit_below_what_the_process_needs_warns_and_the_plan_says_so():
    """A limit the process is already over gave a run (and a plan) silently past it."""
    import warnings

    from selproj_plugin.engine import MemoryLimitWarning, plan_table

    model, tok = tiny.model("llama"), tiny.tokenizer()
    args = (model, tok, tiny.SAMPLES[:2], tiny.SAMPLES, np.array([[0, 1], [2, 3]]))
    with pytest.warns(MemoryLimitWarning, match=r"^predicted peak \d+\.\d\d GiB is over the 0.01 GB memory limit"):
        tight = plan_table(*args, config=EngineConfig(memory_limit_gb=0.01))
    assert tight.peak_bytes > 0.01 * 2**30 and any("over the 0.01 GB" in n for n in tight.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryLimitWarning)
        roomy = plan_table(*args, config=EngineConfig(memory_limit_gb=64))
    assert roomy.peak_bytes <= 64 * 2**30 and not any("memory limit" in n for n in roomy.notes)


def test_ranks_plan_with_the_tightest_ranks_budget(monkeypatch):
    """Ranks derive units and shards from the plan, so all must plan alike: a rank with no RAM or disk
    to spare makes every rank recompute, instead of each planning with its own budget."""
    from selproj_plugin import distributed
    from selproj_plugin.engine import plan_table

    model = tiny.model("llama", tied=True)
    tok = tiny.tokenizer()
    queries = [Sample(f"q{i}", f"Question {i}?", f"Answer {i}.") for i in range(4)]
    index = np.array([[0, 1], [1, 0], [0, 1], [1, 0]])
    stream = EngineConfig(dot_order="stream")  # ranks stream; alone, this table would go component by component
    alone = plan_table(model, tok, queries, tiny.SAMPLES[:2], index, config=stream, across_ranks=True)
    monkeypatch.setattr(distributed, "rank_world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "gather", lambda mine: [mine, (0.0,) * len(mine)])  # rank 1: nothing to spare
    shared = plan_table(model, tok, queries, tiny.SAMPLES[:2], index, config=stream, across_ranks=True)
    assert len(alone.kept) == 2 and alone.recomputed == 0  # this rank alone keeps both candidates
    assert shared.kept == [] and shared.recomputed > 0


def test_bad_dot_order_and_spill_limit_are_one_line_errors():
    model = tiny.model("llama", tied=True)
    tok = tiny.tokenizer()
    from selproj_plugin.engine import plan_table

    for config, words in (
        (EngineConfig(dot_order="diagonal"), "unknown dot order 'diagonal'"),
        (EngineConfig(max_spill_gb=-1), "max_spill_gb must be at least 0"),
        (EngineConfig(memory_limit_gb=-1), "memory_limit_gb must be at least 0"),
        (EngineConfig(device_memory_gb=-2), "device_memory_gb must be at least 0"),
    ):
        with pytest.raises(ValueError, match=words) as err:
            plan_table(model, tok, tiny.SAMPLES[:1], tiny.SAMPLES[1:2], np.array([[0]]), config=config)
        assert "\n" not in str(err.value)


def test_streamed_units_report_one_progress_count(caplog):
    model = tiny.model("llama", tied=True)
    tok = tiny.tokenizer()
    queries = [Sample(f"q{i}", f"Question number {i}?", f"Answer {i} is here.") for i in range(4)]
    with pytest.warns(MemoryLimitWarning), caplog.at_level("INFO", logger="selproj"):
        build_table(
            model,
            tok,
            queries,
            tiny.SAMPLES[:3],
            np.array([[0, 1], [1, 2], [0, 2], [2, 0]]),
            np.zeros(4, dtype=int),
            config=EngineConfig(batch_size=3, memory_limit_gb=0.0, max_spill_gb=0.0, progress=False),
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("capture queries: ")]
    assert lines[0] == "capture queries: 12 samples"  # 4 queries + 8 recomputed candidates, one count
    assert len(lines) == 2 and lines[1].startswith("capture queries: 12/12 samples in "), lines


def test_component_order_norms_are_accumulated_in_float64():
    """Long rows (a component's million coordinates) lose ~1e-4 in an fp32 reduction; the self dots must not."""
    from selproj_plugin.gram_order import squared_norms

    block = torch.rand(2, 4_000_000, generator=torch.Generator().manual_seed(0))  # 2 rows of 2,000 x 2,000
    exact = block.double().square().sum(dim=1).numpy()
    assert np.max(np.abs(squared_norms(block[:, None], 2_000)[:, 0] - exact) / exact) <= 1e-7  # one fp32 reduction: 1.4e-4


def test_kept_factors_on_the_device_leave_host_memory_and_count_on_the_device():
    lengths = [10] * 7
    c_of = np.array([[4, 5], [4, 5], [4, 6], [4, 6]])
    args = dict(store_budget=3000, spill_allowance=0, resident_bytes=0, batch_tokens=10)
    host = plan_pairs(lengths, [0] * 7, [0, 1, 2, 3], c_of, _widths(100), **args)
    device = plan_pairs(lengths, [0] * 7, [0, 1, 2, 3], c_of, _widths(100), **args)
    device.device_budget = 2000
    assert host.ram_bytes == device.ram_bytes == 3000  # the same samples kept either way
    assert host.peak_bytes - device.peak_bytes == 2000  # two of the three no longer in host memory
    assert device.device_bytes(0) - host.device_bytes(0) == 2000
    assert device.summary()["kept_device_bytes"] == 2000 and device.summary()["kept_ram_bytes"] == 1000
    assert "on the device" in device.describe() and "on the device" not in host.describe()


def test_a_capture_batch_counts_every_captured_factor_and_one_materialised_sample():
    """With every component materialised no factor is stored, yet a batch captures them all before one
    sample at a time becomes whole gradients: the plan had counted 0 bytes for it."""
    widths = FactorWidths(0, 0, 5000, 1, captured_per_token=100)
    plan = plan_pairs(
        [10, 10], [0, 0], [0], np.array([[1]]), widths, store_budget=10**6, spill_allowance=0, resident_bytes=0, batch_tokens=8
    )
    assert plan.batch_bytes == 10 * 2 * 100 + 5000  # the longest sample's tokens, two copies, one whole sample


def test_captured_widths_do_not_shrink_when_components_are_materialised():
    model, tok = tiny.model("llama", tied=True), tiny.tokenizer()
    prep = prepare(model, tok, None)
    names = sorted(s.name for s in prep.specs if s.kind == "factor")
    factored, dense = prep.widths([]), prep.widths(names)
    assert factored.captured_per_token == factored.per_token + factored.per_target
    assert dense.per_token == dense.per_target == 0 and dense.captured_per_token == factored.captured_per_token


def _smollm2_on_meta() -> torch.nn.Module:
    """SmolLM2-135M's geometry, no weights: what the measured runs below used."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("limit_gb", [3.5, 16.0])
def test_every_original_a_candidate_plans_component_by_component_at_any_limit(limit_gb):
    """Measured 2026-11-30 on the 2-core CPU, `benchmark.speed --only fullset` (32 x 32, SmolLM2-135M, 177
    tokens mean) at a 16 GB limit: streamed with every component materialised 211.6 s, component by
    component 107.8 s. The planner chose streaming there while a materialised pair dot was weighed at 8
    matrix-product flops a parameter; it measures 45."""
    from selproj_plugin.engine import plan_table

    n = 32
    queries = [Sample(f"q{i}", f"Paraphrased question {i:02d} " + "w" * 50, "r" * 100) for i in range(n)]
    originals = [Sample(f"o{i}", f"Original question {i:02d} " + "w" * 52, "r" * 100) for i in range(n)]
    plan = plan_table(
        _smollm2_on_meta(),
        tiny.tokenizer(),
        queries,
        originals,
        np.tile(np.arange(n), (n, 1)),
        config=EngineConfig(memory_limit_gb=limit_gb, max_spill_gb=21.5),
    )
    assert 170 <= np.mean(plan.lengths) <= 185
    assert plan.dot_order == "gram"


def test_a_spill_directory_not_made_yet_is_measured_at_its_nearest_existing_parent(tmp_path):
    import shutil

    model = tiny.model("llama")
    tok = tiny.tokenizer()
    config = EngineConfig(progress=False, spill_dir=str(tmp_path / "not" / "made" / "yet"))
    plan = plan_table(model, tok, tiny.SAMPLES[:1], tiny.SAMPLES, np.array([[1, 2]]), config=config)
    assert plan.spill_allowance == pytest.approx(shutil.disk_usage(tmp_path).free / 2, rel=0.05)


def _fake_cuda(monkeypatch, free_gib: float) -> None:
    """The device query of a CUDA device with ``free_gib`` free (no GPU here: nothing else asks CUDA)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 80 * 2**30))


def test_capture_batch_tokens_on_cuda_come_from_free_device_memory(monkeypatch):
    from selproj_plugin.budget import batch_tokens

    per_token = 2 * 2**20  # about SmolLM2-135M's captured bytes a token, twice
    cuda = EngineConfig(device="cuda")
    _fake_cuda(monkeypatch, 40)
    tokens, why = batch_tokens(cuda, lambda: per_token)
    # kept factors take half of the 40 GiB free and a batch half of the rest: 10 GiB at 2 MiB a token
    assert tokens == 5120 and "40.0 GiB free" in why
    assert batch_tokens(EngineConfig(device="cuda", device_memory_gb=30), lambda: per_token)[0] == 2560  # half of 10
    _fake_cuda(monkeypatch, 10)
    assert batch_tokens(cuda, lambda: per_token)[0] == 1280
    assert batch_tokens(EngineConfig(device="cuda", batch_tokens=700), lambda: per_token) == (700, "EngineConfig.batch_tokens")
    assert batch_tokens(EngineConfig(), lambda: 1 // 0)[0] == 512  # the CPU as before, no width asked for
    with pytest.raises(ValueError, match="^batch_tokens must be at least 1, got 0$"):
        batch_tokens(EngineConfig(batch_tokens=0), lambda: per_token)


def test_a_plan_on_cuda_batches_what_free_memory_allows_and_says_why(monkeypatch):
    """The planner charges a batch what it sizes it by: on CUDA the batch is device memory, half of what the kept
    factors leave, and none of the host's."""
    from selproj_plugin import distributed
    from selproj_plugin.engine import plan_table

    model, tok = tiny.model("llama", tied=True), tiny.tokenizer()
    queries = [Sample(f"q{i}", f"Question number {i}?", f"Answer {i} " * (1 + i)) for i in range(12)]
    args = (model, tok, queries, tiny.SAMPLES, np.arange(12)[:, None] % 5)
    cpu = plan_table(*args, config=EngineConfig(batch_size=64, memory_limit_gb=64))
    plans = {}
    for free in (0.02, 0.08):  # a thousand and four thousand tokens of a tiny model's factors
        _fake_cuda(monkeypatch, free)
        plans[free] = plan_table(*args, config=EngineConfig(device="cuda", batch_size=64, memory_limit_gb=64))
    small, large = plans[0.02], plans[0.08]
    per_token = large.widths.batch_bytes_per_token
    assert cpu.batch_tokens == 512 and len(cpu.units) > 1
    assert 3.9 < large.batch_tokens / small.batch_tokens < 4.1 and large.batch_tokens > 2000
    for free, plan in plans.items():
        room = (free * 2**30 - plan.device_budget) / 2
        assert room - per_token < plan.batch_bytes - plan.widths.per_sample <= room  # the batch fills its half
        assert f"up to {plan.batch_tokens:,} padded tokens (half of the {free:.1f} GiB free on cuda" in plan.describe()
        assert plan.summary()["batch_tokens"] == plan.batch_tokens and plan.on_device
    assert len(large.units) == 1  # every streamed sample in one batch
    monkeypatch.setattr(distributed, "rank_world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "gather", lambda mine: [mine, mine // 2 if isinstance(mine, int) else mine])  # rank 1
    # has less free memory and the same budgets
    shared = plan_table(*args, config=EngineConfig(device="cuda", batch_size=64, dot_order="stream"), across_ranks=True)
    assert shared.batch_tokens == large.batch_tokens // 2 and "smallest of the ranks'" in shared.batch_why


def test_on_cuda_the_sample_count_of_a_batch_follows_its_tokens_unless_asked_for(monkeypatch):
    """Off CUDA a capture batch holds at most 8 samples; on CUDA the padded tokens alone bound it, so a GPU gets
    every sample its memory allows in one forward; an explicit batch_size caps both."""
    from selproj_plugin.engine import plan_table

    model, tok = tiny.model("llama", tied=True), tiny.tokenizer()
    queries = [Sample(f"q{i}", f"Question number {i}?", "Short answer.") for i in range(20)]
    args = (model, tok, queries, tiny.SAMPLES, np.arange(20)[:, None] % 5)

    def largest_batch(config: EngineConfig) -> int:
        plan = plan_table(*args, config=config)
        return max(len(unit) for unit in plan.units if all(len(g) == 1 for g in unit))

    assert largest_batch(EngineConfig(memory_limit_gb=64, dot_order="stream", batch_tokens=10_000)) == 8
    _fake_cuda(monkeypatch, 0.08)
    assert largest_batch(EngineConfig(device="cuda", memory_limit_gb=64, dot_order="stream")) == 20
    assert largest_batch(EngineConfig(device="cuda", memory_limit_gb=64, dot_order="stream", batch_size=6)) == 6
    with pytest.raises(ValueError, match="^batch_size must be at least 1, got 0$"):
        plan_table(*args, config=EngineConfig(batch_size=0))
