"""Write tests/data/reference/{paraphrased,model_generated}.npz: synthetic tables with the schema of the
paper's reference tables (../shared/reference/paper-olmo1b-lima, which stay outside the repository).

Nothing here is read from the paper's files. The components and their sizes are OLMo-1B's geometry
(16 layers, hidden 2048, MLP 8192, vocabulary 50304, tied embedding); the gradients are small random
integer vectors, so every dot product is an exact integer (the files compress well and the cosines are
true cosines). In ``paraphrased`` each original is a noisy copy of its query on every component, layer 9's
down projection the cleanest; in ``model_generated`` the original keeps little of its query except on layer
1's o projection, so the full gradient does worse than that one component (as in the paper's setting).

    python tests/data/make_reference.py   # rewrites both files; tests/test_table.py checks they match
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "reference"
QUERIES, CANDIDATES, DIM = 48, 5, 8  # DIM: entries of each synthetic per-component gradient
LAYERS, HIDDEN, MLP, VOCAB = 16, 2048, 8192, 50304
RP_DIMS = (11_767_808, 58_838_016)  # the paper's 1% and 5% projections (its README states both)
# per setting: how much of the query each original keeps (x/8), the noise added, and the cleanest component
# (which keeps all of it, with little noise)
SETTINGS = {
    "paraphrased": (6, 4, "model.layers.9.mlp.down_proj.weight"),
    "model_generated": (1, 8, "model.layers.1.self_attn.o_proj.weight"),
}


def geometry() -> tuple[np.ndarray, np.ndarray]:
    names, sizes = ["model.embed_tokens.weight"], [VOCAB * HIDDEN]
    for layer in range(LAYERS):
        for proj in ("q", "k", "v", "o"):
            names.append(f"model.layers.{layer}.self_attn.{proj}_proj.weight")
            sizes.append(HIDDEN * HIDDEN)
        for proj in ("gate", "up", "down"):
            names.append(f"model.layers.{layer}.mlp.{proj}_proj.weight")
            sizes.append(HIDDEN * MLP)
    return np.array(names), np.array(sizes, dtype=np.int64)


def table(setting: str, seed: int) -> dict[str, np.ndarray]:
    keep, noise, cleanest = SETTINGS[setting]
    rng = np.random.default_rng(seed)
    components, num_params = geometry()
    c = len(components)
    query = rng.integers(-8, 9, size=(QUERIES, c, DIM))
    candidates = rng.integers(-8, 9, size=(QUERIES, CANDIDATES, c, DIM))
    # BM25 ranks the original first for most queries, as in the paper's candidate lists
    slot = np.where(rng.random(QUERIES) < 0.8, 0, rng.integers(0, CANDIDATES, size=QUERIES))
    kept, amount = np.full(c, keep), np.full(c, noise)
    kept[list(components).index(cleanest)], amount[list(components).index(cleanest)] = 8, 1
    for q in range(QUERIES):
        jitter = rng.integers(-1, 2, size=(c, DIM)) * amount[:, None]
        candidates[q, slot[q]] = (kept[:, None] * query[q]) // 8 + jitter
    is_original = np.zeros((QUERIES, CANDIDATES), dtype=bool)
    is_original[np.arange(QUERIES), slot] = True
    cross = np.einsum("qcd,qkcd->qkc", query, candidates).astype(np.float64)
    query_self = np.einsum("qcd,qcd->qc", query, query).astype(np.float64)
    candidate_self = np.einsum("qkcd,qkcd->qkc", candidates, candidates).astype(np.float64)
    full = cross.sum(-1) / np.sqrt(query_self.sum(-1)[:, None] * candidate_self.sum(-1))
    # a projection's cosines: the full gradient's, off by a little (less at the larger dimension)
    rp_similarity = np.stack([np.round(full + rng.normal(0, s, full.shape), 3) for s in (0.02, 0.01)])
    return {
        "components": components,
        "num_params": num_params,
        "query_ids": np.array([f"syn_{i}" for i in range(QUERIES)]),
        "candidate_ids": np.array(
            [[f"syn_{i}" if k == slot[i] else f"syn_{i}_other{k}" for k in range(CANDIDATES)] for i in range(QUERIES)]
        ),
        "is_original": is_original,
        "cross": cross,
        "query_self": query_self,
        "candidate_self": candidate_self,
        "rp_dims": np.array(RP_DIMS, dtype=np.int64),
        "rp_similarity": rp_similarity,
    }


def tables() -> dict[str, dict[str, np.ndarray]]:
    return {setting: table(setting, seed) for seed, setting in enumerate(SETTINGS)}


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for setting, arrays in tables().items():
        path = OUT / f"{setting}.npz"
        path.write_bytes(npz_bytes(arrays))
        print(f"{path}: {path.stat().st_size:,} bytes")
