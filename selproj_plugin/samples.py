"""Sample: one prompt/response pair whose loss gradient is attributed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """A single-turn training or query sample; ``id`` names it in errors and reports."""

    id: str
    prompt: str
    response: str
