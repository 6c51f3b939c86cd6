"""Logging for workflow scripts: to the rule's log file and to stderr, with a cell prefix.

A job runs through :func:`run_logged` (or :func:`run_job`, which takes the details from the
script's ``snakemake`` object): whatever it raises ends the rule log with one clear line
(vlmsens.failures) after the traceback, a retry that cannot help fails at once, stale temporary
files of its outputs are swept before it starts, and SIGTERM unwinds like an exception so that the
atomic writers (vlmsens.io) remove their temporary files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import failures
from .errors import AlreadyReported, VlmsensError
from .io import sweep_stale_tmp


def setup(log_path: str | None, prefix: str = "", mode: str = "w") -> logging.Logger:
    handlers: list[logging.Handler] = []
    if not (log_path and _writes_to(sys.stderr, log_path)):  # a worker's child: stderr is the log already
        console = logging.StreamHandler(sys.stderr)
        # With a log file, the console (Snakemake's output, shared by every job) gets warnings and
        # errors only; progress lines go to the job's log.
        console.setLevel(logging.WARNING if log_path else logging.INFO)
        handlers.append(console)
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode=mode))
    fmt = "%(asctime)s %(levelname)s " + (f"[{prefix}] " if prefix else "") + "%(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)
    logging.captureWarnings(True)
    quiet_third_party()
    return logging.getLogger("vlmsens")


# Warnings of the libraries that say nothing about a vlmsens run: (pattern, why it is harmless).
# Each is logged once per job as a one-line note, then dropped.
KNOWN_WARNINGS = (
    (r"Received custom quantization formats", "ModelOpt: custom formats are how vlmsens names its candidates"),
    (r"AutoQuantize: Huggingface model detected - Enabling gradient checkpointing",
     "ModelOpt turns on gradient checkpointing unless autoquant.gradient_checkpointing is false"),
    (r"`gradient_checkpointing_enable` is deprecated", "transformers: ModelOpt's call, renamed upstream"),
    (r"Full backward hook is firing when gradients are computed with respect to module outputs",
     "torch: ModelOpt's score hooks on modules whose inputs need no gradient"),
    (r"`torch.jit.script` is deprecated", "torch: used inside ModelOpt"),
    (r"transformers \S+ is not tested with current version of modelopt",
     "ModelOpt: the pinned transformers is newer than ModelOpt's test matrix; the test suite checks it"),
)


_WARNING_TEXT = re.compile(r"\w*Warning: .*")


class KnownWarnings(logging.Filter):
    """Turns the first of each known third-party warning into a one-line note and drops the repeats."""

    def __init__(self, known=KNOWN_WARNINGS):
        super().__init__()
        self.known = [(re.compile(pattern), why) for pattern, why in known]
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for pattern, why in self.known:
            if pattern.search(message):
                if pattern.pattern in self.seen:
                    return False
                self.seen.add(pattern.pattern)
                first = message.strip().splitlines()[0] if message.strip() else ""
                text = _WARNING_TEXT.search(first)
                record.msg, record.args, record.levelno, record.levelname = (
                    f"known warning, shown once ({why}): {text.group(0) if text else first}"[:240], None, logging.INFO, "INFO")
                return True
        return True


def quiet_third_party() -> None:
    """Known library warnings once per job (:data:`KNOWN_WARNINGS`), and no progress bars: ModelOpt's
    and transformers' tqdm bars go to stderr, which is the cell's log; :class:`BatchProgress` reports instead.

    ``TQDM_DISABLE`` is read when tqdm is imported, so this runs before torch & co. load.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")
    logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, KnownWarnings) for f in logger.filters):
        logger.addFilter(KnownWarnings())


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class BatchProgress:
    """Per-batch progress of one phase with an ETA, for a cell's log.

    :meth:`step` is called as each batch starts; a line such as ``score: batch 7/16, 6 done in
    41.0 s (6.8 s/batch), ETA 1 min 01 s`` is logged for the second batch (the first rate), then at
    most once per ``every_s`` seconds, and for the last batch. Without a known ``total`` the line has
    no ETA.
    """

    def __init__(self, progress: Callable[[str], None], phase: str, total: int | None = None, every_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic):
        self.progress, self.phase, self.total, self.every_s, self.clock = progress, phase, total, every_s, clock
        self.started = clock()
        self.count = 0
        self._last_line = -float("inf")

    def step(self) -> None:
        self.count += 1
        done = self.count - 1
        if done == 0:
            return
        now = self.clock()
        last = self.total is not None and self.count == self.total
        if done > 1 and not last and now - self._last_line < self.every_s:
            return
        self._last_line = now
        elapsed = now - self.started
        rate = elapsed / done
        line = f"{self.phase}: batch {self.count}" + (f"/{self.total}" if self.total else "")
        line += f", {done} done in {_duration(elapsed)} ({rate:.2f} s/batch)"
        if self.total and self.total >= self.count:
            line += f", ETA {_duration(rate * (self.total - done))}"
        self.progress(line)

    def summary(self) -> str:
        """' (N batches, X s/batch)' for the phase's closing line, or '' when it ran no batch."""
        if not self.count:
            return ""
        return f" ({self.count} batches, {(self.clock() - self.started) / self.count:.2f} s/batch)"


def refuse_futile_retry(logger: logging.Logger, log_path: str | None, attempt: int) -> None:
    """Exit 1 at once when an earlier attempt failed with an error a retry cannot fix."""
    earlier = failures.earlier_failure(log_path, attempt)
    if earlier:
        trace, line = earlier
        if trace:
            logger.error("traceback of the earlier attempt:\n%s", trace)
        logger.error("%s", line)
        sys.exit(1)


def run_logged(
    log_path: str | None,
    prefix: str,
    func,
    *args,
    log_mode: str = "w",
    job_attempt: int = 1,
    job_inputs: Mapping[str, Any] | None = None,
    job_outputs: Iterable[str] | None = None,
    **kwargs,
):
    """Run ``func`` with logging set up; any exception ends the log with one line and exits 1.

    ``log_mode="a"`` continues a log the script already started (e.g. with the GPU slot it took).
    Snakemake deletes the log before a retry, so a retry that stops at once repeats the earlier
    attempt's traceback and line from its record.
    """

    logger = setup(log_path, prefix, mode=log_mode)
    refuse_futile_retry(logger, log_path, job_attempt)
    if job_outputs:
        for path in sweep_stale_tmp(job_outputs):
            logger.info("removed %s, left by an earlier attempt that was killed", path)
    try:
        with _terminate_unwinds():
            result = func(*args, progress=logger.info, **kwargs) if _takes_progress(func) else func(*args, **kwargs)
    except AlreadyReported as done:
        sys.exit(done.code)  # the process that ran the work logged and recorded the failure
    except BaseException as err:  # noqa: BLE001 - every failure gets its line; the exit status is 1 either way
        line = failures.describe(err, prefix, job_inputs, batch_size=kwargs.get("batch_size"))
        trace = "" if isinstance(err, VlmsensError) else traceback.format_exc().rstrip()
        if trace:
            logger.error("traceback:\n%s", trace)
        failures.record(log_path, err, line, job_attempt, trace)
        logger.error("%s", line)
        sys.exit(1)
    failures.clear(log_path)
    return result


def job_attempt(smk) -> int:
    """The attempt of a script's job: ``resources.attempt`` where its rule declares it (rules with retries)."""
    return int(getattr(smk.resources, "attempt", 1) or 1)


def run_job(smk, prefix: str, func, *args, **kwargs):
    """:func:`run_logged` for a script's ``snakemake`` object: its log, attempt, inputs and outputs.

    The attempt comes from ``resources.attempt`` where the rule declares it (rules with retries).
    """
    return run_logged(
        smk.log[0] if smk.log else None, prefix, func, *args,
        job_attempt=job_attempt(smk),
        job_inputs=dict(smk.input.items()), job_outputs=list(smk.output), **kwargs,
    )


@contextlib.contextmanager
def _terminate_unwinds():
    """SIGTERM (Snakemake stopping, a cancelled SLURM job) raises SystemExit, so cleanup code runs."""

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _writes_to(stream, path: str) -> bool:
    import os

    try:
        return os.path.samestat(os.fstat(stream.fileno()), os.stat(path))
    except (OSError, ValueError, AttributeError):
        return False


def _takes_progress(func) -> bool:
    import inspect

    return "progress" in inspect.signature(func).parameters
