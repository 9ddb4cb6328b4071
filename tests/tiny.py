"""Tiny random-init models of each supported family and an offline byte-level tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OlmoConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from selproj_plugin.loss import IGNORE, Encoded

from selproj_plugin.samples import Sample

torch.set_num_threads(1)  # tiny matrices: threading overhead only (and the suite may share the CPU)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>"]
VOCAB = 256 + len(SPECIALS)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ '<eos>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tokenizer(chat: bool = True, bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (vocab 261); ``chat`` adds a chat template."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", additional_special_tokens=SPECIALS[3:]
    )
    if bos:
        from tokenizers.processors import TemplateProcessing

        fast._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _common(**kw):
    return dict(
        vocab_size=VOCAB,
        bos_token_id=258,
        eos_token_id=257,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **kw,
    )


def config(family: str, tied: bool = False):
    """Tiny config of ``family`` (llama, olmo, olmo2, qwen2, mistral, gpt_neox, gpt2)."""
    if family == "llama":
        return LlamaConfig(**_common(tie_word_embeddings=tied, pad_token_id=0))
    if family == "olmo":
        return OlmoConfig(**_common(tie_word_embeddings=tied, pad_token_id=0))
    if family == "olmo2":
        return Olmo2Config(**_common(tie_word_embeddings=tied, pad_token_id=0))
    if family == "qwen2":
        return Qwen2Config(**_common(tie_word_embeddings=tied))
    if family == "mistral":
        return MistralConfig(**_common(tie_word_embeddings=tied, sliding_window=None))
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=tied,
            bos_token_id=258,
            eos_token_id=257,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=256, tie_word_embeddings=True, bos_token_id=258, eos_token_id=257
        )
    raise ValueError(family)


FAMILIES = ("llama", "olmo", "olmo2", "qwen2", "mistral", "gpt_neox", "gpt2")


def model(family: str, tied: bool = False, seed: int = 0) -> torch.nn.Module:
    """Random-init tiny model in eval mode, eager attention, fp32, with non-trivial norm/bias values."""
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(family, tied), attn_implementation="eager").float().eval()
    with torch.no_grad():
        for _name, p in m.named_parameters():
            if p.dim() == 1:  # norms start at 1 and biases at 0: perturb so their gradients are generic
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(5.0)  # larger weights make the per-sample gradients less alike
    return m


SAMPLES = [
    Sample("s0", "What is two plus two?", "Four."),
    Sample("s1", "Name a colour", "Blue, like the sky on a clear day."),
    Sample("s2", "Say hi", "hi"),
    Sample("s3", "Write a longer answer about trees and forests please", "Trees grow in forests; they need light."),
    Sample("s4", "x", "A short reply with some words"),
]


def naive_grads(m: torch.nn.Module, enc: Encoded) -> dict[str, torch.Tensor]:
    """Per-parameter gradients of one sample by a plain backward (the reference, batch size 1)."""
    ids = torch.tensor([enc.input_ids])
    labels = torch.tensor(enc.labels[1:])
    m.zero_grad(set_to_none=True)
    logits = m(input_ids=ids).logits[0, :-1]
    keep = labels != IGNORE
    loss = F.cross_entropy(logits[keep].double(), labels[keep])
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


NAIVE_TOL = 1e-5  # relative error allowed against the naive loop


def naive(model, tok, samples, max_length=512) -> list[dict[str, torch.Tensor]]:
    """Per-sample gradients of ``samples`` by the naive loop."""
    from selproj_plugin.loss import encode_samples

    enc, _ = encode_samples(tok, samples, max_length)
    return [naive_grads(model, e) for e in enc]


def component_vector(model, grads, comp) -> torch.Tensor:
    """One component's gradient as a float64 vector (zeros for parameters that took no gradient)."""
    params = dict(model.named_parameters())
    return torch.cat([grads[p].reshape(-1) if p in grads else torch.zeros(params[p].numel()) for p in comp.param_names]).double()


def naive_dots(model, comps, ga, gb):
    """[len(ga), len(gb), len(comps)] per-component dot products of naive gradients."""
    import numpy as np

    return np.array([[[float(component_vector(model, a, c) @ component_vector(model, b, c)) for c in comps] for b in gb] for a in ga])


def convert_tiny(count, delay: float = 0.0):
    """A stand-in for the embedded model's GGUF conversion that counts its calls in ``count`` (one byte each)."""
    import time

    def convert():
        with open(count, "a") as fh:
            fh.write("x")
        time.sleep(delay)
        return model("llama", tied=True), tokenizer()

    return convert
