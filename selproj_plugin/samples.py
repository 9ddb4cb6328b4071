"""Sample: one prompt/response pair whose loss gradient is attributed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Sample:
    """A single-turn training or query sample; ``id`` names it in errors and reports."""

    id: str
    prompt: str
    response: str


def dedupe(samples: Sequence[Sample]) -> tuple[list[Sample], dict[str, int]]:
    """The distinct samples in first-seen order and each id's position among them; one id for two different
    samples is a one-line error."""
    unique: list[Sample] = []
    pos: dict[str, int] = {}
    for s in samples:
        if s.id in pos:
            if unique[pos[s.id]] != s:
                raise ValueError(f"sample id {s.id} is used for two different samples")
            continue
        pos[s.id] = len(unique)
        unique.append(s)
    return unique, pos
