"""Write a benchmark record: a run's ``--json`` output with its command, machine, date, commit and cost.

``python -m benchmark.record --table quickstart --command "make bench" --json out.json --time time.txt
--label "fine-tuned" benchmark/records/quickstart-1.json`` reads ``/usr/bin/time -v``'s report from
``--time`` for the wall time and peak RSS; ``python -m benchmark.docs`` then rebuilds the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmark.doc_records import Cost, Record, RecordError, typed

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """This machine in the records' words: its cores and memory, and a GPU where torch sees one."""
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        gpu = None
    return f"{os.cpu_count()}-core, {gib:.0f} GiB " + (f"machine with one {gpu}" if gpu else "CPU development machine")


def cost_from_time(text: str) -> Cost:
    """Wall time and peak RSS from ``/usr/bin/time -v``'s report."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not (wall and peak):
        raise RecordError("the --time file is not /usr/bin/time -v's report (no wall clock time or maximum RSS)")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = 60 * seconds + float(part)
    kib = int(peak.group(1))
    return Cost(wall_seconds=round(seconds, 1), peak_rss_gib=round(kib / 2**20, 2), peak_rss_kib=kib)


def commit(root: Path = ROOT) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.record", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the record to write (benchmark/records/NAME.json)")
    p.add_argument("--table", required=True, help="the docs table it feeds (the name in its marker)")
    p.add_argument("--command", required=True, help="the command as a user would type it")
    p.add_argument("--json", type=Path, help="the benchmark's --json output (default: a record with no result)")
    p.add_argument("--time", type=Path, help="/usr/bin/time -v's report of the same run, for its cost")
    p.add_argument("--label", default="", help="the row's name where a table has several records")
    p.add_argument("--note", default="", help="what the run included, in a few words")
    p.add_argument("--machine", default=None, help="default: this machine's cores and memory")
    p.add_argument("--commit", default=None, help="the code that ran (default: this checkout's HEAD)")
    args = p.parse_args(argv)
    try:
        result = json.loads(args.json.read_text()) if args.json else {}
        cost = cost_from_time(args.time.read_text()) if args.time else None
        record = Record(
            table=args.table,
            command=args.command,
            machine=args.machine or machine(),
            date=time.strftime("%Y-%m-%d"),
            commit=args.commit or commit(),
            result=result,
            label=args.label,
            note=args.note,
            cost=cost,
        )
        data = {k: v for k, v in asdict(record).items() if k != "source" and v not in ("", None)}
        typed(Record, data, args.out.name)  # what load_records will read back
        args.out.write_text(json.dumps(data, indent=1) + "\n")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
