"""benchmark.record turns a run's JSON and /usr/bin/time -v's report into a record the docs read."""

from __future__ import annotations

import json

from benchmark import record
from benchmark.doc_records import load_records

TIME_V = """\tCommand being timed: "make bench"
\tUser time (seconds): 700.12
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.50
\tMaximum resident set size (kbytes): 3145728
\tExit status: 0
"""


def test_a_record_carries_the_run_and_its_cost_and_loads_back(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"settings": {"paraphrased": {"queries": 3}}}))
    (tmp_path / "time.txt").write_text(TIME_V)
    out = tmp_path / "records" / "quickstart-1.json"
    out.parent.mkdir()
    assert (
        record.main(
            [
                str(out),
                "--table",
                "quickstart",
                "--command",
                "make bench",
                "--json",
                str(run),
                "--time",
                str(tmp_path / "time.txt"),
                "--label",
                "fine-tuned",
            ]
        )
        == 0
    )
    [loaded] = load_records(out.parent)
    assert (loaded.table, loaded.command, loaded.label) == ("quickstart", "make bench", "fine-tuned")
    assert loaded.result == {"settings": {"paraphrased": {"queries": 3}}}
    assert loaded.cost.wall_seconds == 3723.5  # 1 h 2 min 3.5 s
    assert loaded.cost.peak_rss_kib == 3145728 and loaded.cost.peak_rss_gib == 3.0


def test_a_time_file_that_is_not_time_v_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "time.txt").write_text("real 1m2s\n")
    out = tmp_path / "r.json"
    assert record.main([str(out), "--table", "runs", "--command", "x", "--time", str(tmp_path / "time.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not /usr/bin/time -v's report" in err
    assert not out.exists()
