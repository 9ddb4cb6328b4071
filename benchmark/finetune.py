"""Fine-tune stage: train the model on the dataset's originals with the engine's own loss, cached and resumable.

The loss is :func:`selproj_plugin.loss.forward_losses` (chat template, prompt masked, mean cross-entropy
over response tokens plus EOS, per sample), averaged over a batch.  Every weight matrix the catalogue
lists is trained (full fine-tuning: the gradients the benchmark compares are those of the trained
weights), with AdamW at a constant learning rate in a seeded sample order, so a run is deterministic
on the CPU at a given thread count.

Files under the cache dir (``<root>/benchmark/finetune-<key>.*``), each written atomically:
``step<S>.pt`` the weights at each checkpoint (the base model is checkpoint 0 and is not stored),
``resume.pt`` the training state at the last save point (weights, AdamW state, step, losses),
``json`` the lineage, written last: a run counts as finished only with it.  The key holds the base
weights' fingerprint, the data digest and every setting.  One process trains at a time (a file lock;
under torchrun rank 0, the others then read its files); a killed run resumes from ``resume.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmark import settings_cli
from benchmark.cache import StageCache, digest, package_version
from selproj_plugin.atomic import atomic_write
from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.progress import bar as progress_bar
from selproj_plugin.samples import Sample

FORMAT = 1  # of the files this stage writes: part of the key


class FinetuneError(ValueError):
    """A fine-tune that cannot go on (diverged, bad settings); the message is one line."""


@dataclass(frozen=True)
class FinetuneSettings:
    """Every setting of the fine-tune; each is one ``--finetune-*`` option (``checkpoints`` is ``--checkpoints``)."""

    epochs: int = field(default=1, metadata={"help": "epochs over the dataset's originals (0 = the model as loaded)"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate, constant"})
    batch_size: int = field(default=8, metadata={"help": "samples per optimiser step"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "seed of the sample order"})
    max_length: int = field(default=EngineConfig.max_length, metadata={"help": "truncate longer samples"})
    batch_tokens: int = field(
        default=256,
        metadata={
            "help": "padded tokens per forward/backward: a step's samples go through in pieces this size (at least "
            "one sample), their gradients summed, which bounds activation memory as the engine's batches do"
        },
    )
    checkpoints: int = field(
        default=1,
        metadata={
            "help": "models to measure along training, evenly spaced: the base model first, the trained one last "
            "(1: the trained one only; 2 or more add a transfer matrix, Jaccard overlaps and TracIn rows)",
            "flag": "--checkpoints",
        },
    )
    save_every: int = field(default=8, metadata={"help": "steps between resume points (a killed run resumes from the last)", "key": False})

    def validate(self) -> "FinetuneSettings":
        if self.epochs < 0:
            raise FinetuneError(f"--finetune-epochs must be at least 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneError(f"--finetune-lr must be a positive number, got {self.lr}")
        if self.batch_size < 1 or self.save_every < 1 or self.max_length < 2 or self.batch_tokens < 1:
            raise FinetuneError(
                "--finetune-batch-size, --finetune-batch-tokens and --finetune-save-every must be "
                "at least 1, --finetune-max-length at least 2"
            )
        if self.checkpoints < 1:
            raise FinetuneError(f"--checkpoints must be at least 1, got {self.checkpoints}")
        if self.checkpoints > 1 and self.epochs == 0:
            raise FinetuneError(f"--checkpoints {self.checkpoints} needs a fine-tune: set --finetune-epochs")
        return self

    def key(self) -> dict[str, Any]:
        """The settings that change the trained weights (all but where resume points fall)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("key", True)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`FinetuneSettings` field (``--finetune-<name>``), its type, default and help from the
    field; left out, an option parses to None (the epochs' default depends on --model)."""
    group = parser.add_argument_group("fine-tune (the embedded model trains on its candidates first)")
    settings_cli.add_arguments(
        group, FinetuneSettings, prefix="finetune_", unset_default=True, notes={"epochs": "a model given with --model: 0"}
    )


def settings_from_args(args: argparse.Namespace, epochs_default: int | None = None) -> FinetuneSettings:
    """The settings the options give; unset ones keep the dataclass default (``epochs``: ``epochs_default``)."""
    given = settings_cli.values(args, FinetuneSettings, prefix="finetune_")
    if "epochs" not in given and epochs_default is not None:
        given["epochs"] = epochs_default
    return dataclasses.replace(FinetuneSettings(), **given).validate()


@dataclass
class Checkpoint:
    """One model along training: its step, the learning rate at it (TracIn's weight) and its weights' file."""

    index: int
    step: int
    lr: float
    path: str | None  # None: the base model as loaded


@dataclass
class FinetuneResult:
    """The lineage (JSON-serialisable) and the checkpoints to measure."""

    record: dict[str, Any]
    checkpoints: list[Checkpoint]
    reused: bool = False


def checkpoint_steps(total_steps: int, checkpoints: int) -> list[int]:
    """Steps of ``checkpoints`` models evenly spread over training: 0 (the base) first, the last step last.

    One checkpoint is the trained model alone.
    """
    if checkpoints == 1:
        return [total_steps]
    steps = [round(i * total_steps / (checkpoints - 1)) for i in range(checkpoints)]
    if len(set(steps)) != len(steps):
        raise FinetuneError(
            f"--checkpoints {checkpoints} needs at least {checkpoints - 1} optimiser steps; "
            f"the fine-tune has {total_steps}: raise --finetune-epochs or lower --checkpoints"
        )
    return steps


def _order(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Every step's sample indices: a seeded permutation per epoch, cut into batches."""
    out = []
    for epoch in range(epochs):
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out += [perm[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    return out


def _pieces(members: Sequence[Any], batch_tokens: int) -> list[list[Any]]:
    """Consecutive runs of encoded samples whose padded size (count x longest) stays within ``batch_tokens``."""
    out: list[list[Any]] = []
    for e in members:
        if out and (len(out[-1]) + 1) * max(len(x.input_ids) for x in [*out[-1], e]) <= batch_tokens:
            out[-1].append(e)
        else:
            out.append([e])
    return out


def trainable(model: Any, scope: str = "paper") -> list[Any]:
    """The parameters the catalogue lists (every weight matrix of the paper's set): the ones trained."""
    from selproj_plugin.components import catalogue

    params = dict(model.named_parameters())
    names = [p for c in catalogue(model, scope) for p in c.param_names]
    return [params[n] for n in dict.fromkeys(names)]


def mean_loss(model: Any, tokenizer: Any, samples: Sequence[Sample], max_length: int, batch_size: int, progress: Any = None) -> float:
    """Mean over samples of the per-sample loss (no gradients)."""
    import torch

    from selproj_plugin.loss import collate, encode_samples, forward_losses, pad_token_id

    encoded, _ = encode_samples(tokenizer, samples, max_length)
    encoded.sort(key=lambda e: len(e.input_ids))  # batches of like lengths pad little; a mean needs no order
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            losses = forward_losses(model, collate(encoded[start : start + batch_size], pad, device))
            total += float(losses.double().sum())
            if progress is not None:
                progress(len(losses))
    return total / len(encoded)


def _save_torch(path: Path, obj: Any) -> None:
    import torch

    def write(fh: Any) -> None:
        try:
            torch.save(obj, fh)
        except RuntimeError as exc:  # interrupted mid-record, torch's zip writer fails on closing: the stop stands
            if isinstance(exc.__context__, KeyboardInterrupt):
                raise exc.__context__ from None
            raise

    atomic_write(path, write)


def _weights(model: Any) -> dict[str, Any]:
    """The weights to save: views, not copies (saved before the next step changes them; a copy is 0.5 GB more)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def stage_key(settings: FinetuneSettings, base: dict[str, Any], scope: str, originals: Sequence[Sample]) -> dict:
    """What the trained weights depend on: the base model and data (``base``), every setting, the samples."""
    return {
        **base,
        "settings": settings.key(),
        "scope": scope,
        "format": FORMAT,
        "package": package_version(),
        "samples": [s.id for s in originals],
    }


def finetune(
    model: Any,
    tokenizer: Any,
    originals: Sequence[Sample],
    paraphrases: Sequence[Sample],
    settings: FinetuneSettings,
    *,
    cache: StageCache,
    base: dict[str, Any],
    scope: str = "paper",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Train ``model`` in place on ``originals`` (or reuse a finished run's weights) and return the lineage.

    ``base`` identifies the base model and data (weights fingerprint, data digest, tokenizer) for the key.
    The model ends in eval mode holding the last checkpoint's weights.  ``on_step(step, loss)`` is called
    after each optimiser step (tests interrupt a run with it).  A NaN or infinite loss raises
    :class:`FinetuneError` before the step is taken, so no diverged weights are saved.
    """
    import torch
    from filelock import FileLock

    from selproj_plugin import distributed
    from selproj_plugin import loss as loss_module
    from selproj_plugin.loss import SampleError, collate, encode_samples, pad_token_id

    settings = settings.validate()
    if settings.epochs == 0:
        raise FinetuneError("finetune() called with 0 epochs; the model as loaded needs no fine-tune")
    key = stage_key(settings, base, scope, originals)
    record_path = cache.path("finetune", key, "json")
    resume_path = cache.path("finetune", key, "resume.pt")
    total = settings.epochs * math.ceil(len(originals) / settings.batch_size)
    steps = checkpoint_steps(total, settings.checkpoints)

    def ckpt_path(step: int) -> Path:
        return cache.path("finetune", key, f"step{step}.pt")

    def finished() -> dict[str, Any] | None:
        record = cache.load_json(record_path)
        if record and all(ckpt_path(s).is_file() for s in steps if s > 0):
            return record
        return None

    def result(record: dict[str, Any], reused: bool) -> FinetuneResult:
        cps = [Checkpoint(i, s, settings.lr, None if s == 0 else str(ckpt_path(s))) for i, s in enumerate(steps)]
        load_weights(model, cps[-1])
        return FinetuneResult(record, cps, reused)

    def train() -> FinetuneResult:
        record = finished()
        if record is not None:
            return result(record, True)
        cache.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache.root / f".{record_path.stem}.lock")):  # another process may be training it
            record = finished()
            if record is not None:
                return result(record, True)
            return _train()

    def _train() -> FinetuneResult:
        started = time.perf_counter()
        try:
            encoded, truncated = encode_samples(tokenizer, originals, settings.max_length)
        except SampleError as exc:
            raise FinetuneError(f"cannot fine-tune: {exc}") from None
        pad = pad_token_id(tokenizer)
        device = next(model.parameters()).device
        params = trainable(model, scope)
        wanted = {id(p) for p in params}
        frozen = [p for p in model.parameters() if id(p) not in wanted and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, foreach=False)
        state = cache.load(resume_path, lambda p: torch.load(p, map_location=device, weights_only=False))
        if state is not None and state.get("key") != digest(key):
            state = None
        eval_batch = max(settings.batch_size, 8)
        if state is None:
            # the base model's losses depend on neither the learning rate nor the epochs: kept apart, any
            # fine-tune of the same base and data (and a run killed before its first resume point) reuses them
            before_path = cache.path(
                "losses-before",
                {**base, "scope": scope, "max_length": settings.max_length, "samples": [s.id for s in [*originals, *paraphrases]]},
                "json",
            )
            before = cache.load_json(before_path)
            if before is None:
                bar = progress_bar(2 * len(originals), "fine-tune: loss before", progress)
                before = {
                    "originals": mean_loss(model, tokenizer, originals, settings.max_length, eval_batch, bar.update),
                    "paraphrases": mean_loss(model, tokenizer, paraphrases, settings.max_length, eval_batch, bar.update),
                }
                bar.close()
                cache.save_json(before_path, before)
            step, losses = 0, []
        else:
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
            step, losses, before = state["step"], state["losses"], state["before"]
            print(f"[selproj] fine-tune resumes at step {step} of {total} from {resume_path.name}", file=sys.stderr)
        order = _order(len(encoded), settings.batch_size, settings.epochs, settings.seed)
        model.train()
        bar = progress_bar(total, "fine-tune", progress, initial=step, unit="step")
        try:
            while step < total:
                members = [encoded[i] for i in order[step]]
                optimiser.zero_grad(set_to_none=True)
                loss = 0.0
                for piece in _pieces(members, settings.batch_tokens):  # the batch's mean loss, piece by piece
                    try:
                        part = loss_module.forward_losses(model, collate(piece, pad, device)).sum() / len(members)
                        if not bool(torch.isfinite(part.detach())):
                            raise SampleError(f"batch loss is {float(part.detach())}")
                    except SampleError as exc:  # a NaN or inf loss: the weights have diverged; none are saved
                        raise FinetuneError(
                            f"fine-tune diverged at step {step + 1} of {total} (lr {settings.lr:g}): {exc}; lower --finetune-lr"
                        ) from None
                    part.backward()
                    loss += float(part.detach())
                    del part
                optimiser.step()
                step += 1
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(batch_loss=f"{losses[-1]:.3f}")  # one batch's: it goes up and down
                if step in steps:
                    _save_torch(ckpt_path(step), _weights(model))
                if step % settings.save_every == 0 or step in steps or step == total:
                    _save_torch(
                        resume_path,
                        {
                            "key": digest(key),
                            "model": _weights(model),
                            "optimiser": optimiser.state_dict(),
                            "step": step,
                            "losses": losses,
                            "before": before,
                        },
                    )
                if on_step is not None:
                    on_step(step, losses[-1])
        finally:
            bar.close()
            model.eval()
            for p in frozen:
                p.requires_grad_(True)
        del optimiser
        for p in params:  # the gradients alone are as large as the model
            p.grad = None
        bar = progress_bar(2 * len(originals), "fine-tune: loss after", progress)
        after = {
            "originals": mean_loss(model, tokenizer, originals, settings.max_length, eval_batch, bar.update),
            "paraphrases": mean_loss(model, tokenizer, paraphrases, settings.max_length, eval_batch, bar.update),
        }
        bar.close()
        record = {
            "base_weights": base.get("weights"),
            "weights": _fingerprint(model),
            "data_digest": base.get("dataset_digest"),
            **settings.key(),
            "steps": total,
            "samples": len(originals),
            "truncated": truncated,
            "trained_params": int(sum(p.numel() for p in params)),
            "checkpoint_steps": steps,
            "loss_before": before,
            "loss_after": after,
            "loss_drop": {k: before[k] - after[k] for k in before},
            "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
            "seconds": round(time.perf_counter() - started, 1),
        }
        cache.save_json(record_path, record)
        resume_path.unlink(missing_ok=True)  # finished: the record and the checkpoints are what is reused
        return result(record, False)

    return distributed.main_first(train)


def _fingerprint(model: Any) -> str:
    from selproj_plugin.models import weights_fingerprint

    return weights_fingerprint(model)


def load_weights(model: Any, checkpoint: Checkpoint, base: dict[str, Any] | None = None) -> None:
    """Put a checkpoint's weights into ``model`` (``base``: the base weights, for checkpoint 0)."""
    import torch

    if checkpoint.path is None:
        if base is not None:
            model.load_state_dict(base)
        return
    model.load_state_dict(torch.load(checkpoint.path, map_location=next(model.parameters()).device, weights_only=True))
    model.eval()
