"""On-disk cache of expensive stages, keyed by model (weights included), dataset and options.

Every file is written atomically (temp file + rename, the rename last), so an interrupted
run leaves either the finished file or nothing, and a rerun reuses what was finished.  A
file that does not read back (damaged on disk, or not ours) is reported in one line and
recomputed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
import sys
from typing import Any, Callable, TypeVar

from benchmark.report import write_atomic
from selproj_plugin.errors import one_line
from selproj_plugin.models import cache_dir

T = TypeVar("T")


def digest(value: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-serialisable value."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def tokenizer_digest(tokenizer: Any) -> str:
    """Hash of what tokenises a sample: a fast tokenizer's whole definition (vocabulary, merges,
    normalisation, added and special tokens, post-processing), else its vocabulary, with its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return digest({"class": type(tokenizer).__name__, "definition": definition, "special": getattr(tokenizer, "special_tokens_map", {})})


def package_version() -> str:
    """This package's installed version: a table built by another release may differ."""
    try:
        return importlib.metadata.version("selproj-plugin")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing it
        from selproj_plugin import __version__

        return __version__


class StageCache:
    """Files of one run's stages under ``root/benchmark/<stage>-<key>.<suffix>``.

    A cache that cannot be written (read-only, full, not a directory) costs only the reuse: the
    first failed write is reported in one line, later ones are not tried, and the run goes on.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = cache_dir(root or None) / "benchmark"  # under the model cache's root
        self.unwritable: str | None = None  # the first failed write's path and error

    def path(self, stage: str, key: Any, suffix: str) -> Path:
        return self.root / f"{stage}-{digest(key)}.{suffix}"

    def load(self, path: Path, read: Callable[[Path], T]) -> T | None:
        """``read(path)``, or None when the file is absent or unreadable (reported, deleted, then recomputed)."""
        if not path.is_file():
            return None
        try:
            return read(path)
        except (OSError, ValueError) as exc:
            print(f"[selproj] cached {path.name} is unreadable ({one_line(exc)}): recomputing it", file=sys.stderr)
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only cache: the recomputed result's write reports it
                pass
            return None

    def load_json(self, path: Path) -> Any | None:
        """The cached document, or None when absent or unreadable (then it is recomputed)."""
        return self.load(path, lambda p: json.loads(p.read_text(encoding="utf-8")))

    def save(self, path: Path, write: Callable[[Path], Any]) -> bool:
        """``write(path)``; False, the result kept by the caller, when the cache cannot be written."""
        if self.unwritable is not None:
            return False
        try:
            write(path)
        except OSError as exc:
            self.unwritable = f"{path}: {one_line(exc)}"
            print(f"[selproj] cannot write the cache {self.unwritable}; the run goes on without caching", file=sys.stderr)
            return False
        return True

    def save_json(self, path: Path, value: Any) -> bool:
        return self.save(path, lambda p: write_atomic(p, json.dumps(value, sort_keys=True)))
