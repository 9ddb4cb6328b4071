"""On-disk cache of expensive stages, keyed by model, dataset and options.

Every file is written atomically (temp file + rename), so an interrupted run leaves
either the finished file or nothing, and a rerun reuses what was finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from benchmark.report import write_atomic


def digest(value: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-serialisable value."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def default_root() -> Path:
    """``$SELPROJ_CACHE`` or ``~/.cache/selproj``: the same root the model cache uses."""
    env = os.environ.get("SELPROJ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selproj"


class StageCache:
    """Files of one run's stages under ``root/benchmark/<stage>-<key>.<suffix>``."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = (Path(root).expanduser() if root else default_root()) / "benchmark"

    def path(self, stage: str, key: Any, suffix: str) -> Path:
        return self.root / f"{stage}-{digest(key)}.{suffix}"

    def load_json(self, path: Path) -> Any | None:
        """The cached document, or None when absent or unreadable (then it is recomputed)."""
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def save_json(self, path: Path, value: Any) -> Path:
        return write_atomic(path, json.dumps(value, sort_keys=True))
