"""``python -m benchmark.faults``: the retrieval benchmark under faults, one table row per fault.

Each fault runs ``benchmark.retrieval`` (alone or under ``torchrun``) in its own cache and
temp dir, injects the fault, and records how the run ended, the seconds until every
process had exited, and what the cache kept; a fault that kills a run is followed by a
rerun whose JSON must equal a clean run's.  Extra arguments go to ``benchmark.retrieval``
(``--model DIR --dataset FILE`` runs it on a small model; faults of the embedded model's
conversion are skipped then).  Linux only: ranks are found and killed through ``/proc``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from benchmark.scaleout import comparable, differences

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARGS = ["--max-samples", "8", "--batch-size", "4", "--threads", "1"]
FAULTS = ("concurrent-first-run", "partial-model", "corrupt-shard", "kill-rank-mid-table", "kill-mid-generation", "full-disk", "nan-loss")
NAN_WRAPPER = """
import sys
import selproj_plugin.capture as capture
from benchmark.retrieval import cli

real, poisoned = capture.forward_losses, []

def forward_losses(model, batch):  # the first sample captured gets a NaN input embedding, so a NaN loss
    if poisoned:
        return real(model, batch)
    poisoned.append(batch.sample_ids[0])
    def nan_row(module, args, out):
        out = out.clone()
        out[0] = float("nan")
        return out
    hook = model.get_input_embeddings().register_forward_hook(nan_row)
    try:
        return real(model, batch)
    finally:
        hook.remove()

capture.forward_losses = forward_losses
sys.exit(cli(sys.argv[1:]))
"""


@dataclass
class Row:
    fault: str
    outcome: str
    seconds: float
    kept: str
    ok: bool


@dataclass
class Run:
    """One finished launch: exit code, wall seconds, stderr, the JSON it wrote, processes it left."""

    rc: int
    seconds: float
    stderr: str
    document: dict | None
    left: list[int] = field(default_factory=list)
    fault_at: float | None = None  # seconds after launch when the fault was injected

    def error(self) -> str:
        """The first error line (paths under the work directory shortened)."""
        lines = [line.strip() for line in self.stderr.replace("\r", "\n").splitlines()]
        errors = [line for line in lines if line.startswith(("error:", "interrupted:"))]
        return errors[0] if errors else f"exit code {self.rc}"


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _children(pid: int) -> dict[int, int]:
    """Every live descendant of ``pid`` with its start time (a pid alone may be reused)."""
    stats = {int(e.name): _stat(int(e.name)) for e in Path("/proc").iterdir() if e.name.isdigit()}
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        for child, st in stats.items():
            if st is not None and st[1] == current and st[0] != "Z":
                out[child] = st[2]
                todo.append(child)
    return out


def _still_running(pid: int, started: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[2] == started


def _rank_pid(pids: list[int], rank: int) -> int | None:
    for pid in pids:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"\0".join(env):
            return pid
    return None


class Bench:
    """Launches ``benchmark.retrieval`` runs with fixed arguments in per-fault caches under ``work``."""

    def __init__(self, work: Path, extra: list[str], default_model: bool) -> None:
        self.work, self.extra, self.default_model = work, extra, default_model

    def launch(
        self,
        name: str,
        cache: Path,
        *,
        nproc: int = 1,
        wrapper: str | None = None,
        extra: tuple[str, ...] = (),
        env: dict | None = None,
        fault: Callable[[str, list[int]], bool] | None = None,
    ) -> Run:
        """Run to the end; ``fault(stderr so far, live pids of the run)`` is polled until it returns True (it injected)."""
        out = self.work / f"{name}.json"
        out.unlink(missing_ok=True)
        args = ["--cache-dir", str(cache), "--json", str(out), *self.extra, *extra]
        if nproc > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
                "-m",
                "benchmark.retrieval",
                *args,
            ]
        elif wrapper:
            cmd = [sys.executable, "-c", wrapper, *args]
        else:
            cmd = [sys.executable, "-m", "benchmark.retrieval", *args]
        tmp = self.work / f"tmp-{name}"
        tmp.mkdir(exist_ok=True)
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), **(env or {})}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(65536), b"")))
        reader.start()
        seen: dict[int, int] = {}
        fault_at = None
        while proc.poll() is None:
            live = _children(proc.pid)
            seen.update(live)
            if fault is not None and fault_at is None and fault(b"".join(chunks).decode(errors="replace"), [proc.pid, *sorted(live)]):
                fault_at = time.perf_counter() - start
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        reader.join()
        with open(self.work / f"{name}.log", "ab") as log:  # every launch's stderr, for --keep
            log.write(b"".join(chunks))
        document = json.loads(out.read_text()) if proc.returncode == 0 and out.is_file() else None
        return Run(
            proc.returncode,
            seconds,
            b"".join(chunks).decode(errors="replace"),
            document,
            [p for p, started in seen.items() if _still_running(p, started)],
            fault_at,
        )

    def fresh_cache(self, name: str, model: bool = True) -> Path:
        """An empty cache dir; with ``model``, a complete converted default model linked in (when there is one)."""
        cache = self.work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        source = self.converted_model() if model and self.default_model else None
        if source is not None:
            (cache / source.name).symlink_to(source)
        return cache

    def converted_model(self) -> Path | None:
        """A complete converted default model: the reference run's, else the user's model cache's."""
        from selproj_plugin.models import _CACHE_SUBDIR, cache_dir, entry_problem

        for source in (self.work / "cache-reference" / _CACHE_SUBDIR, cache_dir() / _CACHE_SUBDIR):
            if entry_problem(source) is None:
                return source.resolve()
        return None


def _same(run: Run, reference: dict) -> str:
    if run.document is None:
        return f"rerun failed: {run.error()}"
    diffs = differences(comparable(reference), comparable(run.document))
    return "identical to a clean run" if not diffs else f"{len(diffs)} differences from a clean run: {diffs[0]}"


def _left(run: Run) -> str:
    return f"; {len(run.left)} process(es) left running" if run.left else ""


def _generations(cache: Path) -> int:
    """Distinct samples with a cached generation (merged and per-rank files together)."""
    ids: set[str] = set()
    for f in (cache / "benchmark").glob("generations-*.json*"):
        ids.update(json.loads(f.read_text()))
    return len(ids)


def _spills(tmp: Path) -> int:
    return len(list(tmp.glob("selproj-spill-*")))


def concurrent_first_run(bench: Bench, reference: dict) -> Row:
    cache = bench.fresh_cache("concurrent", model=False)
    run = bench.launch("concurrent", cache, nproc=2)
    from selproj_plugin.models import entry_problem

    complete = [p.name for p in cache.iterdir() if p.name.startswith("SmolLM2") and entry_problem(p) is None]
    temps = [p.name for p in cache.iterdir() if p.name.startswith(".SmolLM2") and p.is_dir()]
    same = _same(run, reference)
    kept = f"model converted {run.stderr.count('[selproj] converting')}x: {len(complete)} complete model dir, {len(temps)} temp dirs"
    return Row(
        "concurrent first run (2 ranks, empty cache)",
        f"exit {run.rc}, {same}{_left(run)}",
        run.seconds,
        kept if bench.default_model else "stage cache only (no conversion)",
        run.rc == 0 and same.startswith("identical"),
    )


def partial_model(bench: Bench, reference: dict) -> Row:
    cache = bench.fresh_cache("partial", model=False)
    source = bench.converted_model()
    if source is None:
        return Row("partial model directory", "not run: no converted model to copy from", 0.0, "-", False)
    partial = cache / source.name  # a real directory, not a link to the reference's model
    partial.mkdir()
    for f in source.glob("tokenizer*"):  # what two racing converters used to leave
        shutil.copy(f, partial / f.name)
    run = bench.launch("partial", cache)
    report = [line for line in run.stderr.splitlines() if "[selproj] model cache" in line]
    same = _same(run, reference)
    return Row(
        "partial model directory (tokenizer files only)",
        f"exit {run.rc}, {same}{_left(run)}",
        run.seconds,
        f"reported in {len(report)} line(s), rebuilt",
        run.rc == 0 and same.startswith("identical") and len(report) == 1,
    )


def corrupt_shard(bench: Bench, reference: dict) -> Row:
    cache = bench.work / "cache-concurrent"  # holds both ranks' finished shards
    tables = list((cache / "benchmark").glob("table-*.npz"))
    shards = {p.name.rsplit(".", 2)[1]: p for p in tables if ".shard" in p.name}
    for t in tables:
        if ".shard" not in t.name:
            t.unlink()  # as if the run died after its shards
    if set(shards) != {"shard0of2", "shard1of2"}:
        return Row("corrupt shard on one rank", "not run: no shards from the 2-rank run", 0.0, "-", False)
    shards["shard1of2"].write_bytes(os.urandom(100))
    kept_mtime = shards["shard0of2"].stat().st_mtime_ns
    run = bench.launch("corrupt", cache, nproc=2)
    error = run.error()
    named = "shard1of2" in error
    shards["shard1of2"].unlink()  # as the error says
    rerun = bench.launch("corrupt-rerun", cache, nproc=2)
    same = _same(rerun, reference)
    reused = shards["shard0of2"].stat().st_mtime_ns == kept_mtime
    ok = run.rc != 0 and named and run.seconds < 60 and not run.left and same.startswith("identical") and reused
    return Row(
        "corrupt shard on one rank",
        f"exit {run.rc}: {error}{_left(run)}; after deleting it: {same}",
        run.seconds,
        f"shard0of2 {'reused' if reused else 'recomputed'}, shard1of2 recomputed",
        ok,
    )


def kill_rank_mid_table(bench: Bench, reference: dict) -> Row:
    cache = bench.fresh_cache("kill-table")
    spill = ("--memory-limit-gb", "0.05")  # factors spill to disk, so the killed rank leaves a spill dir

    def kill(stderr: str, pids: list[int]) -> bool:
        pid = _rank_pid(pids, 1)
        if pid is None or "rank 1/2 candidates:" not in stderr and "rank 1/2 queries:" not in stderr:
            return False
        os.kill(pid, signal.SIGKILL)
        return True

    run = bench.launch("kill-table", cache, nproc=2, extra=spill, fault=kill)
    tmp = bench.work / "tmp-kill-table"
    left_spills = _spills(tmp)
    gens = _generations(cache)
    rerun = bench.launch("kill-table", cache, nproc=2, extra=spill)
    same = _same(rerun, reference)
    cleaned = "removed" in rerun.stderr and _spills(tmp) == 0
    to_exit = run.seconds - run.fault_at if run.fault_at is not None else float("nan")
    ok = run.fault_at is not None and run.rc != 0 and not run.left and same.startswith("identical") and cleaned
    return Row(
        "SIGKILL of rank 1 mid-table, rerun",
        f"exit {run.rc}{_left(run)}; rerun: {same}",
        to_exit,
        f"{gens} generations reused, {left_spills} spill dir(s) left, {'removed at the rerun' if cleaned else 'NOT removed'}",
        ok,
    )


def kill_mid_generation(bench: Bench, reference: dict) -> Row:
    cache = bench.fresh_cache("kill-gen")

    def kill(stderr: str, pids: list[int]) -> bool:
        if not list((cache / "benchmark").glob("generations-*.json")):
            return False  # the first batch is not finished yet
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return True

    run = bench.launch("kill-gen", cache, fault=kill)
    gens = _generations(cache)
    rerun = bench.launch("kill-gen", cache)
    same = _same(rerun, reference)
    to_exit = run.seconds - run.fault_at if run.fault_at is not None else float("nan")
    return Row(
        "SIGKILL mid-generation, rerun",
        f"exit {run.rc}; rerun: {same}",
        to_exit,
        f"{gens} finished generations kept, only the rest generated on rerun",
        run.fault_at is not None and gens > 0 and same.startswith("identical"),
    )


def _full_dir(path: Path) -> tuple[str, Callable[[], None]]:
    """A spill parent that cannot take the factors: a 16 KiB tmpfs, else a read-only dir, else a file-size limit."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(path)], capture_output=True).returncode == 0
        if os.geteuid() == 0
        else False
    )
    if mounted:
        return "16 KiB tmpfs", lambda: subprocess.run(["umount", str(path)], check=False)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return "read-only dir", lambda: path.chmod(0o755)
    return "file-size limit", lambda: None


def full_disk(bench: Bench, reference: dict) -> Row:
    cache = bench.fresh_cache("full-disk")
    spill = bench.work / "tmp-full"
    how, undo = _full_dir(spill)
    try:
        env = {"TMPDIR": str(spill)}
        if how == "file-size limit":
            env = {}  # resource limits go through a wrapper below
        # the plan counts on 1 GB of spill that the disk does not have (as when it fills during the run)
        run = bench.launch(
            "full-disk",
            cache,
            extra=("--memory-limit-gb", "0.01", "--max-spill-gb", "1"),
            env=env,
            wrapper=None if how != "file-size limit" else _FSIZE_WRAPPER,
        )
    finally:
        undo()
    error = run.error()
    ok = run.rc == 2 and ("spill" in error) and not run.left
    return Row(
        f"full disk on the spill dir ({how})",
        f"exit {run.rc}: {error}{_left(run)}",
        run.seconds,
        f"{_generations(cache)} generations kept, no table",
        ok,
    )


_FSIZE_WRAPPER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))  # Python ignores SIGXFSZ: writes fail with EFBIG
from benchmark.retrieval import cli
sys.exit(cli(sys.argv[1:]))
"""


def nan_loss(bench: Bench, reference: dict) -> Row:
    cache = bench.fresh_cache("nan")
    run = bench.launch("nan", cache, wrapper=NAN_WRAPPER)
    error = run.error()
    ok = run.rc == 2 and "NaN" in error and "sample" in error and not run.left
    return Row(
        "NaN in one sample's loss",
        f"exit {run.rc}: {error}{_left(run)}",
        run.seconds,
        f"{_generations(cache)} generations kept, no table",
        ok,
    )


ROWS = {
    "concurrent-first-run": concurrent_first_run,
    "partial-model": partial_model,
    "corrupt-shard": corrupt_shard,
    "kill-rank-mid-table": kill_rank_mid_table,
    "kill-mid-generation": kill_mid_generation,
    "full-disk": full_disk,
    "nan-loss": nan_loss,
}
NEEDS_DEFAULT_MODEL = {"partial-model"}
NEEDS = {"corrupt-shard": "concurrent-first-run"}


def format_rows(rows: list[Row], work: Path) -> str:
    lines = ["| fault | outcome | seconds to exit | kept |", "|---|---|---|---|"]
    lines += [f"| {r.fault} | {r.outcome.replace(str(work), '$WORK')} | {r.seconds:.1f} | {r.kept} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.faults", description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(FAULTS), help=f"comma-separated faults (default: all of {', '.join(FAULTS)})")
    p.add_argument("--json", dest="json_out", help="write the rows here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (caches, logs)")
    p.add_argument("--reference", metavar="JSON", help="a clean run's JSON with the same arguments (skips that run)")
    args, extra = p.parse_known_args(argv)
    chosen = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in ROWS]
    if unknown:
        print(f"error: unknown fault {', '.join(unknown)}; choose from {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    default_model = "--model" not in extra
    work = Path(tempfile.mkdtemp(prefix="selproj-faults-"))
    bench = Bench(work, [*DEFAULT_ARGS, *extra], default_model)
    rows: list[Row] = []
    try:
        needs_reference = any(f not in {"full-disk", "nan-loss"} for f in chosen)
        reference: dict = {}
        if needs_reference and args.reference:
            reference = json.loads(Path(args.reference).read_text())
        elif needs_reference:
            run = bench.launch("reference", bench.fresh_cache("reference"))
            if run.document is None:
                print(f"error: the clean reference run failed: {run.error()}", file=sys.stderr)
                return 2
            reference = run.document
            print(f"clean reference run: {run.seconds:.1f} s", file=sys.stderr)
        for name in FAULTS:
            if name not in chosen:
                continue
            if name in NEEDS_DEFAULT_MODEL and not default_model:
                continue
            if name in NEEDS and NEEDS[name] not in chosen:
                rows.append(Row(name, f"not run: needs {NEEDS[name]}", 0.0, "-", False))
                continue
            row = ROWS[name](bench, reference)
            print(f"{row.fault}: {row.outcome} ({row.seconds:.1f} s)", file=sys.stderr)
            rows.append(row)
        print(format_rows(rows, work))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps([asdict(r) for r in rows], indent=2))
        return 0 if all(r.ok for r in rows) else 1
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
