"""Logging for workflow scripts: to the rule's log file and to stderr, with a cell prefix."""

from __future__ import annotations

import logging
import sys
import warnings

from .errors import VlmsensError


def setup(log_path: str | None, prefix: str = "", mode: str = "w") -> logging.Logger:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode=mode))
    fmt = "%(asctime)s %(levelname)s " + (f"[{prefix}] " if prefix else "") + "%(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)
    logging.captureWarnings(True)
    # ModelOpt warns once per custom format that results "may not be optimal"; keep the log readable.
    warnings.filterwarnings("ignore", message="Received custom quantization formats")
    return logging.getLogger("vlmsens")


def run_logged(log_path: str | None, prefix: str, func, *args, log_mode: str = "w", **kwargs):
    """Run ``func`` with logging set up; a VlmsensError becomes a one-paragraph error and exit 1.

    ``log_mode="a"`` continues a log the script already started (e.g. with the GPU slot it took).
    """

    logger = setup(log_path, prefix, mode=log_mode)
    try:
        return func(*args, progress=logger.info, **kwargs) if _takes_progress(func) else func(*args, **kwargs)
    except VlmsensError as err:
        logger.error("%s", err)
        sys.exit(1)


def _takes_progress(func) -> bool:
    import inspect

    return "progress" in inspect.signature(func).parameters
