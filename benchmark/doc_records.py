"""The records behind the documentation's tables: one JSON file per measurement, read into dataclasses.

A record names the table it feeds, the command, the machine, the date and the commit; ``cost`` is what
``/usr/bin/time -v`` said, and ``result`` the JSON the benchmark wrote with ``--json`` (a transcribed record
holds the part of it that was reported). The result dataclasses below declare only the fields the tables
show, under the benchmarks' own key names, so a benchmark's output can be a record's ``result`` as written.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from benchmark.adapters import Cell  # the benchmarks' own rows, read back as they were written
from benchmark.parity import Difference


class RecordError(ValueError):
    """A record or a marker the generator cannot use; the message is one line."""


def typed(cls: type, data: Any, where: str = "") -> Any:
    """``data`` (parsed JSON) as dataclass ``cls``: keys it does not declare are ignored, a missing one is an error."""
    if not isinstance(data, dict):
        raise RecordError(f"{where or cls.__name__}: expected an object, got {data!r:.40}")
    hints, values = get_type_hints(cls), {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = parse(hints[f.name], data[f.name], f"{where}.{f.name}".lstrip("."))
    try:
        return cls(**values)
    except TypeError as exc:
        raise RecordError(f"{where or cls.__name__}: {str(exc).split('() ', 1)[-1]}") from None


def parse(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as type ``tp``: dataclasses, lists, tuples, dicts, unions and plain values."""
    origin, args = get_origin(tp), get_args(tp)
    if value is None or tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return parse(next((a for a in options if _fits(a, value)), options[0]), value, where)
    if is_dataclass(tp):
        return typed(tp, value, where)
    if not _fits(tp, value):
        raise RecordError(f"{where}: expected {getattr(origin or tp, '__name__', tp)}, got {value!r:.40}")
    if origin in (list, tuple):
        return origin(parse(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        return {k: parse(args[1], v, f"{where}.{k}") for k, v in value.items()}
    return float(value) if tp is float else value


def _fits(tp: Any, value: Any) -> bool:
    """Whether a JSON value has the shape of ``tp`` (an int is a float; an object is a dataclass)."""
    base = get_origin(tp) or tp
    if is_dataclass(base):
        return isinstance(value, dict)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is tuple:  # JSON has only arrays
        return isinstance(value, list)
    return base is Any or isinstance(value, base)


# --- records ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """What ``/usr/bin/time -v`` reported for the whole command."""

    wall_seconds: float | None = None
    peak_rss_gib: float | None = None
    peak_rss_kib: int | None = None  # the exact figure, where it was kept


@dataclass(frozen=True)
class Record:
    table: str  # the marker name of the table it feeds
    command: str
    machine: str
    date: str
    commit: str
    result: dict[str, Any] | list[Any] = field(default_factory=dict)  # the benchmark's --json output
    label: str = ""  # the row's name where a table has several records
    note: str = ""
    cost: Cost | None = None
    source: str = ""  # the record's file name, for error messages; not read from the JSON

    def provenance(self) -> str:
        return f"`{self.command}`, {self.machine}, {self.date}, {self.commit}"


def load_records(folder: Path) -> list[Record]:
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path.name}: not JSON ({exc})") from None
        unknown = set(data) - ({f.name for f in fields(Record)} - {"source"}) if isinstance(data, dict) else set()
        if unknown:
            raise RecordError(f"{path.name}: unknown field(s) {', '.join(sorted(unknown))}")
        records.append(replace(typed(Record, data, path.name), source=path.name))
    return records


# --- the parts of the benchmarks' JSON that the tables show ---------------------------------------


@dataclass(frozen=True)
class PairedTest:  # benchmark.retrieval: vs_full
    difference: float
    p_value: float
    better: float | None = None  # queries won and lost; fractional where ties are credited
    worse: float | None = None


@dataclass(frozen=True)
class Step:  # one step of a greedy path
    component: str
    fidelity: float | None = None
    tied: int | None = None


@dataclass(frozen=True)
class Figure:  # benchmark.retrieval: one strategy's or baseline's result
    accuracy: float | None = None
    accuracy_ci: tuple[float, ...] | None = None
    heldout_accuracy: float | None = None
    heldout_accuracy_ci: tuple[float, ...] | None = None
    vs_full: PairedTest | None = None
    components: list[str] = field(default_factory=list)
    param_fraction: float | None = None
    fidelity: float | None = None
    path: list[Step] = field(default_factory=list)


@dataclass(frozen=True)
class Setting:
    queries: int
    results: dict[str, Figure]
    baselines: dict[str, Figure]


@dataclass(frozen=True)
class Retrieval:
    settings: dict[str, Setting]


@dataclass(frozen=True)
class Parity:  # benchmark.parity
    differences: list[Difference]


@dataclass(frozen=True)
class Timings:
    capture_s: float
    dots_s: float
    store_s: float | None = None


@dataclass(frozen=True)
class EngineVsLoop:  # benchmark.speed: the top level (--only engine), or its "fullset" part
    engine_seconds: float
    loop_seconds_measured: float
    loop_queries_timed: int
    loop_seconds_extrapolated: float
    engine_peak_rss_mb: float
    queries: int
    speedup_vs_loop: float | None = None
    speedup_vs_loop_fullset: float | None = None
    loop_peak_rss_mb: float | None = None
    engine_peak_gpu_mb: float | None = None
    engine_spilled_bytes: int | None = None
    max_rel_error: float | None = None
    max_rel_error_self: float | None = None
    flop_ratio: float | None = None
    engine_timings: Timings | None = None
    dots_over_capture: float | None = None
    dtype: str = "float32"

    @property
    def speedup(self) -> float:
        return self.speedup_vs_loop if self.speedup_vs_loop is not None else self.speedup_vs_loop_fullset


@dataclass(frozen=True)
class Map:  # benchmark.speed --only projection: one map at one dimension
    dim: int
    distortion_vs_dense_jl: float
    distortion_vs_dense_jl_95ci: tuple[float, ...] | None = None
    seconds_per_sample: float | None = None


@dataclass(frozen=True)
class ProjectionRun:
    maps: dict[str, Map]
    trak_seconds_per_sample_extrapolated: float


@dataclass(frozen=True)
class Projection:
    projection: ProjectionRun


@dataclass(frozen=True)
class Adapters:  # benchmark.adapters
    cells: list[Cell]


@dataclass(frozen=True)
class CheckRow:  # benchmark.plancheck writes a list of these, one a size
    size: int
    predicted_peak_bytes: int
    measured_peak_bytes: int
    planned_captures: int
    measured_captures: int
    dot_order: str | None = None
    kept: int | None = None
    kept_in_ram: int | None = None


@dataclass(frozen=True)
class TablePlan:  # selproj_plugin.planner: TablePlan.summary()
    kept: int
    kept_spilled: int
    kept_ram_bytes: int
    kept_device_bytes: int
    captures: int
    recomputed: int
    capture_flops: float
    dot_flops: float


@dataclass(frozen=True)
class PaperPlan:  # benchmark.plan
    queries_per_setting: int
    settings: int
    k: int
    plan: TablePlan
    host_peak_bytes: int
    device_peak_bytes: int
    device_memory_gb: float
    gpu_hours: float
    tflops_assumed: float


@dataclass(frozen=True)
class OpCount:  # benchmark.speed's "ops" part: aten calls, the proxy for a GPU's kernel launches
    queries: int
    pairs: int
    distinct_samples: int
    dot_order: str
    table_ops: int
    plain_ops: int
    plain_batch: int
    table_ops_over_plain: float
    ops_per_pair: float
    capture_ops_over_plain: float
    capture_tokens_per_s: float
    plain_tokens_per_s: float
    engine_batch_size: int | None = None  # the table's capture batches, where the count set them


@dataclass(frozen=True)
class MemoryBound:  # one command's limit and its --plan's prediction, beside what /usr/bin/time -v measured
    memory_limit_gb: float
    predicted_peak_bytes: int
    load_average: tuple[float, ...] | None = None  # 1, 5 and 15 minutes, read just before the run


@dataclass(frozen=True)
class ScaleOut:  # benchmark.scaleout
    wall_seconds: dict[str, float]
    identical: bool
    threads_per_process: int


@dataclass(frozen=True)
class Lineage:  # benchmark.retrieval: the fine-tune's record
    epochs: int
    lr: float | None = None
    steps: int | None = None
    samples: int | None = None
    batch_size: int | None = None
    base_weights: str | None = None
    loss_before: dict[str, float] = field(default_factory=dict)
    loss_after: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Pool:  # benchmark.retrieval: a setting's whole-pool ranking (keys like recall@1 stay a dict's)
    queries: int
    candidates: int
    results: dict[str, dict[str, Any]]
    baselines: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class PoolSetting:
    queries: int
    results: dict[str, Figure]
    baselines: dict[str, Figure]
    pool: Pool | None = None


@dataclass(frozen=True)
class StudySetting:  # benchmark.retrieval --checkpoints: one setting's study (or why it has none)
    per_checkpoint: list[Setting] = field(default_factory=list)
    transfer: dict[str, dict[str, Any]] = field(default_factory=dict)
    jaccard: dict[str, list[list[float]]] = field(default_factory=dict)
    tracin: dict[str, Figure] = field(default_factory=dict)
    skipped: str | None = None


@dataclass(frozen=True)
class Study:
    steps: list[int]
    lr: list[float]
    settings: dict[str, StudySetting]


@dataclass(frozen=True)
class FinetuneRun:  # benchmark.retrieval: the lineage where the model was fine-tuned first
    settings: dict[str, PoolSetting]
    finetune: Lineage | None = None
    checkpoints: Study | None = None
