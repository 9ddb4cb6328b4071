"""Model-generated responses for the ``generated`` setting: greedy decoding, cached per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from benchmark.cache import StageCache
from selproj_plugin import distributed
from selproj_plugin.progress import bar as progress_bar


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a user turn ready for the assistant's answer (chat template when there is one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def _generate_batch(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    rows = [_prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # left padding
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def generate_responses(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    *,
    cache_path: Path,
    cache: StageCache,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, str]:
    """Greedy answers ``{id: text}`` to ``(id, prompt)`` items; finished batches survive interruption.

    Under torch.distributed the batches are dealt out to the ranks; each rank keeps its own
    cache file, and rank 0 writes the merged one.
    """
    rank, world = distributed.rank_world()
    found: dict[str, str] = {}
    for path in [cache_path, *sorted(cache_path.parent.glob(f"{cache_path.name}.rank*"))]:
        found.update(cache.load_json(path) or {})
    done: dict[str, str] = {}
    for part in distributed.gather(found):  # every rank plans from the same answers, read before any rank writes
        done.update(part)
    todo = [(i, p) for i, p in items if i not in done]
    # shortest first keeps padding low; finished batches are cut from the front of this fixed
    # order, so a resumed run forms exactly the batches an uninterrupted one would have
    todo.sort(key=lambda item: len(item[1]))
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)][rank::world]
    mine_path = cache_path if world == 1 else cache_path.with_name(f"{cache_path.name}.rank{rank}of{world}")
    mine: dict[str, str] = dict(done) if world == 1 else {}
    bar = progress_bar(sum(map(len, batches)), "generate", progress)
    for batch in batches:
        for (sample_id, _), text in zip(batch, _generate_batch(model, tokenizer, [p for _, p in batch], max_new_tokens)):
            mine[sample_id] = text
        cache.save_json(mine_path, mine)
        bar.update(len(batch))
    bar.close()
    for part in distributed.gather(mine):
        done.update(part)
    if world > 1 and distributed.is_main():
        cache.save_json(cache_path, done)
    return {i: done[i] for i, _ in items}
