"""The documentation's tables are what their records say, and the check notices when they are not."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from benchmark import docs

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
    record = root / "benchmark" / "records" / "quickstart.json"
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


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("machine"), "quickstart.json: missing 1 required positional argument: 'machine'"),
    (lambda d: d.update(tabel="x"), "quickstart.json: unknown field(s) tabel"),
    (lambda d: d["result"]["settings"]["generated"].update(queries="many"),
     "quickstart.json: result.settings.generated.queries: expected int, got 'many'"),
])
def test_a_bad_record_is_one_line_naming_it(tmp_path, capsys, change, message):
    root = copy_repo(tmp_path)
    record = root / "benchmark" / "records" / "quickstart.json"
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
    # the figures make bench printed, as first reported, so a rendering that rounds or swaps them fails
    row = {line.split("|")[1].strip(): line for line in README.read_text().splitlines() if line.startswith("| ")}
    for figure in ("0.484 [0.358, 0.613]", "0.328 [0.216, 0.457]", "+14.1 pts, p = 0.049", "0.188 [0.101, 0.305]",
                   "0.766 [0.643, 0.862]", "L3 down, L6 up"):
        assert figure in row["generated"]
    for figure in ("1.000 [0.944, 1.000]", "0.969 [0.892, 0.996]", "L23 o", "tied with 52 others"):
        assert figure in row["paraphrased"]


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


def test_links_between_the_pages_resolve():
    for page in [README, *PAGES, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_a_missing_repository_is_one_line(tmp_path, capsys):
    assert docs.main(["--check", "--root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere/README.md" in err
