"""A torch.distributed worker kept apart from tests.tiny: importing transformers' model classes
(as tiny does) imports the torch modules that bind the default group, and would hide the bug."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def leave_after_building_a_model(rank: int, world: int, port: int, out: str) -> None:
    """Join as torchrun's workers do, build a model inside the session, leave, then list this process's threads."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from selproj_plugin import distributed

    distributed.init_from_env("cpu")
    with distributed.session():
        from tests import tiny  # transformers imports torch.distributed.nn here, after the group exists

        tiny.model("llama")
        distributed.gather(rank)
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread may end while we list them
            names.append((task / "comm").read_text().strip())
    Path(out, f"rank{rank}.txt").write_text("\n".join(names))
