"""One GPU per job on a multi-GPU host: a pool of slots, one ``flock``-ed lock file per device.

Snakemake counts GPUs (``--resources gpu=N`` runs at most N GPU jobs at once) but never says which
GPU a job gets: every job would see every device and all of them would start on ``cuda:0``. The
AutoQuant script therefore enters :func:`gpu_slot` before it imports torch. The slot pins the job to
one free device by setting ``CUDA_VISIBLE_DEVICES`` to it, and holds that device's lock file for the
whole job.

* Devices: ``devices`` when given (``"0,1"`` or a list), else the entries of ``CUDA_VISIBLE_DEVICES``
  when set (indices, ``GPU-<uuid>`` or ``MIG-<uuid>``), else ``nvidia-smi -L``. No device: no pinning,
  the pool is a no-op and the log says so (the CPU demo).
* Under SLURM (``SLURM_JOB_ID`` set) the job uses what SLURM allocated and locks nothing: SLURM
  already gave it its own GPU(s) through ``CUDA_VISIBLE_DEVICES``.
* Locks: ``<lock_dir>/<host>/gpu-<device>.lock``, held with an exclusive ``fcntl.flock``. The kernel
  drops the lock when the holding process dies, however it dies (``kill -9``, OOM killer), so a
  crashed job never leaves a slot taken: the next job simply takes it. The file itself stays, with
  the last holder's pid, host and start time in it; a job that finds it from a dead pid logs that it
  reclaimed the slot. A slot whose lock is held although the recorded pid is dead (a child that the
  job forked still has the file open) is named in the wait message, with what to do.
* All slots busy: wait, polling, for ``timeout`` seconds (``VLMSENS_GPU_SLOT_TIMEOUT``, default
  2 h), then raise :class:`GpuSlotTimeout`, which lists each slot's holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import handoff, worker
from .errors import AlreadyReported, VlmsensError
from .logs import job_attempt, run_job

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 7200.0
TIMEOUT_ENV = "VLMSENS_GPU_SLOT_TIMEOUT"
_NO_DEVICE_TOKENS = {"", "-1", "none", "nodevfiles", "void"}


class GpuSlotTimeout(VlmsensError):
    """Every GPU slot stayed busy for longer than the timeout."""


@dataclass(frozen=True)
class Slot:
    """What :func:`gpu_slot` gave the job."""
    device: str | None
    """The CUDA_VISIBLE_DEVICES value the job runs with; None when nothing was pinned."""
    mode: str
    """``pool`` (a locked slot), ``slurm`` (SLURM's allocation, no lock) or ``none`` (no GPU)."""
    lock_path: str | None = None


def parse_visible_devices(value: str | None) -> list[str]:
    """The device entries of a CUDA_VISIBLE_DEVICES value; [] when it hides every device.

    CUDA stops at the first invalid entry, so ``-1`` (or an empty value) hides all devices after it.
    """
    if value is None:
        return []
    devices = []
    for token in value.split(","):
        token = token.strip()
        if token.lower() in _NO_DEVICE_TOKENS:
            break
        devices.append(token)
    return devices


def detect_devices(env: Mapping[str, str] | None = None) -> list[str]:
    """Devices this process may use: CUDA_VISIBLE_DEVICES when set, else ``nvidia-smi -L``, else []."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return parse_visible_devices(env["CUDA_VISIBLE_DEVICES"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    # "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)"; MIG instances are indented lines under a GPU.
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", out, flags=re.MULTILINE)]


def _as_list(devices: str | Sequence[str | int]) -> list[str]:
    if isinstance(devices, str):
        return parse_visible_devices(devices)
    return [str(d).strip() for d in devices if str(d).strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) holds no lock any more
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_holder(path: Path) -> dict:
    try:
        text = path.read_text().strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _describe_holder(holder: dict, host: str) -> str:
    if not holder:
        return "holder unknown"
    pid = holder.get("pid")
    since = holder.get("since", "?")
    text = f"pid {pid} on {holder.get('host', '?')} since {since}"
    if holder.get("host") == host and isinstance(pid, int) and not _pid_alive(pid):
        text += (
            f" (that pid is dead: a process it forked still holds the lock file open; "
            f"find it with `fuser -v {holder.get('lock', 'the lock file')}` and stop it to free the slot)"
        )
    return text


def _lock_name(device: str) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock on ``path``, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


@contextlib.contextmanager
def _pinned(value: str | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES=value inside, the previous value (or none) restored after."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


@contextlib.contextmanager
def gpu_slot(
    lock_dir: str | os.PathLike,
    devices: str | Sequence[str | int] | None = None,
    *,
    timeout: float | None = None,
    poll: float = 0.5,
) -> Iterator[Slot]:
    """Hold one free GPU for the block; inside it, CUDA_VISIBLE_DEVICES names that GPU only.

    Enter it before ``import torch`` (CUDA reads CUDA_VISIBLE_DEVICES once, at initialisation).
    ``devices`` overrides detection (``"0,1"``); ``timeout`` (seconds) defaults to
    ``$VLMSENS_GPU_SLOT_TIMEOUT`` or 2 h.
    """
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))

    if devices is None and os.environ.get("SLURM_JOB_ID"):
        job = os.environ["SLURM_JOB_ID"]
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            given = os.environ["CUDA_VISIBLE_DEVICES"]
            log.info("GPU slot: SLURM job %s, using the GPU(s) SLURM allocated: CUDA_VISIBLE_DEVICES=%s (no local lock)",
                     job, given)
            yield Slot(device=given, mode="slurm")
        else:
            log.info("GPU slot: SLURM job %s has no GPU allocated (CUDA_VISIBLE_DEVICES unset): no pinning", job)
            yield Slot(device=None, mode="none")
        return

    pool = detect_devices() if devices is None else _as_list(devices)
    if not pool:
        log.info("GPU slot: no CUDA device visible (CUDA_VISIBLE_DEVICES unset or empty, no nvidia-smi GPU): "
                 "the GPU slot pool is a no-op, nothing pinned")
        yield Slot(device=None, mode="none")
        return

    host = socket.gethostname()
    # Per host: a lock dir on a shared file system must not make two hosts' GPU 0 one slot.
    folder = Path(lock_dir) / host
    folder.mkdir(parents=True, exist_ok=True)
    paths = {dev: folder / _lock_name(dev) for dev in pool}

    start = time.monotonic()
    announced = False
    while True:
        for dev in pool:
            fd = _try_lock(paths[dev])
            if fd is not None:
                break
        else:
            waited = time.monotonic() - start
            holders = "; ".join(f"GPU {d}: {_describe_holder(_read_holder(p), host)}" for d, p in paths.items())
            if waited >= timeout:
                msg = (f"all {len(pool)} GPU slot(s) {pool} stayed busy for {waited:.0f} s (timeout {timeout:.0f} s, "
                       f"${TIMEOUT_ENV}); lock files in {folder}. Holders: {holders}. More GPU jobs run at once than "
                       f"this host has GPUs: run snakemake with --resources gpu=N, N at most {len(pool)}, or wait "
                       f"for the holders to finish.")
                log.error("GPU slot: %s", msg)
                raise GpuSlotTimeout(msg)
            if not announced:
                log.info("GPU slot: all %d slot(s) busy (%s); waiting up to %.0f s", len(pool), holders, timeout)
                announced = True
            time.sleep(poll)
            continue
        break

    path = paths[dev]
    try:
        previous = _read_holder(path)
        if previous.get("host") == host and isinstance(previous.get("pid"), int) and previous["pid"] != os.getpid():
            state = "alive" if _pid_alive(previous["pid"]) else "dead"
            log.info("GPU slot: reclaimed the lock of GPU %s last held by pid %s (%s, its lock released by the kernel)",
                     dev, previous["pid"], state)
        holder = {"pid": os.getpid(), "host": host, "device": dev, "lock": str(path),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        waited = time.monotonic() - start
        log.info("GPU slot: took GPU %s of %s (CUDA_VISIBLE_DEVICES=%s, lock %s%s)", dev, ",".join(pool), dev, path,
                 f", after waiting {waited:.0f} s" if waited >= 1 else "")
        with _pinned(dev):
            yield Slot(device=dev, mode="pool", lock_path=str(path))
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty file: nobody holds the slot
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        log.info("GPU slot: released GPU %s", dev)


def gpu_job_environment(smk) -> dict[str, str]:
    """What a GPU job sets before torch loads (defaults: the caller's environment wins)."""
    return {
        # ModelOpt JIT-builds its CUDA extensions on first use; read at import, so set before torch loads.
        "TORCH_EXTENSIONS_DIR": os.path.abspath(smk.params.extensions_cache),
        # Large ragged batches fragment the caching allocator (a quarter of the peak on an H100, bench/RESULTS.md).
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    }


def _use_gpu_job_environment(smk) -> None:
    for key, value in gpu_job_environment(smk).items():
        os.environ.setdefault(key, value)


def warm_gpu_worker(smk) -> None:
    """From a CPU job that GPU jobs wait for (sample encoding): have the warm worker import for the
    GPU the first GPU job will take (the pool's first), so that job finds a standby ready.

    Its rule declares the GPU rules' ``params.extensions_cache`` and ``params.gpu_locks``: the
    server's fingerprint covers the environment, which must be the GPU jobs'. A no-op under SLURM or
    with the worker off; never fails the job (the GPU job then starts the worker as before).
    """
    if not worker.enabled():
        return
    saved = dict(os.environ)
    try:
        _use_gpu_job_environment(smk)
        devices = detect_devices()
        gpus = devices[0] if devices else os.environ.get("CUDA_VISIBLE_DEVICES")
        pids = worker.warm(worker.address_for(smk.params.gpu_locks), gpus)
        log.info("worker: %d standby(s) importing for GPU %s ahead of the GPU jobs", len(pids), gpus)
    except (worker.WorkerUnavailable, OSError) as err:
        log.info("worker: not warmed ahead of the GPU jobs (%s)", err)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _in_worker_or_here(smk, prefix: str, func, job_kwargs: dict, progress, takes_cell_model: bool = False):
    """``func(**job_kwargs)`` in a standby of the warm worker (for this job's CUDA_VISIBLE_DEVICES), else here.

    ``takes_cell_model``: the job reads a cell's search state (input ``state``) and runs in the process
    that holds that cell's model, where one does (``vlmsens.handoff``)."""
    if worker.enabled():
        take = handoff.state_key(smk.input.state) if takes_cell_model else None
        try:
            code = worker.run_job(worker.address_for(smk.params.gpu_locks), func, job_kwargs, log_path=smk.log[0],
                                  prefix=prefix, threads=smk.threads, attempt=job_attempt(smk),
                                  inputs={k: str(v) for k, v in smk.input.items()}, take=take)
        except worker.WorkerUnavailable as err:
            log.warning("worker: %s; running the job in this process", err)
        else:
            if code:
                raise AlreadyReported(code)
            return None
    import torch

    torch.set_num_threads(smk.threads)
    return func(progress=progress, **job_kwargs)


def run_gpu_job(smk, prefix: str, func, takes_cell_model: bool = False, **kwargs):
    """A Snakemake GPU job: log set-up, one GPU slot, the job's torch threads, then ``func(**kwargs)``.

    ``takes_cell_model``: see ``_in_worker_or_here`` (rule validate).

    ``smk`` is the script's ``snakemake`` object; its rule declares ``params.extensions_cache`` (one
    ModelOpt extension cache for every job, so only the first builds) and ``params.gpu_locks``. Runs
    through :func:`vlmsens.logs.run_job`, so a retry after an error a smaller batch cannot fix stops
    before it waits for a GPU.
    """
    _use_gpu_job_environment(smk)

    def in_slot(progress, **job_kwargs):
        # Pinned through CUDA_VISIBLE_DEVICES before torch loads; SLURM's allocation under SLURM.
        with gpu_slot(smk.params.gpu_locks):
            return _in_worker_or_here(smk, prefix, func, job_kwargs, progress, takes_cell_model)

    # Appending: a worker's child writes to the same log while this process holds it open.
    return run_job(smk, prefix, in_slot, log_mode="a", **kwargs)


def run_cpu_job_warm(smk, prefix: str, func, **kwargs):
    """A CPU job that needs what the GPU jobs import (ModelOpt: about 20 s of a fresh process), run in
    one of the warm worker's standbys that see no GPU; in its own process under SLURM or with the
    worker off. Its rule declares the GPU rules' ``params.extensions_cache`` and ``params.gpu_locks``,
    so the GPU jobs' server (same environment, same fingerprint) serves it.
    """
    _use_gpu_job_environment(smk)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # its standbys import with no GPU visible: a CPU job touches none

    def here_or_warm(progress, **job_kwargs):
        return _in_worker_or_here(smk, prefix, func, job_kwargs, progress)

    return run_job(smk, prefix, here_or_warm, log_mode="a", **kwargs)
