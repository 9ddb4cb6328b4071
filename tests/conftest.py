"""Shared fixtures: the paper's reference tables (read-only, from ../shared) and synthetic tables."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "paper-olmo1b-lima"


def reference_path(setting: str) -> Path:
    path = REFERENCE / f"{setting}.npz"
    if not path.is_file():
        pytest.skip(f"reference file {path} not present (CI lays ../shared beside the clone)")
    return path


@pytest.fixture(scope="session")
def paraphrased():
    from selproj_plugin.table import ComponentTable

    return ComponentTable.load(reference_path("paraphrased"))


@pytest.fixture(scope="session")
def model_generated():
    from selproj_plugin.table import ComponentTable

    return ComponentTable.load(reference_path("model_generated"))


def make_arrays(q: int = 6, k: int = 3, c: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays of a small valid table: positive self products, original in column 0."""
    rng = np.random.default_rng(seed)
    is_original = np.zeros((q, k), dtype=bool)
    is_original[:, 0] = True
    return {
        "cross": rng.normal(size=(q, k, c)),
        "query_self": rng.uniform(1, 2, size=(q, c)),
        "candidate_self": rng.uniform(1, 2, size=(q, k, c)),
        "is_original": is_original,
        "components": np.array([f"model.layers.{i}.mlp.down_proj.weight" for i in range(c)]),
        "num_params": np.full(c, 10, dtype=np.int64),
    }
