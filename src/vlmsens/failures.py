"""What a failed job says, and which failures a retry may fix.

Every exception a job raises ends its rule log with one line: what failed (the job), the error and
the file it names, and what to do. Only a CUDA out-of-memory error can be fixed by trying again with
a smaller batch, so only it is retried.

Retries: rules autoquant and validate declare ``retries`` and halve ``resources.batch_size`` per
attempt (rules/common.smk), but Snakemake retries a failed job whatever the error. So each attempt
leaves a marker next to its log saying how it failed (:func:`record`), and an attempt after the
first reads it before doing any work (:func:`earlier_failure`): when the earlier attempt failed with
anything but an out-of-memory error, this attempt fails at once with that error's line instead of
loading the model again. Attempt 1 removes any marker a previous run left, and a success removes it.
A killed attempt leaves no marker, so the next attempt runs normally.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import VlmsensError

_OOM_TEXT = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_oom(err: BaseException) -> bool:
    """True for torch's OutOfMemoryError, or a RuntimeError saying CUDA ran out of memory (also as cause)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, torch.cuda.OutOfMemoryError
            return True
        if isinstance(err, RuntimeError) and any(text in str(err) for text in _OOM_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def describe(err: BaseException, job: str, inputs: Mapping[str, Any] | None = None, batch_size: int | None = None) -> str:
    """The one line that ends the log of a job that raised ``err``."""
    if isinstance(err, VlmsensError):
        return f"{job} failed: {' '.join(str(err).split())}"
    what = f"{type(err).__name__}: {_first_line(err)}"
    if is_oom(err):
        at = f" at batch size {batch_size}" if batch_size else ""
        return (f"{job} failed: CUDA out of memory{at} ({what}). Snakemake retries it with half the batch while "
                "retries remain; if the last attempt fails too, lower autoquant.batch_size or free the GPU")
    filename = getattr(err, "filename", None)
    if isinstance(err, OSError) and filename:
        return f"{job} failed on file {filename}: {what}. Check that the file exists, is readable and is not damaged"
    if isinstance(err, KeyboardInterrupt | SystemExit):
        return f"{job} was interrupted ({what}); outputs it had started were removed: run it again"
    listed = ", ".join(str(v) for v in _flat(inputs)) if inputs else ""
    on = f" (inputs: {listed})" if listed else ""
    return (f"{job} failed with {what}{on}. The traceback above shows where; the config check knows no cause for "
            "it, so check the inputs named, and report it with this log if they are fine")


def _flat(inputs: Mapping[str, Any]) -> list[Any]:
    out: list[Any] = []
    for value in inputs.values():
        out.extend(value if isinstance(value, list | tuple) else [value])
    return out


def marker_path(log_path: str | os.PathLike) -> Path:
    """Where an attempt records how it failed: a hidden file beside the rule log."""
    log = Path(log_path)
    return log.with_name(f".{log.name}.failure.json")


def record(log_path: str | os.PathLike | None, err: BaseException, line: str, attempt: int, trace: str = "") -> None:
    """Keep how this attempt failed; Snakemake deletes the log before a retry, so the trace goes here too."""
    if not log_path:
        return
    path = marker_path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"attempt": attempt, "oom": is_oom(err), "error": type(err).__name__, "line": line,
                                "traceback": trace}) + "\n")


def clear(log_path: str | os.PathLike | None) -> None:
    if log_path:
        marker_path(log_path).unlink(missing_ok=True)


def earlier_failure(log_path: str | os.PathLike | None, attempt: int) -> tuple[str, str] | None:
    """On a retry: (traceback, line) of the earlier attempt's failure when a retry cannot fix it, else None.

    Attempt 1 clears a stale marker instead (it is the first attempt of a new run).
    """
    if not log_path:
        return None
    if attempt <= 1:
        clear(log_path)
        return None
    try:
        previous = json.loads(marker_path(log_path).read_text())
    except (OSError, ValueError):
        return None  # killed without a record: try again
    if previous.get("oom"):
        return None
    line = (f"not retried: attempt {previous.get('attempt')} failed with {previous.get('error')}, which a smaller "
            f"batch cannot fix. {previous.get('line')}")
    return previous.get("traceback") or "", line
