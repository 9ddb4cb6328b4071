"""Per-sample training loss as in the paper: mean cross-entropy over response tokens + EOS.

Prompt tokens are masked (label -100).  With a chat template the prompt is the user
turn rendered up to the assistant header; without one it is the plain prompt text.
The response and one EOS token follow at token level, so exactly ``len(response) + 1``
positions are trained.  The first response token needs a token before it to be predicted
from: an empty prompt without a chat template becomes the tokenizer's BOS token, and a
tokenizer with neither refuses it.  Every error is one line naming the sample or the model.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from selproj_plugin.models import model_name
from selproj_plugin.samples import Sample

IGNORE = -100


class SampleError(ValueError):
    """A sample whose loss or gradient cannot be used; the message names the sample id."""


class ModelError(ValueError):
    """A model that cannot give gradients; the message names the model."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of one sample and its labels (-100 on masked positions)."""

    sample_id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool

    @property
    def n_targets(self) -> int:
        """Positions whose token is predicted (a label at position 0 has no predictor)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


@dataclass
class Batch:
    """Right-padded tensors for a group of encoded samples."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, -100 on prompt and padding
    lengths: list[int]
    sample_ids: list[str]

    @property
    def target_mask(self) -> torch.Tensor:
        """[B, T] bool: position t is trained, i.e. predicts a label at t + 1."""
        mask = torch.zeros_like(self.labels, dtype=torch.bool)
        mask[:, :-1] = self.labels[:, 1:] != IGNORE
        return mask

    @property
    def targets(self) -> torch.Tensor:
        """Labels of the trained positions, in row-major order ([N])."""
        return self.labels[:, 1:][self.labels[:, 1:] != IGNORE]


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ModelError(f"tokenizer {type(tokenizer).__name__} has no EOS token; the loss needs one")
    return int(eos)


def _bos_id(tokenizer: Any, sample: Sample) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise SampleError(
            f"sample {sample.id}: empty prompt, and the tokenizer has neither a BOS token nor a "
            "chat template to predict the first response token from"
        )
    return int(bos)


def encode_sample(tokenizer: Any, sample: Sample, max_length: int) -> Encoded:
    """Tokenise one sample: prompt (masked) + response + EOS, right-truncated to ``max_length``."""
    if not sample.response or not sample.response.strip():
        raise SampleError(f"sample {sample.id}: prompt with no response (empty response text)")
    eos = _eos_id(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        prefix = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], add_generation_prompt=True, tokenize=False)
        prompt_ids = _ids(tokenizer, prefix, special=False)
    else:
        prompt_ids = _ids(tokenizer, sample.prompt, special=True)
    if not prompt_ids:
        prompt_ids = [_bos_id(tokenizer, sample)]
    response_ids = _ids(tokenizer, sample.response, special=False) + [eos]
    ids = prompt_ids + response_ids
    labels = [IGNORE] * len(prompt_ids) + response_ids
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    encoded = Encoded(sample.id, tuple(ids), tuple(labels), truncated)
    if encoded.n_targets == 0:
        raise SampleError(f"sample {sample.id}: empty response after masking ({len(prompt_ids)} prompt tokens, max_length {max_length})")
    return encoded


def encode_samples(tokenizer: Any, samples: Sequence[Sample], max_length: int) -> tuple[list[Encoded], int]:
    """Encode every sample; returns the encodings and how many were truncated (warned once)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    encoded = [encode_sample(tokenizer, s, max_length) for s in samples]
    truncated = [e.sample_id for e in encoded if e.truncated]
    if truncated:
        warnings.warn(
            f"{len(truncated)} sample(s) longer than max_length={max_length} were truncated (first: {truncated[0]})",
            stacklevel=2,
        )
    return encoded, len(truncated)


def collate(encoded: Sequence[Encoded], pad_id: int, device: str | torch.device = "cpu") -> Batch:
    """Right-pad encoded samples into one batch (padding is masked and never trained)."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return Batch(ids.to(device), mask.to(device), labels.to(device), [len(e.input_ids) for e in encoded], [e.sample_id for e in encoded])


def pad_token_id(tokenizer: Any) -> int:
    """Token used for padding: the tokenizer's pad token, else EOS (padding is masked anyway)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else _eos_id(tokenizer)


@contextlib.contextmanager
def logits_at(model: torch.nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Make the LM head see only the hidden states at ``mask`` positions ([B, T] bool).

    Prompt positions need no logits, and the vocabulary projection is the widest matmul
    of a small model, so skipping them saves a large part of forward and backward.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"model {model_name(model)} has no output embeddings (LM head)")

    def gather(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.dim() == 3 and hidden.shape[:2] == mask.shape:
            return (hidden[mask],) + tuple(args[1:])
        return args

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def forward_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Per-sample mean cross-entropy [B] over trained positions (raises on NaN/inf, naming the sample)."""
    mask = batch.target_mask
    with logits_at(model, mask):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    targets = batch.targets
    if logits.shape[0] != targets.shape[0] or logits.dim() != 2:
        raise ModelError(f"model {model_name(model)}: LM head output has unexpected shape {tuple(logits.shape)}")
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    counts = mask.sum(dim=1)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    losses = torch.zeros(len(counts), dtype=token_loss.dtype, device=token_loss.device)
    losses = losses.index_add(0, owner, token_loss) / counts.to(token_loss.dtype)
    bad = ~torch.isfinite(losses.detach())
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise SampleError(f"sample {batch.sample_ids[row]}: loss is {losses[row].item()} (NaN or inf)")
    return losses


def require_trainable(model: torch.nn.Module) -> None:
    """Raise :class:`ModelError` naming the model when no parameter requires grad."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"model {model_name(model)} has no trainable parameters")
