"""Cell logs: per-batch progress with an ETA, and known library warnings once as a note."""

from __future__ import annotations

import logging
import warnings

from vlmsens.logs import KNOWN_WARNINGS, BatchProgress, KnownWarnings, quiet_third_party


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_batch_progress_lines_rate_eta_and_throttle():
    clock, lines = FakeClock(), []
    progress = BatchProgress(lines.append, "score", total=10, every_s=10.0, clock=clock)
    for _ in range(10):
        progress.step()  # batch k starts: k - 1 done, 2 s each
        clock.now += 2.0
    # Batch 2 (the first rate), then one line per 10 s at most, and the last batch.
    assert lines[0] == "score: batch 2/10, 1 done in 2.0 s (2.00 s/batch), ETA 18.0 s"
    assert lines[-1] == "score: batch 10/10, 9 done in 18.0 s (2.00 s/batch), ETA 2.0 s"
    assert len(lines) == 3 and lines[1] == "score: batch 7/10, 6 done in 12.0 s (2.00 s/batch), ETA 8.0 s"
    assert progress.summary() == " (10 batches, 2.00 s/batch)"


def test_batch_progress_without_a_total_has_no_eta_and_long_durations_read_well():
    clock, lines = FakeClock(), []
    progress = BatchProgress(lines.append, "score", clock=clock)
    progress.step()
    clock.now += 3725.0
    progress.step()
    assert lines == ["score: batch 2, 1 done in 1 h 02 min (3725.00 s/batch)"]
    assert BatchProgress(lines.append, "load").summary() == ""


def test_known_warnings_become_one_note_each_and_others_pass(caplog, monkeypatch):
    # Whatever earlier tests in this process did to the py.warnings logger (a job's filter that has
    # already noted these warnings) and to the warnings filters is undone here: this test sees one
    # job's first warnings.
    py_warnings = logging.getLogger("py.warnings")
    monkeypatch.setattr(py_warnings, "filters", [])
    quiet_third_party()
    # An earlier job's captureWarnings(True) outlived pytest's restoring of warnings.showwarning; reset it.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    warnings.simplefilter("always")
    try:
        with caplog.at_level(logging.INFO, logger="py.warnings"):
            flt = KnownWarnings()
            logger = logging.getLogger("py.warnings")
            logger.addFilter(flt)
            try:
                for _ in range(3):
                    warnings.warn_explicit("AutoQuantize: Huggingface model detected - Enabling gradient checkpointing. x",
                                           UserWarning, "modelopt/huggingface.py", 1841)
                warnings.warn_explicit("something new", UserWarning, "lib.py", 1)
            finally:
                logger.removeFilter(flt)
    finally:
        catcher.__exit__(None, None, None)
        logging.captureWarnings(False)
    records = [r for r in caplog.records if r.name == "py.warnings"]
    notes = [r for r in records if "known warning" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelname == "INFO"
    assert "gradient checkpointing" in notes[0].getMessage() and "\n" not in notes[0].getMessage()
    assert any("something new" in r.getMessage() and r.levelname == "WARNING" for r in records)
    assert all(why for _, why in KNOWN_WARNINGS)
