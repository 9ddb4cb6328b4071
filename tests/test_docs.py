"""The documentation's tables are what their records say, and the check notices when they are not."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmark import docs
from benchmark.adapters import Cell
from benchmark.doc_records import Record
from benchmark.faults import Row
from benchmark.retrieval import cli
from tests.helpers import argv, reference_path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
HASH = re.compile(r"\b[0-9a-f]{7,40}\b")
DATE = re.compile(r"20[0-9]{2}-[0-9]{2}-[0-9]{2}")


def copy_repo(tmp_path: Path) -> Path:
    """README, docs and records only: all the generator reads."""
    (tmp_path / "benchmark").mkdir()
    shutil.copy(README, tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "benchmark" / "records", tmp_path / "benchmark" / "records")
    return tmp_path


def test_committed_docs_equal_what_the_records_give(capsys):
    assert docs.main(["--check"]) == 0, capsys.readouterr().err


def test_check_fails_when_a_record_changes_and_the_rebuild_follows(tmp_path, capsys):
    root = copy_repo(tmp_path)
    record = root / "benchmark" / "records" / "quickstart-2-as-loaded.json"
    data = json.loads(record.read_text())
    data["result"]["settings"]["generated"]["results"]["greedy"]["heldout_accuracy"] = 0.5
    record.write_text(json.dumps(data))
    assert docs.main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "README.md differs" in err and "docs/benchmarks.md differs" in err
    assert "0.500 [0.216, 0.457]" not in (root / "README.md").read_text()  # --check writes nothing
    assert docs.main(["--root", str(root)]) == 0
    assert "0.500 [0.216, 0.457]" in (root / "README.md").read_text()
    assert docs.main(["--check", "--root", str(root)]) == 0


def test_check_fails_when_a_table_is_edited_by_hand(tmp_path, capsys):
    root = copy_repo(tmp_path)
    page = root / "docs" / "benchmarks.md"
    page.write_text(page.read_text().replace("| 8/8 |", "| 7/8 |", 1))
    assert docs.main(["--check", "--root", str(root)]) == 1
    assert capsys.readouterr().err.strip() == "docs/benchmarks.md differs from its records: run python -m benchmark.docs"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("machine"), "quickstart-2-as-loaded.json: missing 1 required positional argument: 'machine'"),
        (lambda d: d.update(tabel="x"), "quickstart-2-as-loaded.json: unknown field(s) tabel"),
        (
            lambda d: d["result"]["settings"]["generated"].update(queries="many"),
            "quickstart-2-as-loaded.json: result.settings.generated.queries: expected int, got 'many'",
        ),
    ],
)
def test_a_bad_record_is_one_line_naming_it(tmp_path, capsys, change, message):
    root = copy_repo(tmp_path)
    record = root / "benchmark" / "records" / "quickstart-2-as-loaded.json"
    data = json.loads(record.read_text())
    change(data)
    record.write_text(json.dumps(data))
    assert docs.main(["--check", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_marker_naming_no_table_is_an_error(tmp_path, capsys):
    root = copy_repo(tmp_path)
    (root / "docs" / "extra.md").write_text("<!-- table:nonesuch:start -->\n<!-- table:nonesuch:end -->\n")
    assert docs.main(["--root", str(root)]) == 2
    assert "unknown table 'nonesuch'" in capsys.readouterr().err


def test_readme_table_holds_the_quick_start_figures_as_measured():
    # the figures the two runs printed, so a rendering that rounds, swaps runs or swaps columns fails
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in README.read_text().splitlines() if line.startswith("| ")}
    expected = {
        ("generated", "fine-tuned (default)"): (
            "0.734 [0.609, 0.837]",
            "0.578 [0.448, 0.701]",
            "+23.4 pts, p = 0.014",
            "0.344 [0.229, 0.473]",
            "0.766 [0.643, 0.862]",
            "L4 down, L23 o",
        ),
        ("generated", "as loaded"): (
            "0.484 [0.358, 0.613]",
            "0.328 [0.216, 0.457]",
            "+14.1 pts, p = 0.049",
            "0.188 [0.101, 0.305]",
            "0.766 [0.643, 0.862]",
            "L3 down, L6 up",
        ),
        ("paraphrased", "fine-tuned (default)"): ("1.000 [0.944, 1.000]", "0.984 [0.916, 1.000]", "tied with 21 others"),
        ("paraphrased", "as loaded"): ("1.000 [0.944, 1.000]", "0.969 [0.892, 0.996]", "L23 o", "tied with 52 others"),
    }
    for key, figures in expected.items():
        for figure in figures:
            assert figure in rows[key], (key, figure)


def test_readme_is_short_and_starts_with_the_quick_start():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200
    head = "\n".join(lines[:40])
    assert "make bench" in head and "make test" in head and "<!-- table:quickstart:start -->" in head
    assert [n for n, line in enumerate(lines, 1) if HASH.search(line) or DATE.search(line)] == []


def test_docs_prose_has_no_hash_or_date_outside_the_generated_lines():
    for page in PAGES:
        prose = docs.MARKER.sub("", page.read_text())  # generated tables and their lines may name them
        found = [line for line in prose.splitlines() if HASH.search(line) or DATE.search(line)]
        assert found == [], page.name


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}


def test_links_between_the_pages_resolve():
    for page in [README, *PAGES, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if target.startswith("http"):
                continue
            path = page.parent / target if target else page
            assert path.exists(), f"{page.name} links to missing {target}"
            assert not anchor or anchor in anchors(path), f"{page.name} links to missing {target}#{anchor}"


def test_a_missing_repository_is_one_line(tmp_path, capsys):
    assert docs.main(["--check", "--root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere/README.md" in err


def record(table: str, result) -> Record:
    return Record(table=table, command="cmd", machine="here", date="today", commit="HEAD", result=result, label="run")


@pytest.mark.slow
def test_what_benchmark_retrieval_writes_is_a_record(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "run.json"
    assert cli(argv(tiny_model_dir, small_dataset, tmp_path / "cache", "--strategy", "full,greedy", "--json", str(out))) == 0
    written = json.loads(out.read_text())
    rows = {line.split("|")[1].strip(): line for line in docs.quickstart([record("quickstart", written)]).splitlines()}
    for setting, part in written["settings"].items():
        greedy, full = part["results"]["greedy"], part["results"]["full"]
        lo, hi = greedy["heldout_accuracy_ci"]
        assert f"{greedy['heldout_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in rows[setting]
        assert f"{full['accuracy']:.3f}" in rows[setting] and f"{100 * greedy['vs_full']['difference']:+.1f} pts" in rows[setting]


@pytest.mark.slow
def test_what_benchmark_speed_writes_is_a_record(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmark.speed",
            "--only",
            "engine",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(small_dataset),
            "--queries",
            "2",
            "--k",
            "2",
            "--loop-queries",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads(out.read_text())
    row = docs.speed_engine([record("speed-engine", written)]).splitlines()[-1]
    assert f"{written['engine_seconds']:.1f} s: {written['engine_timings']['capture_s']:.1f} + " in row
    assert f"**{written['speedup_vs_loop']:.3g}x**" in row and f"{written['flop_ratio']:.1f}x" in row
    ops = written["ops"]  # the GPU cost proxy renders from the same record
    row = docs.speed_ops([record("speed-engine", written)]).splitlines()[-1]
    assert f"{ops['table_ops']:,} / {ops['plain_ops']:,}" in row
    assert f"**{ops['table_ops'] / ops['plain_ops']:.2f}x**" in row and f"{ops['ops_per_pair']:,.0f}" in row


def test_what_the_adapter_and_fault_benchmarks_write_are_records():
    cell = Cell("greedy", "trak", seconds=3.0, peak_rss_bytes=2**30, hits=2, engine_hits=2, queries=2, dim=10, store_bytes=2**29)
    assert "| greedy | trak | 10 | 3 | 1.00 GB | 2/2 | 2/2 | 0.50 GB |" in docs.adapters([record("adapters", {"cells": [asdict(cell)]})])
    row = Row("a fault", "exit 1", 2.25, "kept all", True)
    assert "| a fault | exit 1 | 2.2 | kept all |" in docs.faults([record("faults", [asdict(row)])])


def test_what_benchmark_parity_writes_is_a_record():
    from benchmark.parity import Difference

    written = {
        "differences": [
            asdict(Difference("greedy", "TRAKer", "train/sdpa", 2.5e-6, True)),
            asdict(Difference("full", "TRAKer", "train/sdpa", 3.0e-7, False)),
            asdict(Difference("greedy", "TRAKer", "eval/eager", 0.0, True)),
        ]
    }
    table = docs.parity([record("parity", written)])
    assert "| greedy | TRAKer | 2.5e-06 | 0.0e+00 |" in table and "| full | TRAKer | 3.0e-07 (state changed) |  |" in table
    summary = docs.parity_summary([record("parity", written)])
    assert "| train/sdpa | 2.5e-06 (greedy, TRAKer) | 1 of 2 |" in summary
    assert "| eval/eager | 0.0e+00 (greedy, TRAKer) | 1 of 1 |" in summary


@pytest.mark.slow
def test_the_paper_record_still_holds_on_the_reference_tables(tmp_path):
    """The committed figures, recomputed from the paper's published dot products by today's command."""
    out = tmp_path / "paper.json"
    tables = [str(reference_path("paraphrased")), str(reference_path("model_generated"))]
    assert (
        cli(
            [
                "--table",
                tables[0],
                "--table",
                tables[1],
                "--strategy",
                "full,greedy,greedy_fidelity,random_projection_per_component",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    fresh = docs.paper([record("paper", json.loads(out.read_text()))])
    committed = docs.paper([r for r in docs.load_records(ROOT / "benchmark" / "records") if r.table == "paper"])
    p_value = re.compile(r"p = ([0-9.e+-]+)")
    assert p_value.sub("p", fresh) == p_value.sub("p", committed)
    for now, then in zip(p_value.findall(fresh), p_value.findall(committed)):  # as precise as they were reported
        assert float(f"{float(now):.{max(1, len(then.replace('0.', '').split('e')[0].replace('.', '')))}g}") == float(then)
