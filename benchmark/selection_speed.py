"""``python -m benchmark.selection_speed``: time of greedy selection plus k-fold held-out on stored tables.

Defaults to the paper's reference tables (988 x 5 x 113) in ``../shared``; the target is
under one second per table on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from selproj_plugin.registry import get_strategy
from selproj_plugin.table import ComponentTable

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "paper-olmo1b-lima"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.selection_speed", description=__doc__.splitlines()[0])
    p.add_argument("tables", nargs="*", default=[str(REFERENCE / f"{s}.npz") for s in ("paraphrased", "model_generated")])
    p.add_argument("--strategy", default="greedy")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=5, help="runs per table; the best and median are printed")
    args = p.parse_args(argv)
    for path in args.tables:
        table = ComponentTable.load(path)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = get_strategy(args.strategy).evaluate(table, folds=args.folds)
            times.append(time.perf_counter() - start)
        times.sort()
        print(
            f"{Path(path).name}: {args.strategy} + {args.folds}-fold held-out on {table.cross.shape}: "
            f"best {times[0]:.3f} s, median {times[len(times) // 2]:.3f} s "
            f"(accuracy {result.accuracy:.4f}, held-out {result.heldout_accuracy:.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
