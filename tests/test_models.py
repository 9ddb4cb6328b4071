"""Model loading: local checkpoints, dtype, unknown names (offline), cache location, the default model."""

from __future__ import annotations


import pytest
import torch

from tests import tiny
from selproj_plugin import models
from selproj_plugin.models import ModelLoadError, cache_dir, load_model


@pytest.fixture()
def saved(tmp_path):
    model = tiny.model("llama", tied=True)
    model.save_pretrained(tmp_path / "m")
    tiny.tokenizer().save_pretrained(tmp_path / "m")
    return tmp_path / "m", model


def test_load_local_checkpoint_eval_eager_fp32(saved):
    path, ref = saved
    model, tok = load_model(str(path))
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float32
    assert tok.chat_template == tiny.CHAT_TEMPLATE
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_load_bf16(saved):
    model, _ = load_model(str(saved[0]), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_path_and_id_give_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (str(tmp_path / "does-not-exist"), "nobody-here/no-such-model-xyz"):
        with pytest.raises(ModelLoadError, match="cannot load model") as info:
            load_model(name)
        assert name in str(info.value) and "\n" not in str(info.value)
        assert isinstance(info.value, ValueError)
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        load_model(str(tmp_path), dtype="int3")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SELPROJ_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SELPROJ_CACHE")
    assert cache_dir() == models.Path.home() / ".cache" / "selproj"


def test_the_stage_cache_and_the_scale_out_bench_use_the_model_caches_root(monkeypatch, tmp_path):
    from benchmark.cache import StageCache

    monkeypatch.setenv("SELPROJ_CACHE", str(tmp_path / "env"))
    assert StageCache().root == tmp_path / "env" / "benchmark"
    assert StageCache(tmp_path / "arg").root == tmp_path / "arg" / "benchmark"


def test_default_gguf_is_found_without_importing_the_plugin():
    path = models.default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


@pytest.mark.slow
def test_default_model_loads_from_cache():
    """The embedded SmolLM2 (dequantised once, ~25 s, then cached under ~/.cache/selproj or $SELPROJ_CACHE)."""
    model, tok = load_model()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    leftovers = [p.name for p in cache_dir().iterdir() if "SmolLM2" in p.name and p.name.startswith(".") and not p.name.endswith(".lock")]
    assert not leftovers  # no temporary conversion left (the lock file stays, as file locks do)
