"""A cell's search model, kept by the process that ran the cell for the cell's validation to run in next.

A validation job rebuilds the cell's quantized model: it loads the checkpoint, then ModelOpt converts
it and restores every format's calibrated quantizers from the cell's search state, and the fused
kernels pay their first use (together about 7 s of every validation at full size, bench/RESULTS.md).
The process that has just run the cell holds that very model. When the warm worker
(``vlmsens.worker``) runs a cell, its process offers the search model here once the cell's outputs
are written and stays, holding it, until the worker hands it the next job: the cell's validation
(rule ``validate`` outranks rule ``autoquant``, so Snakemake starts it next) takes the model instead of
rebuilding it. Any other job makes the worker end the holding process first, so one job's model
never shares a GPU with another job.

The model is taken only for the very search-state file it wrote (its path and SHA-256; Snakemake
touches a job's outputs after it, so times say nothing): a cell rerun, or a file changed in between,
falls back to the rebuild. Outside the worker's
processes (``enable`` not called: in-process jobs, SLURM, tests) nothing is kept.
"""

from __future__ import annotations

import os
from typing import Any

from .io import sha256_file

_enabled = False
_offered: Any = None
_held: tuple[str, Any] | None = None


def enable() -> None:
    """Let this process keep a cell's model (the worker's processes call it before each job)."""
    global _enabled
    _enabled = True


def state_key(path: str | os.PathLike) -> str:
    """What identifies a search-state file as written: its path and content (MBs at full size)."""
    return f"{os.path.realpath(path)}:{sha256_file(path)}"


def offer(model: Any) -> None:
    """The cell's search model, kept (where enabled) until :func:`seal` names its written state file."""
    global _offered
    if _enabled:
        _offered = model


def seal(state_path: str | os.PathLike) -> str | None:
    """Hold the offered model for the search state now written at ``state_path``; returns its key."""
    global _offered, _held
    if _offered is None:
        return None
    _held, _offered = (state_key(state_path), _offered), None
    return _held[0]


def held_key() -> str | None:
    """The key of the model this process holds, if any."""
    return _held[0] if _held is not None else None


def take(state_path: str | os.PathLike) -> Any:
    """The held model if it belongs to the search state at ``state_path`` (and no longer held), else None."""
    global _held
    if _held is None:
        return None
    key, model = _held
    _held = None
    try:
        same = key == state_key(state_path)
    except OSError:
        return None
    return model if same else None


def drop() -> None:
    """Forget whatever is offered or held."""
    global _offered, _held
    _offered = _held = None
