"""Benchmark records: the embedded paraphrase dataset, local files, and Hugging Face datasets.

Two schemas are accepted and give the same records: the flat one of the embedded file
(``id, prompt, response, paraphrased_prompt, paraphrased_response``) and the paper's chat
schema (``id, messages, paraphrased_messages[, model_generated_messages]``).  Multi-turn
chats are skipped and counted, as the paper kept single-turn samples only.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

from selproj_plugin.samples import Sample

EMBEDDED = "selproj-paraphrase"
FLAT_FIELDS = ("id", "prompt", "response", "paraphrased_prompt", "paraphrased_response")
CHAT_FIELDS = ("id", "messages", "paraphrased_messages")


class DatasetError(ValueError):
    """A dataset that cannot be used, with the file, line or id that is wrong."""


@dataclass(frozen=True)
class Record:
    """One training sample with its independently paraphrased prompt and response."""

    id: str
    prompt: str
    response: str
    paraphrased_prompt: str
    paraphrased_response: str
    model_generated_response: str | None = None

    @property
    def original(self) -> Sample:
        return Sample(self.id, self.prompt, self.response)

    @property
    def paraphrase(self) -> Sample:
        return Sample(f"{self.id}#paraphrased", self.paraphrased_prompt, self.paraphrased_response)


@dataclass
class Dataset:
    """Validated records plus what loading skipped, for the report."""

    name: str
    records: list[Record]
    skipped_multiturn: int = 0
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)


def embedded_path() -> Path:
    """Path of the JSONL file shipped inside the ``benchmark`` package."""
    return Path(str(resources.files("benchmark") / "datasets" / "selproj_paraphrase.jsonl"))


def load_records(dataset: str | None = None, *, split: str = "train", max_samples: int | None = None) -> list[Record]:
    """Records of ``dataset`` (default: the embedded file); see :func:`load_dataset`."""
    return load_dataset(dataset, split=split, max_samples=max_samples).records


def load_dataset(dataset: str | None = None, *, split: str = "train", max_samples: int | None = None) -> Dataset:
    """Load a local file (.jsonl/.json/.csv/.parquet), a hub dataset name, or the embedded default."""
    if dataset is None or dataset == EMBEDDED:
        path, name = embedded_path(), EMBEDDED
    else:
        path, name = Path(dataset), dataset
    if path.suffix.lower() in _READERS or path.exists():
        if not path.is_file():
            raise DatasetError(f"dataset file not found: {path}")
        rows = _READERS.get(path.suffix.lower(), _unsupported)(path)
        where = str(path)
    else:
        rows = _hub_rows(dataset, split)
        where = dataset
    records, skipped = _records(rows, where)
    if max_samples is not None:
        if max_samples < 1:
            raise DatasetError(f"--max-samples must be at least 1, got {max_samples}")
        records = records[:max_samples]
    if not records:
        raise DatasetError(f"dataset {where} has no usable samples ({skipped} multi-turn skipped)")
    return Dataset(name=name, records=records, skipped_multiturn=skipped, source={"location": where, "split": split})


# ---- readers: each yields (location, row) so errors can name the line ----------------
Row = tuple[str, dict[str, Any]]


def _read_jsonl(path: Path) -> Iterator[Row]:
    with _open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
            yield f"{path}:{n}", _as_dict(row, f"{path}:{n}")


def _read_json(path: Path) -> Iterator[Row]:
    with _open(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of samples")
    for n, row in enumerate(data):
        yield f"{path}[{n}]", _as_dict(row, f"{path}[{n}]")


def _read_csv(path: Path) -> Iterator[Row]:
    with _open(path, newline="") as fh:
        for n, row in enumerate(csv.DictReader(fh), 2):
            yield f"{path}:{n}", {k: _maybe_json(v) for k, v in row.items()}


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:
        raise DatasetError(f"cannot read parquet file {path}: {exc}") from None
    for n, row in enumerate(rows):
        yield f"{path}[row {n}]", row


def _unsupported(path: Path) -> Iterator[Row]:
    raise DatasetError(f"unsupported dataset file type {path.suffix!r}: use .jsonl, .json, .csv or .parquet")


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _hub_rows(name: str, split: str) -> Iterator[Row]:
    import logging

    import datasets

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retries (a line each, 5 of them offline) before the one-line error
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(f"cannot load dataset {name!r} (not a local file, and the hub said: {first})") from None
    finally:
        hub_log.setLevel(level)
    for n, row in enumerate(ds):
        yield f"{name}[{n}]", dict(row)


def _open(path: Path, **kwargs: Any):
    try:
        return open(path, encoding="utf-8", **kwargs)
    except OSError as exc:
        raise DatasetError(f"cannot read dataset file {path}: {exc.strerror}") from None


def _as_dict(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object per sample, got {type(row).__name__}")
    return row


def _maybe_json(value: str | None) -> Any:
    """CSV cells holding chat message lists are JSON text; decode those, keep the rest."""
    if value and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# ---- schema -------------------------------------------------------------------------
def _records(rows: Iterable[Row], where: str) -> tuple[list[Record], int]:
    records: list[Record] = []
    seen: dict[str, str] = {}
    skipped = 0
    for loc, row in rows:
        record = _from_chat(row, loc) if "messages" in row else _from_flat(row, loc)
        if record is None:
            skipped += 1
            continue
        if record.id in seen:
            raise DatasetError(f"{loc}: duplicate id {record.id!r} (first at {seen[record.id]})")
        seen[record.id] = loc
        records.append(record)
    return records, skipped


def _text(row: dict[str, Any], key: str, loc: str) -> str:
    if key not in row or row[key] is None:
        raise DatasetError(f"{loc}: missing field {key!r}")
    value = str(row[key])
    if not value.strip():
        raise DatasetError(f"{loc} (id {row.get('id')!r}): field {key!r} is empty")
    return value


def _from_flat(row: dict[str, Any], loc: str) -> Record:
    values = [_text(row, key, loc) for key in FLAT_FIELDS]
    generated = row.get("model_generated_response")
    return Record(*values, model_generated_response=str(generated) if generated else None)


def _turn(messages: Any, key: str, loc: str, sample_id: str) -> tuple[str, str] | None:
    """(user, assistant) of a single-turn chat, None when it has more turns."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DatasetError(f"{loc} (id {sample_id!r}): field {key!r} must be a list of {{role, content}} messages")
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) > 2:
        return None
    roles = [m.get("role") for m in turns]
    if roles != ["user", "assistant"]:
        raise DatasetError(f"{loc} (id {sample_id!r}): field {key!r} must hold a user and an assistant message, got roles {roles}")
    user, assistant = (str(m.get("content") or "") for m in turns)
    for text, role in ((user, "user"), (assistant, "assistant")):
        if not text.strip():
            raise DatasetError(f"{loc} (id {sample_id!r}): {role} message of {key!r} is empty")
    return user, assistant


def _from_chat(row: dict[str, Any], loc: str) -> Record | None:
    sample_id = _text(row, "id", loc)
    for key in CHAT_FIELDS[1:]:
        if key not in row or row[key] is None:
            raise DatasetError(f"{loc} (id {sample_id!r}): missing field {key!r}")
    original = _turn(row["messages"], "messages", loc, sample_id)
    paraphrased = _turn(row["paraphrased_messages"], "paraphrased_messages", loc, sample_id)
    if original is None or paraphrased is None:
        return None
    generated = None
    if row.get("model_generated_messages"):
        turn = _turn(row["model_generated_messages"], "model_generated_messages", loc, sample_id)
        generated = turn[1] if turn else None
    return Record(sample_id, *original, *paraphrased, model_generated_response=generated)
