"""Check ``--plan`` against the run it plans: predicted peak RSS and capture passes, at several sizes.

``python -m benchmark.plancheck --sizes 16,32,64`` runs, for each ``--max-samples`` size of the
default benchmark (``--strategy greedy``), first ``benchmark.retrieval --plan`` and then the run itself
under ``/usr/bin/time -v`` (each in its own process, on a cache holding only the converted model
and generations, so the table is built), and prints predicted against measured peak RSS and passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmark.record import cost_from_time


def check(size: int, cache: Path, extra: list[str]) -> dict:
    env = {**os.environ, "SELPROJ_CACHE": str(cache)}
    base = [sys.executable, "-m", "benchmark.retrieval", "--strategy", "greedy", "--max-samples", str(size), "--no-progress", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        plan_json, run_json = Path(tmp) / "plan.json", Path(tmp) / "run.json"
        subprocess.run(base + ["--plan", "--json", str(plan_json)], env=env, check=True, stdout=subprocess.DEVNULL)
        for table in (cache / "benchmark").glob("table-*"):
            table.unlink()  # the measured run builds its table
        run = subprocess.run(
            ["/usr/bin/time", "-v", *base, "--json", str(run_json)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if run.returncode != 0:
            raise SystemExit(f"size {size}: run failed: {run.stderr.strip().splitlines()[-1]}")
        plan = json.loads(plan_json.read_text())["plan"]
        notes = json.loads(run_json.read_text())["notes"]
    cost = cost_from_time(run.stderr)
    measured = cost.peak_rss_kib * 1024
    return {
        "size": size,
        "wall_seconds": cost.wall_seconds,
        "predicted_peak_bytes": plan["predicted_peak_bytes"],
        "measured_peak_bytes": measured,
        "peak_ratio": plan["predicted_peak_bytes"] / measured,
        "planned_captures": plan["captures"],
        "measured_captures": notes["captures"],
        "passes_ratio": plan["captures"] / notes["captures"],
        "dot_order": plan["dot_order"],
        "kept": plan["kept"],
        "kept_in_ram": plan["kept_in_ram"],
        "recomputed": plan["recomputed"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.plancheck", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,32,64", help="--max-samples values (default 16,32,64)")
    p.add_argument("--model-cache", required=True, help="a cache root holding the converted default model (and generations, to save time)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("extra", nargs="*", help="more benchmark.retrieval arguments (after --)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="selproj-plancheck-") as tmp:
        cache = Path(tmp) / "cache"
        shutil.copytree(args.model_cache, cache, ignore=shutil.ignore_patterns("table-*", "*.lock"))
        for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
            row = check(size, cache, args.extra)
            rows.append(row)
            print(
                f"--max-samples {size}: peak RSS predicted {row['predicted_peak_bytes'] / 2**30:.2f} GiB, measured "
                f"{row['measured_peak_bytes'] / 2**30:.2f} GiB (ratio {row['peak_ratio']:.2f}); captures planned "
                f"{row['planned_captures']}, measured {row['measured_captures']} (ratio {row['passes_ratio']:.2f}); "
                f"{row['dot_order']} order, kept {row['kept']} ({row['kept_in_ram']} in RAM), recomputed {row['recomputed']}; "
                f"wall {row['wall_seconds']:.0f} s",
                flush=True,
            )
    ok = all(abs(r["peak_ratio"] - 1) <= 0.25 and abs(r["passes_ratio"] - 1) <= 0.25 for r in rows)
    print("all within 25%" if ok else "NOT all within 25%")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
