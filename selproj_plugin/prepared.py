"""The model made ready for the engine (components selected, capture hooks built) and its samples captured:
one forward/backward per batch, each sample's factors handed over as they come."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from selproj_plugin import progress
from selproj_plugin.batching import batches
from selproj_plugin.budget import sized
from selproj_plugin.capture import ComponentSpec, GradientCapture, SampleFactors
from selproj_plugin.components import catalogue, check_scope, select
from selproj_plugin.engine_config import EngineConfig
from selproj_plugin.gram import choose_modes
from selproj_plugin.loss import Batch, Encoded, ModelError, collate, encode_samples, pad_token_id, require_trainable
from selproj_plugin.models import model_name
from selproj_plugin.planner import FactorTensor, FactorWidths, factor_tensors, factor_widths
from selproj_plugin.samples import Sample


@dataclass
class Prepared:
    """Model-side state shared by the public functions: selected components and capture hooks."""

    capture: GradientCapture
    specs: list[ComponentSpec]
    pad_id: int
    _tensors: list[FactorTensor] | None = None

    @property
    def tensors(self) -> list[FactorTensor]:
        """What the capture stores per sample (one no-gradient forward, the first time it is asked)."""
        if self._tensors is None:
            self._tensors = factor_tensors(self.capture)
        return self._tensors

    def widths(self, materialise: Sequence[str] = ()) -> FactorWidths:
        """The components' factor bytes per token, with ``materialise``'s held whole."""
        return factor_widths(self.capture, self.specs, materialise, self.tensors)

    def modes(self, config: EngineConfig, lengths: Sequence[int], n_pairs: int) -> set[str]:
        """The components whose gradients are materialised rather than kept as factors (``config.mode``)."""
        if config.mode == "factored":
            return set()
        if config.mode == "materialised":
            return {s.name for s in self.specs if s.kind == "factor"}
        if config.mode != "auto":
            raise ValueError(f"unknown engine mode {config.mode!r}: use auto, factored or materialised")
        return choose_modes(self.specs, lengths, n_pairs, self.tensors)


def prepare(model: torch.nn.Module, tokenizer: Any, components: Sequence[str] | None, scope: str = "paper") -> Prepared:
    """Catalogue (component set ``scope``) and select components, check the model can give gradients, build the capture."""
    require_trainable(model)
    try:
        comps = catalogue(model, check_scope(scope))
    except ValueError as exc:
        raise ModelError(f"model {model_name(model)}: {exc}") from None
    if components is not None:
        comps = select(comps, components)
    capture = GradientCapture(model, comps)
    return Prepared(capture, [capture.specs[c.name] for c in comps], pad_token_id(tokenizer))


def capture_batches(prep: Prepared, tokenizer: Any, samples: Sequence[Sample], config: EngineConfig) -> list[Batch]:
    """``samples`` collated in the batches the engine captures them in (benchmarks time a plain pass on the same)."""
    config = sized(prep, config)[0]
    encoded, _ = encode_samples(tokenizer, samples, config.max_length)
    return [collate([encoded[i] for i in idx], prep.pad_id, config.device) for idx in batches(encoded, range(len(encoded)), config)]


def iter_factors(
    prep: Prepared,
    encoded: Sequence[Encoded],
    indices: Sequence[int],
    config: EngineConfig,
    materialise: set[str] = frozenset(),
    label: str = "capture",
) -> Iterator[tuple[int, SampleFactors]]:
    """Factors of ``encoded[i]`` for each i in ``indices`` (each in memory of its own, safe to keep): one
    forward/backward per length-sorted batch."""
    config = sized(prep, config)[0]
    for i, f in capture(prep, encoded, list(batches(encoded, indices, config)), config, materialise, label):
        own = f.compact()
        del f
        yield i, own
        del own


def capture(
    prep: Prepared,
    encoded: Sequence[Encoded],
    taken: Sequence[Sequence[int]],
    config: EngineConfig,
    materialise: set[str] = frozenset(),
    label: str = "capture",
) -> Iterator[tuple[int, SampleFactors]]:
    """Factors of each sample of the batches ``taken``, one forward/backward per batch, with progress on stderr.

    Each is a view of its batch's tensors: drop it (or keep its :meth:`~SampleFactors.compact` copy) before asking
    for the next, or the whole batch stays alive through the next capture."""
    shown = progress.bar(sum(map(len, taken)), label, config.progress)
    dense = sorted(materialise)
    try:
        for idx in taken:
            batch = collate([encoded[i] for i in idx], prep.pad_id, config.device)
            factors, _ = prep.capture.run(batch)
            del batch
            factors.reverse()
            for i in idx:  # hand each sample's factors over and forget them: the batch's list holds none after use
                yield i, prep.capture.materialise(factors.pop(), dense)
            shown.update(len(idx))
    finally:
        shown.close()
