"""Progress with bars off: log lines a long run's log file can be read by."""

from __future__ import annotations

import logging

from selproj_plugin import progress


def test_bars_off_log_a_phase_as_it_starts_and_as_it_ends(caplog):
    with caplog.at_level(logging.INFO, logger="selproj"):
        shown = progress.bar(5, "capture", enabled=False)
        shown.update(2)
        shown.update(3)
        shown.set_postfix(batch_loss="1.250")
        shown.close()
        shown.close()  # a second close (a finally after a normal end) adds nothing
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "capture: 5 samples"
    assert len(messages) == 2 and messages[1].startswith("capture: 5/5 samples in ") and messages[1].endswith(" s, batch_loss=1.250"), (
        messages
    )


def test_a_phase_with_nothing_to_do_logs_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="selproj"):
        progress.bar(0, "generate", enabled=False).close()
    assert caplog.records == []


def test_bars_on_draw_tqdm_on_stderr_and_log_nothing(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="selproj"):
        shown = progress.bar(3, "generate", enabled=True)
        shown.update(3)
        shown.close()
    assert caplog.records == [] and "3/3" in capsys.readouterr().err
