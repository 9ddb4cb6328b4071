"""``python -m benchmark.scaleout``: the retrieval benchmark in 1 process and under torchrun, side by side.

Both runs get their own fresh stage cache (the model cache is shared), so each computes
everything; the script prints both wall times and whether the two JSON documents agree
apart from timings and run bookkeeping.  Both runs use the same threads per process
(``--threads``, default: the machine's cores shared by the torchrun processes): BLAS splits
fp32 sums by thread, so only equal threads can give equal bits.  Both take the dot products in
the ranks' order (``--dot-order stream`` unless given): one process left to choose may take
them component by component, the same dots summed in another order.  Extra arguments go to
``benchmark.retrieval``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from selproj_plugin.models import cache_dir

VOLATILE = ("stages", "seconds", "peak_memory", "date", "run")


def comparable(document: dict[str, Any]) -> dict[str, Any]:
    """The document without timings and run bookkeeping (cache paths, world size)."""
    doc = json.loads(json.dumps({k: v for k, v in document.items() if k not in VOLATILE}))  # a deep copy
    for section in [doc, *doc.get("settings", {}).values()]:
        for result in section.get("results", {}).values():
            result.pop("seconds", None)
    return doc


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON values differ, with the largest relative float difference noted."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one" for k in set(a) ^ set(b)]
        return out + [d for k in sorted(set(a) & set(b)) for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        rel = abs(a - b) / max(abs(a), abs(b), 1e-300)
        return [] if a == b else [f"{path}: {a!r} vs {b!r} (relative {rel:.1e})"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def run(nproc: int, threads: int, extra: list[str], cache: Path, out: Path) -> float:
    model_cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for entry in model_cache.glob("SmolLM2-*"):  # reuse the converted default model, nothing else
        target = cache / entry.name
        if not target.exists():
            target.symlink_to(entry.resolve())
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    )
    cmd = [*launcher, "-m", "benchmark.retrieval", "--json", str(out), "--no-progress", "--threads", str(threads), *extra]
    env = {**os.environ, "SELPROJ_CACHE": str(cache)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {done.returncode}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.scaleout", description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes for the torchrun run (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process in both runs (default: cores // nproc, at least 1)")
    p.add_argument("--json", dest="json_out", help="write wall times and the comparison here")
    args, extra = p.parse_known_args(argv)
    if not any(a == "--dot-order" or a.startswith("--dot-order=") for a in extra):
        extra += ["--dot-order", "stream"]  # the ranks' order: left to choose, one process may take another
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    print(f"{threads} thread(s) per process in both runs")
    work = Path(tempfile.mkdtemp(prefix="selproj-scaleout-"))
    try:
        walls = {}
        docs = {}
        for n in (1, args.nproc):
            out = work / f"n{n}.json"
            walls[n] = run(n, threads, extra, work / f"cache{n}", out)
            docs[n] = json.loads(out.read_text())
            print(f"{n} process(es): {walls[n]:.1f} s wall")
        diffs = differences(comparable(docs[1]), comparable(docs[args.nproc]))
        print(f"JSON apart from timings: {'identical' if not diffs else f'{len(diffs)} differences'}")
        for line in diffs[:20]:
            print("  " + line)
        if args.json_out:
            Path(args.json_out).write_text(
                json.dumps(
                    {"wall_seconds": walls, "differences": diffs, "identical": not diffs, "threads_per_process": threads, "args": extra},
                    indent=2,
                )
            )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
