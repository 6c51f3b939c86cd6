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
import signal
import sys
import traceback
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from . import failures
from .errors import AlreadyReported, VlmsensError
from .io import sweep_stale_tmp


def setup(log_path: str | None, prefix: str = "", mode: str = "w") -> logging.Logger:
    handlers: list[logging.Handler] = []
    if not (log_path and _writes_to(sys.stderr, log_path)):  # a worker's child: stderr is the log already
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode=mode))
    fmt = "%(asctime)s %(levelname)s " + (f"[{prefix}] " if prefix else "") + "%(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)
    logging.captureWarnings(True)
    # ModelOpt warns once per custom format that results "may not be optimal"; keep the log readable.
    warnings.filterwarnings("ignore", message="Received custom quantization formats")
    return logging.getLogger("vlmsens")


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
