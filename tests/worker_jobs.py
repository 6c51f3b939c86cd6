"""Jobs for tests/test_worker.py: importable by the worker server (tests/ is put on its PYTHONPATH)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

from vlmsens.errors import VlmsensError

log = logging.getLogger("worker_jobs")


def report(out: str, progress=log.info) -> None:
    import gc
    import sys

    preloaded = "modelopt.torch.quantization" in sys.modules
    import torch

    progress(f"job running in pid {os.getpid()}")
    with open(out, "w") as fh:
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "threads": torch.get_num_threads(), "modelopt_preloaded": preloaded,
                   "frozen_objects": gc.get_freeze_count()}, fh)


def fail_clearly(progress=log.info) -> None:
    raise VlmsensError("calibration DB /x/y.db holds no samples")


def crash(progress=log.info) -> None:
    raise RuntimeError("an unexpected failure deep inside")


def die(progress=log.info) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_forever(out: str, progress=log.info) -> None:
    with open(out, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(120)


def keep_model(state: str, out: str, progress=log.info) -> None:
    """A cell's job as the handoff sees it: it writes its search state and keeps a "model" for it."""
    from vlmsens import handoff

    with open(state, "w") as fh:
        fh.write(f"search state written by {os.getpid()}")
    handoff.offer({"kept_by": os.getpid()})
    handoff.seal(state)
    with open(out, "w") as fh:
        json.dump({"pid": os.getpid()}, fh)


def take_model(state: str, out: str, progress=log.info) -> None:
    """A validation's job as the handoff sees it: the kept model of ``state``, if this process holds it."""
    from vlmsens import handoff

    with open(out, "w") as fh:
        json.dump({"pid": os.getpid(), "took": handoff.take(state)}, fh)
