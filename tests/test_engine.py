"""The engine against an independent naive per-sample ``loss.backward()`` loop, and bad input."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

from tests import tiny
from selproj_plugin.components import catalogue
from selproj_plugin.engine import EngineConfig, MemoryLimitWarning, build_table, pairwise_dots, sample_features
from selproj_plugin.loss import IGNORE, ModelError, SampleError, encode_sample, encode_samples
from selproj_plugin.samples import Sample

TOL = tiny.NAIVE_TOL
CFG = EngineConfig(batch_size=3, progress=False)
CASES = [(f, False) for f in tiny.FAMILIES if f != "gpt2"] + [("llama", True), ("qwen2", True), ("gpt2", True)]


def _rel(got, ref, norms_a, norms_b):
    """|got - ref| normalised by |g_a| |g_b| per component (dot products near 0 stay meaningful)."""
    return np.max(np.abs(got - ref) / np.maximum(norms_a[:, None, :] * norms_b[None, :, :], 1e-30))


@pytest.mark.parametrize("family,tied", CASES)
def test_features_and_dots_match_naive_loop(family, tied):
    model = tiny.model(family, tied)
    tok = tiny.tokenizer(chat=family != "gpt2")
    comps = catalogue(model, "all")
    naive = tiny.naive(model, tok, tiny.SAMPLES)
    feats = sample_features(model, tok, tiny.SAMPLES, config=CFG, scope="all")
    assert set(feats) == {c.name for c in comps}
    for c in comps:
        for i in range(len(tiny.SAMPLES)):
            ref = tiny.component_vector(model, naive[i], c)
            err = float((feats[c.name][i].double() - ref).norm() / ref.norm())
            assert err <= TOL, (c.name, i, err)
    ref = tiny.naive_dots(model, comps, naive[:2], naive)
    norms = np.sqrt(np.stack([tiny.naive_dots(model, comps, [g], [g])[0, 0] for g in naive]))
    for mode in ("factored", "materialised", "auto"):
        got = pairwise_dots(
            model, tok, tiny.SAMPLES[:2], tiny.SAMPLES, config=EngineConfig(batch_size=2, progress=False, mode=mode), scope="all"
        )
        assert got.shape == ref.shape
        assert _rel(got, ref, norms[:2], norms) <= TOL, mode
        self_err = np.max(np.abs(got[[0, 1], [0, 1]] - ref[[0, 1], [0, 1]]) / ref[[0, 1], [0, 1]])
        assert self_err <= TOL, mode


def test_tied_embedding_is_one_component_with_both_uses():
    model = tiny.model("llama", tied=True)
    tok = tiny.tokenizer()
    comps = catalogue(model, "all")
    embed = [c for c in comps if c.kind == "embed"]
    assert len(embed) == 1 and not any(c.kind == "lm_head" for c in comps)
    naive = tiny.naive(model, tok, tiny.SAMPLES[:1])[0]
    feats = sample_features(model, tok, tiny.SAMPLES[:1], components=[embed[0].name], config=CFG, scope="all")
    ref = naive[embed[0].param_names[0]].reshape(-1).double()
    # the LM-head use dominates the rows of tokens never seen in the input: both uses are needed
    assert float((feats[embed[0].name][0].double() - ref).norm() / ref.norm()) <= TOL


def test_build_table_matches_naive_and_dedupes():
    model = tiny.model("qwen2", tied=True)
    tok = tiny.tokenizer()
    comps = catalogue(model, "all")
    queries = [Sample("q0", "Tell me about the sky", "It is blue."), tiny.SAMPLES[2]]  # second query is also a candidate
    cands = tiny.SAMPLES
    index = np.array([[0, 1, 2], [2, 3, 1]])  # s1 and s2 shared by both queries
    original = np.array([0, 0])
    table = build_table(model, tok, queries, cands, index, original, config=CFG, scope="all")
    gq = tiny.naive(model, tok, queries)
    gc = tiny.naive(model, tok, cands)
    ref = np.stack([tiny.naive_dots(model, comps, [gq[q]], [gc[j] for j in index[q]])[0] for q in range(2)])
    qself = np.stack([tiny.naive_dots(model, comps, [g], [g])[0, 0] for g in gq])
    cself = np.stack([[tiny.naive_dots(model, comps, [gc[j]], [gc[j]])[0, 0] for j in row] for row in index])
    scale = np.sqrt(qself[:, None, :] * cself)
    assert np.max(np.abs(table.cross - ref) / np.maximum(scale, 1e-30)) <= TOL
    assert np.max(np.abs(table.query_self - qself) / qself) <= TOL
    assert np.max(np.abs(table.candidate_self - cself) / cself) <= TOL
    assert table.meta["distinct_samples"] == 5  # q0 + s0..s3; s2 is both a query and a candidate
    assert table.is_original[:, 0].all() and table.is_original.sum() == 2
    assert list(table.components) == [c.name for c in comps]
    assert table.rp_similarity is None  # projections: tests/test_projection.py


def test_build_table_keeps_the_smaller_side():
    # four queries share two candidates: the candidates' factors are kept, the queries stream
    model = tiny.model("llama", tied=True)
    tok = tiny.tokenizer()
    comps = catalogue(model, "all")
    queries = [Sample(f"q{i}", f"Question number {i}?", f"Answer {i} is here.") for i in range(4)]
    cands = tiny.SAMPLES[:2]
    index = np.array([[0, 1], [1, 0], [0, 1], [1, 0]])
    table = build_table(model, tok, queries, cands, index, np.array([0, 0, 0, 0]), config=CFG, scope="all")
    gq, gc = tiny.naive(model, tok, queries), tiny.naive(model, tok, cands)
    ref = np.stack([tiny.naive_dots(model, comps, [gq[q]], [gc[j] for j in index[q]])[0] for q in range(4)])
    scale = np.sqrt(table.query_self[:, None, :] * table.candidate_self)
    assert np.max(np.abs(table.cross - ref) / np.maximum(scale, 1e-30)) <= TOL
    assert table.meta["distinct_samples"] == 6


def test_spill_to_disk_gives_same_dots():
    model = tiny.model("llama")
    tok = tiny.tokenizer()
    ram = pairwise_dots(model, tok, tiny.SAMPLES[:3], tiny.SAMPLES[2:], config=CFG, scope="all")
    disk = pairwise_dots(
        model, tok, tiny.SAMPLES[:3], tiny.SAMPLES[2:], config=EngineConfig(batch_size=3, progress=False, memory_limit_gb=0.0), scope="all"
    )
    np.testing.assert_allclose(disk, ram, rtol=1e-12, atol=0)
    with pytest.warns(MemoryLimitWarning, match="over the 0 GB memory limit"):  # nothing fits: said, then run
        table = build_table(
            model,
            tok,
            tiny.SAMPLES[:2],
            tiny.SAMPLES,
            np.array([[0, 1], [1, 2]]),
            np.array([0, 0]),
            config=EngineConfig(batch_size=2, progress=False, memory_limit_gb=0.0),
            scope="all",
        )
    assert table.meta["spilled_bytes"] > 0


def test_truncation_warns_counts_and_matches_truncated_naive():
    model = tiny.model("mistral")
    tok = tiny.tokenizer()
    long = Sample("long", "short prompt", "a response that is much longer than the limit " * 3)
    with pytest.warns(UserWarning, match="truncated"):
        enc, count = encode_samples(tok, [long, tiny.SAMPLES[0]], 40)
    assert count == 1 and len(enc[0].input_ids) == 40 and enc[0].labels[-1] != tok.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = build_table(
            model,
            tok,
            [long],
            [tiny.SAMPLES[0], long],
            np.array([[0, 1]]),
            np.array([1]),
            config=EngineConfig(max_length=40, progress=False),
            scope="all",
        )
        feats = sample_features(model, tok, [long], config=EngineConfig(max_length=40, progress=False), scope="all")
    assert table.meta["truncated"] == 1
    ref = tiny.naive_grads(model, enc[0])
    comp = catalogue(model, "all")[3]
    err = (feats[comp.name][0].double() - tiny.component_vector(model, ref, comp)).norm() / tiny.component_vector(model, ref, comp).norm()
    assert float(err) <= TOL


def test_loss_masks_prompt_and_adds_eos():
    tok = tiny.tokenizer(chat=True)
    enc = encode_sample(tok, Sample("a", "hi", "yo"), 512)
    prefix = tok("<|user|>hi<|assistant|>", add_special_tokens=False)["input_ids"]
    assert list(enc.input_ids) == prefix + tok("yo", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(enc.labels) == [IGNORE] * len(prefix) + list(enc.input_ids[len(prefix) :])
    plain = tiny.tokenizer(chat=False, bos=True)
    enc = encode_sample(plain, Sample("b", "hi", "yo"), 512)
    assert enc.input_ids[0] == plain.bos_token_id and enc.input_ids[-1] == plain.eos_token_id
    assert enc.labels[:3] == (IGNORE,) * 3 and enc.n_targets == 3  # "y", "o", EOS


# ---- bad input: one-line errors naming the sample or the model -------------------------
def test_empty_response_text_names_sample():
    with pytest.raises(SampleError, match=r"sample nores: prompt with no response") as info:
        sample_features(tiny.model("llama"), tiny.tokenizer(), [tiny.SAMPLES[0], Sample("nores", "a prompt", "")], config=CFG, scope="all")
    assert "\n" not in str(info.value)


def test_empty_response_after_masking_names_sample():
    with pytest.raises(SampleError, match=r"sample longprompt: empty response after masking") as info:
        pairwise_dots(
            tiny.model("llama"),
            tiny.tokenizer(),
            [Sample("longprompt", "p" * 100, "answer")],
            tiny.SAMPLES[:1],
            config=EngineConfig(max_length=30, progress=False),
            scope="all",
        )
    assert "\n" not in str(info.value)


def test_nan_loss_names_sample():
    model = tiny.model("llama")
    tok = tiny.tokenizer()
    bad_token = tok("Z", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_token] = float("nan")
    samples = [tiny.SAMPLES[0], Sample("poisoned", "Zebra?", "yes")]
    with pytest.raises(SampleError, match=r"sample poisoned: loss is nan") as info:
        sample_features(model, tok, samples, config=CFG, scope="all")
    assert "\n" not in str(info.value)


def test_nan_gradient_with_finite_loss_names_sample():
    model = tiny.model("llama")
    tok = tiny.tokenizer()

    def poison(module, args, out):  # zero in value, NaN in gradient, for batch row 1 only
        bad = torch.sqrt(out[1] * 0).sum() * 0
        return out + torch.stack([torch.zeros((), dtype=out.dtype), bad]).view(-1, 1, 1)

    model.model.layers[1].mlp.register_forward_hook(poison)
    samples = [Sample("fine", "What?", "That is long enough a reply."), Sample("nangrad", "Hi", "ok")]
    with pytest.raises(SampleError, match=r"sample nangrad: gradient is NaN or inf") as info:
        sample_features(model, tok, samples, config=EngineConfig(batch_size=2, progress=False), scope="all")
    assert "\n" not in str(info.value)


def test_model_without_trainable_parameters_names_model():
    model = tiny.model("gpt_neox")
    model.config._name_or_path = "frozen-neox"
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ModelError, match=r"model frozen-neox has no trainable parameters") as info:
        sample_features(model, tiny.tokenizer(), tiny.SAMPLES[:1], config=CFG, scope="all")
    assert "\n" not in str(info.value)


def test_partially_frozen_model_and_parameters_restored():
    model = tiny.model("qwen2")
    for name, p in model.named_parameters():
        if "layers.0" not in name or name.endswith("q_proj.weight"):
            p.requires_grad_(False)  # q_proj keeps only its bias: a bias-only component
    tok = tiny.tokenizer()
    comps = catalogue(model, "all")
    feats = sample_features(model, tok, tiny.SAMPLES[:2], config=CFG, scope="all")
    naive = tiny.naive(model, tok, tiny.SAMPLES[:2])
    for c in comps:
        for i in range(2):
            ref = tiny.component_vector(model, naive[i], c)
            assert float((feats[c.name][i].double() - ref).norm() / ref.norm()) <= TOL, c.name
    assert [p.requires_grad for p in model.parameters()].count(True) == sum(len(c.param_names) for c in comps)


def test_capture_batches_stay_within_the_token_budget():
    from selproj_plugin.batching import batches as capture_batches

    tok = tiny.tokenizer()
    enc, _ = encode_samples(tok, tiny.SAMPLES * 3, 512)
    config = EngineConfig(batch_size=4, batch_tokens=2 * max(len(e.input_ids) for e in enc), progress=False)
    batches = list(capture_batches(enc, range(len(enc)), config))
    assert sorted(i for b in batches for i in b) == list(range(len(enc)))
    for b in batches:
        padded = len(b) * max(len(enc[i].input_ids) for i in b)
        assert len(b) <= 4 and (len(b) == 1 or padded <= config.batch_tokens), (b, padded)
    one = EngineConfig(batch_size=4, batch_tokens=1, progress=False)  # a sample longer than the budget goes alone
    assert all(len(b) == 1 for b in capture_batches(enc, range(len(enc)), one))


def test_capture_hands_each_samples_factors_over_and_keeps_none():
    """Once the consumer drops a sample's factors they are freed, before the next sample of the batch."""
    import gc
    import weakref

    from selproj_plugin.engine import iter_factors, prepare

    model, tok = tiny.model("llama"), tiny.tokenizer()
    enc, _ = encode_samples(tok, tiny.SAMPLES, 512)
    prep = prepare(model, tok, None)
    alive = []
    for _, f in iter_factors(prep, enc, range(len(enc)), EngineConfig(batch_size=len(enc), progress=False)):
        gc.collect()
        assert all(ref() is None for ref in alive)
        alive.append(weakref.ref(f))
        del f
    assert len(alive) == len(enc)


def test_capture_hands_out_views_and_whatever_keeps_a_sample_copies_it_out():
    """The capture copies no factor (copying every sample's ~190 MB of SmolLM2 factors took 1.9 of a full set's
    35 s of capture); the store's RAM and ``iter_factors`` copy a sample out, so a kept sample never keeps its
    whole batch's tensors alive."""
    from selproj_plugin.engine import FactorStore, iter_factors, prepare
    from selproj_plugin.prepared import capture

    model, tok = tiny.model("llama"), tiny.tokenizer()
    enc, _ = encode_samples(tok, tiny.SAMPLES[:3], 512)
    prep = prepare(model, tok, None)
    cfg = EngineConfig(batch_size=3, progress=False)

    def owns(f):
        return all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in (*f.tensors.values(), *f.vectors.values()))

    def storages(f):
        return {t.untyped_storage().data_ptr() for t in f.tensors.values() if t.is_floating_point()}

    got = dict(capture(prep, enc, [[0, 1, 2]], cfg))
    assert storages(got[0]) & storages(got[1]) and not owns(got[0])  # rows of one batch tensor, not copies
    store = FactorStore(float("inf"))
    try:
        store.put(0, got[0])
        kept = store.get(0)
        assert owns(kept)
        assert all(torch.equal(kept.tensors[k], t) for k, t in got[0].tensors.items())
    finally:
        store.close()
    assert all(owns(f) for _, f in iter_factors(prep, enc, range(3), cfg))


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(batch_size=2, progress=False, dot_order="stream"),
        EngineConfig(batch_size=2, progress=False, dot_order="gram"),
        EngineConfig(batch_size=2, progress=False, dot_order="stream", memory_limit_gb=0.0),  # kept side spilled
        EngineConfig(batch_size=2, progress=False, memory_limit_gb=0.0, max_spill_gb=0.0),  # recomputed in groups
    ],
    ids=["stream", "gram", "spilled", "recomputed"],
)
def test_no_batchs_tensors_live_on_into_the_next_capture(monkeypatch, config):
    """The factors are views of their batch's tensors; a sample still held by a loop variable (or a finished group)
    while the next batch ran kept its whole batch alive: 0.2 GiB more peak RSS on the SmolLM2 full set."""
    import gc
    import weakref

    from selproj_plugin.capture import GradientCapture
    from selproj_plugin.engine import projected_features
    from selproj_plugin.projection import CountSketch

    bases: list = []
    real = GradientCapture.run

    def run(self, batch):
        gc.collect()
        assert not [r for r in bases if r() is not None], "an earlier batch's tensors are alive"
        out, losses = real(self, batch)
        if len(out) > 1:  # a lone sample's rows are its batch's whole tensor: kept, they are its own copy
            bases.extend(weakref.ref(t._base) for f in out for t in f.tensors.values() if t._base is not None)
        return out, losses

    monkeypatch.setattr(GradientCapture, "run", run)
    model, tok = tiny.model("llama"), tiny.tokenizer()
    queries = [Sample(f"q{i}", f"Question number {i}?", f"Answer {i} is here.") for i in range(4)]
    index = np.array([[0, 1], [1, 2], [0, 2], [2, 0]])
    with pytest.warns(MemoryLimitWarning) if config.memory_limit_gb == 0 else contextlib.nullcontext():
        build_table(model, tok, queries, tiny.SAMPLES[:3], index, np.zeros(4, dtype=int), config=config)
    assert bases  # the capture did hand out views
    pairwise_dots(model, tok, queries[:2], tiny.SAMPLES[:3], config=config)
    sample_features(model, tok, queries, config=config)
    projected_features(model, tok, queries, CountSketch(catalogue(model), 64, seed=0), config=config)


def test_capture_runs_sdpa_and_gives_the_model_back_eager():
    from selproj_plugin.engine import iter_factors, prepare

    model, tok = tiny.model("llama"), tiny.tokenizer()
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    enc, _ = encode_samples(tok, tiny.SAMPLES[:2], 512)
    list(iter_factors(prepare(model, tok, None), enc, range(2), CFG))
    hook.remove()
    assert seen == ["sdpa"] and model.config._attn_implementation == "eager"


def test_pair_partners_are_read_in_chunks_that_fit_the_buffer():
    from selproj_plugin.engine import FactorStore
    from selproj_plugin.capture import SampleFactors

    store = FactorStore(0.0)  # everything spilled: sizes must still be known without reading
    try:
        for k, n in enumerate([10, 30, 30, 50, 5]):
            store.put(k, SampleFactors(str(k), {"x": torch.zeros(n)}))
        assert list(store.chunks(range(5), 64 * 4)) == [[0, 1], [2], [3, 4]]
        assert list(store.chunks(range(5), 1)) == [[0], [1], [2], [3], [4]]
    finally:
        store.close()


def test_device_share_of_kept_factors_is_none_on_the_cpu_and_as_configured_elsewhere():
    from selproj_plugin.budget import device_budget

    assert device_budget(EngineConfig(device="cpu", device_memory_gb=4)) == 0
    assert device_budget(EngineConfig(device="meta", device_memory_gb=1.5)) == 1.5 * 2**30
    assert device_budget(EngineConfig(device="meta")) == 0  # no way to ask a non-CUDA device what is free


def test_a_batch_is_materialised_one_sample_at_a_time_as_it_is_handed_over(monkeypatch):
    """A batch of short samples materialised together held every sample's whole gradients at once: on
    SmolLM2-135M 8 x 538 MB beyond the plan (measured 19.3 GiB under a 16 GB limit)."""
    from selproj_plugin import capture
    from selproj_plugin.engine import iter_factors, prepare

    model, tok = tiny.model("llama", tied=True), tiny.tokenizer()
    prep = prepare(model, tok, None)
    names = sorted(s.name for s in prep.specs if s.kind == "factor")
    made = []
    real = capture.stacked_rows
    monkeypatch.setattr(capture, "stacked_rows", lambda specs, f, *a, **k: made.append(f.sample_id) or real(specs, f, *a, **k))
    enc, _ = encode_samples(tok, tiny.SAMPLES[:4], 512)
    seen = []
    for _i, f in iter_factors(prep, enc, range(4), EngineConfig(batch_size=4, progress=False), set(names)):
        seen.append(set(made))  # samples materialised so far
        assert set(names) <= set(f.vectors) and not f.tensors  # all materialised, no factor left over
    assert [len(s) for s in seen] == [1, 2, 3, 4]


def test_materialised_dots_sum_fp32_pieces_in_float64_to_the_exact_dot():
    from selproj_plugin.gram import DOT_BLOCK, _dense_dots

    gen = torch.Generator().manual_seed(0)
    for n in (5, DOT_BLOCK, 3 * DOT_BLOCK + 17, 300 * DOT_BLOCK + 1):  # shorter than a piece, whole, with a rest
        a, b = torch.randn(n, generator=gen) + 0.3, torch.randn(n, generator=gen)
        exact = float(a.double() @ b.double())
        got = _dense_dots(a[None], b[None, None])[0, 0]
        assert got.dtype == torch.float64
        assert abs(float(got) - exact) <= 1e-6 * float(a.double().norm() * b.double().norm())


def _spill_counter(monkeypatch):
    """Bytes every spill file was given, counted as the store writes them."""
    from selproj_plugin.spill import SpillDir

    written = []
    save = SpillDir.save

    def counting(self, name, arrays):
        written.append(sum(np.asarray(a).nbytes for a in arrays))
        return save(self, name, arrays)

    monkeypatch.setattr(SpillDir, "save", counting)
    return written


def test_pairwise_dots_spill_no_more_than_allowed_and_give_the_same_dots(monkeypatch):
    model = tiny.model("llama")
    tok = tiny.tokenizer()
    ram = pairwise_dots(model, tok, tiny.SAMPLES[:3], tiny.SAMPLES[1:], config=CFG, scope="all")
    written = _spill_counter(monkeypatch)
    pairwise_dots(
        model, tok, tiny.SAMPLES[:3], tiny.SAMPLES[1:], scope="all", config=EngineConfig(batch_size=1, progress=False, memory_limit_gb=0.0)
    )
    everything = sum(written)
    assert everything > 0 and len(written) == 3
    written.clear()
    allowance = everything * 0.5
    bounded = pairwise_dots(
        model,
        tok,
        tiny.SAMPLES[:3],
        tiny.SAMPLES[1:],
        scope="all",
        config=EngineConfig(batch_size=1, progress=False, memory_limit_gb=0.0, max_spill_gb=allowance / 2**30),
    )
    assert 0 < sum(written) <= allowance
    norms = np.sqrt(np.abs(np.stack([ram[i, i - 1] for i in (1, 2)])))  # self dots of samples 1 and 2
    scale = np.maximum(norms.max(axis=0), 1e-30) ** 2
    assert np.max(np.abs(bounded - ram) / scale) <= TOL


def test_a_forced_component_order_spills_no_more_than_allowed(monkeypatch):
    model = tiny.model("llama")
    tok = tiny.tokenizer()
    index, original = np.array([[1, 2, 3], [2, 3, 1]]), np.array([0, 0])
    stream = build_table(
        model,
        tok,
        tiny.SAMPLES[:2],
        tiny.SAMPLES,
        index,
        original,
        scope="all",
        config=EngineConfig(batch_size=2, progress=False, dot_order="stream"),
    )
    written = _spill_counter(monkeypatch)
    with pytest.warns(MemoryLimitWarning):
        everything = build_table(
            model,
            tok,
            tiny.SAMPLES[:2],
            tiny.SAMPLES,
            index,
            original,
            scope="all",
            config=EngineConfig(batch_size=2, progress=False, dot_order="gram", memory_limit_gb=0.0),
        )
    assert everything.meta["plan"]["dot_order"] == "gram" and sum(written) > 0
    allowance = sum(written) * 0.5
    written.clear()
    with pytest.warns(MemoryLimitWarning):
        bounded = build_table(
            model,
            tok,
            tiny.SAMPLES[:2],
            tiny.SAMPLES,
            index,
            original,
            scope="all",
            config=EngineConfig(batch_size=2, progress=False, dot_order="gram", memory_limit_gb=0.0, max_spill_gb=allowance / 2**30),
        )
    assert sum(written) <= allowance
    assert any("dot order 'gram'" in n for n in bounded.meta["plan"]["notes"])
    scale = np.sqrt(stream.query_self[:, None, :] * stream.candidate_self)
    assert np.max(np.abs(bounded.cross - stream.cross) / np.maximum(scale, 1e-30)) <= TOL


def test_each_modules_training_flag_is_put_back_after_capture():
    """A model in train mode with one block held in eval (a common fine-tuning set-up) comes back exactly so."""
    model, tok = tiny.model("llama"), tiny.tokenizer()
    model.train()
    model.model.layers[0].eval()
    before = [m.training for m in model.modules()]
    sample_features(model, tok, tiny.SAMPLES[:2], config=CFG)
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("order", ["stream", "gram"])
def test_a_table_builds_with_the_default_config_in_batches_of_eight(order):
    """EngineConfig() leaves the batch's sample count to the device (8 on a CPU): the build must use what its
    plan decided, in either order, and the table says so."""
    model, tok = tiny.model("llama", tied=True), tiny.tokenizer()
    queries = [Sample(f"q{i}", f"Question {i}?", "Answer.") for i in range(10)]
    index = np.arange(10)[:, None] % len(tiny.SAMPLES)
    table = build_table(
        model,
        tok,
        queries,
        tiny.SAMPLES,
        index,
        index == np.arange(10)[:, None] % len(tiny.SAMPLES),
        config=EngineConfig(progress=False, dot_order=order),
    )
    assert table.meta["batch_size"] == 8 and table.meta["plan"]["dot_order"] == order
