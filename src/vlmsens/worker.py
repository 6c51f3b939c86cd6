"""A warm process per host that runs GPU jobs (and the CPU jobs that import ModelOpt), so that each job does not pay the imports again.

About 20 s of every AutoQuantize or validation job is Python importing torch, transformers and
ModelOpt (ModelOpt alone pulls in torch._dynamo, sympy and its plugins). With the worker, the
first GPU job of a run starts one light server process (it imports no torch). The server keeps,
for each GPU set that jobs are pinned to, one *standby*: a fork that has imported everything with
that GPU set visible and waits. A job sends its work to the server, which hands it to the standby
of the job's GPUs; the standby takes the job's log and threads, runs the job in itself and exits,
and the server starts the next standby at once, so its imports overlap the running job
(``VLMSENS_WORKER_STANDBYS`` standbys wait per GPU set, default 2).

What stays as without it:

* each cell is still its own Snakemake job and file target; the job process holds its GPU slot
  (``vlmsens.gpupool``) for the whole run of its standby, so one cell holds a GPU at a time;
* a crash costs one cell: the standby's exit status (or the signal that killed it) becomes the
  job's exit status, and a job process that is killed (Ctrl-C, ``--forcerun`` elsewhere, a
  scheduler) takes its standby with it: the server kills it as soon as the job's connection drops;
* no process forks after CUDA started: an import in ModelOpt's tree initialises the CUDA driver,
  so the imports run in the standby, after its fork, with its GPUs already visible.

Protocol: one Unix socket per (results folder, host), owner-only; a JSON line per message. The
server answers ``ping`` with its fingerprint (interpreter, package versions, the vlmsens sources'
sizes and times, the environment that affects results); a job whose fingerprint differs (the code
was edited, another venv) asks that server to retire and starts a new one. A server with no job for
``VLMSENS_WORKER_IDLE_S`` seconds (default 300) exits and removes its socket.

A cell's process may stay after its job, holding the cell's search model (``vlmsens.handoff``):
it tells the server so over its channel instead of exiting, and the server answers the job (done)
and keeps the process as a *holder* of the job's GPU set. A job for that GPU set that names the
same search state (``take``: the cell's validation) runs in the holder, without loading and
restoring the model again. Where the set names GPUs, any other job for it ends the holder first (its
GPU memory is free before the next job starts), so a GPU holds at most one held model; CPU jobs
(no GPU visible) keep up to ``VLMSENS_WORKER_STANDBYS`` holders. ``VLMSENS_WORKER_HOLD_S`` seconds
(default 30) without a job that takes its model end a holder too.

``VLMSENS_WORKER=0`` runs every job in its own process as before; under SLURM (``SLURM_JOB_ID``)
each job is its own allocation, so jobs always run in-process there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from . import handoff
from .logs import run_logged

log = logging.getLogger(__name__)

ENABLE_ENV = "VLMSENS_WORKER"
IDLE_ENV = "VLMSENS_WORKER_IDLE_S"
START_TIMEOUT_ENV = "VLMSENS_WORKER_START_S"
STANDBYS_ENV = "VLMSENS_WORKER_STANDBYS"
HOLD_ENV = "VLMSENS_WORKER_HOLD_S"
# A GPU job after the cell ends the holder at once; this bounds the wait only when none comes (a run
# that asked for the cell alone): GPU memory held idle that long. Validations follow within seconds.
DEFAULT_HOLD_S = 30.0
# Two standbys per GPU set: a standby's imports take about 17 s (H100 host), longer than a small
# cell, so with one the next job often waited for the rest of them (bench/RESULTS.md).
DEFAULT_STANDBYS = 2
DEFAULT_IDLE_S = 300.0
DEFAULT_START_TIMEOUT_S = 600.0
# Environment a job passes to its child: what the job's own pinning and caches set.
JOB_ENV = ("CUDA_VISIBLE_DEVICES", "TORCH_EXTENSIONS_DIR")
# Environment that changes what a job computes or loads; part of the fingerprint.
FINGERPRINT_ENV = ("PYTHONPATH", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_EXTENSIONS_DIR",
                   "PYTORCH_CUDA_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG")
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "transformers.models.qwen2_5_vl.processing_qwen2_5_vl",
    "transformers.models.qwen3_vl.processing_qwen3_vl",
    "modelopt.torch.quantization",
    "modelopt.torch.opt",
    "liger_kernel.transformers.functional",
    "scipy.stats",
    "vlmsens.autoquant",
    "vlmsens.cell",
    "vlmsens.validation",
    "vlmsens.render",
    "torch._dynamo",
)


def preload() -> float:
    """Import what every GPU job needs and pay torch's lazy first-use costs; returns the seconds spent.

    torch.utils.checkpoint (used by ModelOpt's score phase) imports torch._dynamo on its first call,
    several seconds inside the first batch; one call here on a one-element CPU tensor pays it, without
    touching CUDA or starting thread pools.
    """
    import importlib

    started = time.perf_counter()
    for name in PRELOAD:
        importlib.import_module(name)
    import torch
    import torch.utils.checkpoint

    x = torch.zeros(1, requires_grad=True)
    torch.utils.checkpoint.checkpoint(torch.neg, x, use_reentrant=False).sum().backward()
    torch.compile(torch.neg, dynamic=True)  # decorating only: torch.compile's own first-call set-up
    return time.perf_counter() - started


def freeze_imported() -> int:
    """Keep what the imports made out of every later garbage collection; returns how many objects that is.

    A standby holds some 600,000 objects from its imports (modules, functions, sympy's tables), and
    every full collection walks them all: about 0.4 s each, and ModelOpt's AutoQuantize collects
    twice per search, besides the collections the job's own allocations trigger. The imported
    objects live as long as the process, so ``gc.freeze`` (Python's idiom for processes that import
    once and then work) moves them where collections do not look; what the job creates is collected
    as usual.
    """
    import gc

    gc.collect()  # nothing unreachable is frozen
    gc.freeze()
    return gc.get_freeze_count()


CANNOT_RUN_HERE = 75  # a child's exit status: the job did not start; run it in-process


def _gpu_expected() -> bool:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible.strip() not in ("", "-1")
    import torch

    return torch.cuda._device_count_nvml() > 0


class WorkerUnavailable(RuntimeError):
    """The worker cannot take the job; the job runs in its own process instead."""


def enabled(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        return False
    return env.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off", "")


def address_for(results_dir: str | os.PathLike) -> str:
    """The socket of the worker serving ``results_dir`` on this host (short: sockets cap paths at 107 bytes)."""
    key = hashlib.sha256(f"{socket.gethostname()}:{Path(results_dir).resolve()}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"vlmsens-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return str(folder / f"{key}.sock")


def fingerprint() -> str:
    """What must match between a job and the server that runs it."""
    from importlib import metadata

    package = Path(__file__).resolve().parent
    sources = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in package.glob("*.py"))
    versions = {}
    for dist in ("torch", "transformers", "nvidia-modelopt", "vlmsens"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    payload = {
        "python": sys.executable,
        "package": str(package),
        "sources": sources,
        "versions": versions,
        "env": {k: os.environ.get(k) for k in FINGERPRINT_ENV},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- the job's side --------------------------------------------------------------------------------

def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


def _receive(sock: socket.socket) -> dict[str, Any] | None:
    """One message, or None when the other side closed the connection."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def _connect(address: str, timeout: float | None = 5.0) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        return None
    return sock


def _ask(address: str, message: dict[str, Any]) -> dict[str, Any] | None:
    sock = _connect(address)
    if sock is None:
        return None
    with sock:
        try:
            _send(sock, message)
            return _receive(sock)
        except OSError:
            return None


def ensure_server(address: str, expected: str, *, start_timeout: float | None = None) -> None:
    """A server with fingerprint ``expected`` listening at ``address``: found, or started and awaited."""
    if start_timeout is None:
        start_timeout = float(os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))
    lock_path = address + ".lock"
    failed_path = Path(address + ".failed")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one job starts the server; the others wait for it here
        if failed_path.is_file() and failed_path.read_text().split("\n", 1)[0] == expected:
            raise WorkerUnavailable(f"a server for this code and settings failed to start before ({failed_path}: "
                                    + failed_path.read_text().split("\n", 1)[-1].strip() + ")")
        try:
            _start_or_find(address, expected, start_timeout)
        except WorkerUnavailable as err:
            failed_path.write_text(f"{expected}\n{err}\n")  # later jobs of this code skip the attempt
            raise


def _start_or_find(address: str, expected: str, start_timeout: float) -> None:
    answer = _ask(address, {"op": "ping"})
    if answer is not None and answer.get("fingerprint") == expected:
        return
    if answer is not None:
        log.info("worker: the running server was started for other code or settings; retiring it")
        retire(address, wait_s=30.0)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)
    server_log = address.removesuffix(".sock") + ".log"
    env = dict(os.environ)
    # The server imports no torch, and sees no GPU besides, so nothing in it can start the CUDA
    # driver before it forks a standby (a fork after that sees no GPU). Each standby sets its own.
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # is_available() without initialising CUDA
    with open(server_log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlmsens.worker", "--address", address, "--fingerprint", expected],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    log.info("worker: starting a server (pid %d, log %s): imports once for the jobs that follow", proc.pid, server_log)
    started = time.monotonic()
    while time.monotonic() - started < start_timeout:
        if proc.poll() is not None:
            raise WorkerUnavailable(f"the worker server exited with status {proc.returncode} while starting; see {server_log}")
        answer = _ask(address, {"op": "ping"})
        if answer is not None:
            if answer.get("fingerprint") != expected:
                raise WorkerUnavailable(f"the worker server came up with another fingerprint; see {server_log}")
            log.info("worker: server ready after %.1f s", time.monotonic() - started)
            return
        time.sleep(0.2)
    proc.kill()
    raise WorkerUnavailable(f"the worker server did not come up within {start_timeout:.0f} s; see {server_log}")


def _wait_gone(address: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while os.path.exists(address) and time.monotonic() < end:
        time.sleep(0.1)


def retire(address: str, wait_s: float = 0.0) -> None:
    """Ask the server at ``address``, if one listens, to retire (its standbys and holders end; running
    jobs finish first), then wait up to ``wait_s`` for its socket to go (also when it did not answer:
    a busy server may still be exiting)."""
    _ask(address, {"op": "retire"})
    _wait_gone(address, timeout=wait_s)


def run_job(address: str, func, kwargs: dict[str, Any], *, log_path: str, prefix: str, threads: int,
            attempt: int = 1, inputs: dict[str, str] | None = None, take: str | None = None) -> int:
    """Run ``func(**kwargs)`` in a child of the warm server; returns its exit status (0 = done).

    ``take``: the ``vlmsens.handoff.state_key`` of a cell's search state; the job runs in the process
    that holds that cell's model, if one does. Raises WorkerUnavailable when the server cannot take
    the job (nothing has run then).
    """
    expected = fingerprint()
    ensure_server(address, expected)
    request = {
        "op": "run",
        "fingerprint": expected,
        "func": f"{func.__module__}:{func.__qualname__}",
        "kwargs": kwargs,
        "log": os.path.abspath(log_path),
        "prefix": prefix,
        "threads": int(threads),
        "attempt": int(attempt),
        "inputs": inputs or {},
        "env": {k: os.environ.get(k) for k in JOB_ENV},
        "take": take,
    }
    sock = _connect(address)
    if sock is None:
        raise WorkerUnavailable(f"cannot connect to the worker at {address}")
    with sock:
        sock.settimeout(None)
        try:
            payload = json.dumps(request)
        except TypeError as err:
            raise WorkerUnavailable(f"the job's arguments are not JSON ({err})") from None
        started = time.monotonic()
        sock.sendall((payload + "\n").encode())
        answer = _receive(sock)
    if answer is None:
        log.error("worker: the server closed the connection before the job finished (the server died?)")
        return 1
    if "error" in answer:
        raise WorkerUnavailable(answer["error"])
    log.info("worker: job finished in %.1f s in child pid %s: %s", time.monotonic() - started, answer.get("pid"),
             answer.get("status"))
    return int(answer["exit"])


def warm(address: str, gpus: str | None, *, start_timeout: float = 60.0) -> list[int]:
    """Have the server (started if need be) ready its standbys for the GPU set ``gpus`` (the
    ``CUDA_VISIBLE_DEVICES`` value a job will run with) before any GPU job asks; returns their pids.

    For the jobs that GPU jobs wait for: the first GPU job of a run otherwise waits for a standby's
    imports (about 20 s, more while those jobs load the CPUs). Raises WorkerUnavailable.
    """
    expected = fingerprint()
    ensure_server(address, expected, start_timeout=start_timeout)
    answer = _ask(address, {"op": "warm", "fingerprint": expected, "gpus": gpus})
    if answer is None or "error" in answer:
        raise WorkerUnavailable((answer or {}).get("error", f"no answer from the worker at {address}"))
    return answer["standbys"]


# --- the server's side -----------------------------------------------------------------------------

def _resolve(ref: str):
    import importlib

    module, _, name = ref.partition(":")
    target = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def _child(request: dict[str, Any]) -> int:
    """In the standby that takes the job: the job's environment, log and threads, then the job itself."""
    for key, value in request["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    import torch

    # Without NVML (no GPU driver) an import's is_available() marks every fork "bad"; that only
    # matters to a child that will use a GPU.
    if torch.cuda._is_in_bad_fork() and _gpu_expected():
        print("worker: CUDA was touched before the fork; running the job in its own process instead", file=sys.stderr)
        return CANNOT_RUN_HERE
    if _gpu_expected():
        # An import may have initialised the CUDA driver in the server while no GPU was visible
        # (a native call, not torch's own lazy init): the fork then sees no device at all.
        try:
            torch.cuda.init()
        except RuntimeError as err:
            print(f"worker: this fork cannot use the GPU ({err}); running the job in its own process instead", file=sys.stderr)
            return CANNOT_RUN_HERE
    torch.set_num_threads(request["threads"])
    if torch.cuda.is_available():
        _reload_gpu_kernels()
    handoff.enable()
    try:
        # The job's own log: a failure is recorded beside it (OOM or not) for Snakemake's retry.
        run_logged(request["log"], request["prefix"], _resolve(request["func"]), log_mode="a",
                   job_attempt=request.get("attempt", 1), job_inputs=request.get("inputs"), **request["kwargs"])
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _reload_gpu_kernels() -> None:
    """Run the import-time GPU checks of ModelOpt's Triton kernels again, now that the job's GPU is
    visible (the server imported them with no GPU visible, so they were left out)."""
    import importlib

    import modelopt.torch.kernels.quantization.gemm as gemm

    importlib.reload(gemm)


class _Standby:
    """A fork of the server that imports everything a job needs, pinned to one GPU set, then waits for
    one job and runs it in itself.

    The imports run after the fork with the job's GPUs visible: a native call during ModelOpt's
    import tree initialises the CUDA driver (on an H100 host with torch 2.11; torch's own lazy init
    is not involved), and a process forked after that cannot use CUDA at all. The server itself
    therefore imports no torch; the next standby for the same GPUs starts importing as soon as this
    one takes a job, so its imports overlap the running job.
    """

    def __init__(self, gpus: str | None):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent.close()
            code = 1
            try:
                code = _standby_main(gpus, child)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        child.close()
        self.gpus, self.pid, self.channel = gpus, pid, parent
        self.buffer = b""
        self.holding: str | None = None  # the handoff key of the model it holds, once its job is done
        self.since = 0.0

    def hand(self, request: dict[str, Any]) -> bool:
        """Give this standby (or holder) its job; False when it is gone (it died while importing)."""
        try:
            self.channel.sendall((json.dumps(request) + "\n").encode())
            return True
        except OSError:
            self.channel.close()
            return False

    def message(self) -> dict[str, Any] | None:
        """A message the process sent (its job done, a model held), once one is complete; None until then.
        An empty dict: the channel closed (the process exits)."""
        try:
            chunk = self.channel.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            return {}
        self.buffer += chunk
        if not self.buffer.endswith(b"\n"):
            return None
        line, self.buffer = self.buffer, b""
        return json.loads(line)

    def kill(self, wait: bool = False) -> None:
        """End the process (and its group); with ``wait``, until it is gone (its GPU memory freed)."""
        self.channel.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if wait:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


def _standby_main(gpus: str | None, channel: socket.socket) -> int:
    os.setsid()  # the job and whatever it spawns (ninja builds) form one group, killed together
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    if gpus is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    failed = None
    try:
        spent = preload()
        frozen = freeze_imported()
        print(f"worker: standby {os.getpid()} for GPUs {gpus!r} ready after {spent:.1f} s of imports "
              f"({frozen} objects kept out of garbage collection)", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001
        failed = traceback.format_exc()
    with channel.makefile("rb") as reader:
        line = reader.readline()
        if not line:
            return 0  # the server retired this standby before any job came
        request = json.loads(line)
        if failed:
            with contextlib.suppress(OSError), open(request["log"], "a") as job_log:
                job_log.write(f"worker: the standby's imports failed; running the job in its own process instead\n{failed}")
            return CANNOT_RUN_HERE
        code = _child(request)
        key = handoff.held_key()
        if code != 0 or key is None:
            return code
        # the job is done and this process holds its cell's model: say so, and wait for the job that takes it
        with contextlib.suppress(OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        channel.sendall((json.dumps({"done": 0, "holding": key}) + "\n").encode())
        line = reader.readline()
        if not line:
            return 0  # the server ended the hold
        code = _child(json.loads(line))
        handoff.drop()
        return code


def _names_gpus(gpus: str | None) -> bool:
    """Whether a job's CUDA_VISIBLE_DEVICES value makes GPUs visible (a GPU set) rather than none (CPU jobs)."""
    return gpus is not None and gpus.strip() not in ("", "-1")


class _Holders:
    """The processes that hold a cell's model (``vlmsens.handoff``), per GPU set, and when each must end.

    A set that names GPUs keeps one: a GPU holds at most one held model, and any job for it that does
    not take that model ends it first. CPU jobs' sets keep up to ``per_cpu_set`` (host memory bounds
    them), and other jobs leave them be. ``hold_s`` seconds without a job that takes it end any holder.
    Objects held need ``gpus``, ``pid``, ``holding`` (the handoff key) and ``since``.
    """

    def __init__(self, per_cpu_set: int, hold_s: float):
        self.per_cpu_set, self.hold_s = per_cpu_set, hold_s
        self._by_set: dict[str | None, list[Any]] = {}

    def add(self, holder, now: float) -> list[Any]:
        """Hold ``holder`` from ``now``; returns those it displaces (to end)."""
        held = self._by_set.setdefault(holder.gpus, [])
        holder.since = now
        held.append(holder)
        keep = 1 if _names_gpus(holder.gpus) else self.per_cpu_set
        displaced = held[:-keep]
        del held[:-keep]
        return displaced

    def take(self, gpus: str | None, key: str | None) -> Any:
        """The holder of the model ``key`` names for this set, no longer held; None when none holds it."""
        held = self._by_set.get(gpus, [])
        holder = next((h for h in held if key and h.holding == key), None)
        if holder is not None:
            held.remove(holder)
        return holder

    def before_other_job(self, gpus: str | None) -> list[Any]:
        """Before a job that takes no held model runs on ``gpus``: the holders to end first."""
        if not _names_gpus(gpus):
            return []
        return self._by_set.pop(gpus, [])

    def expired(self, now: float) -> list[Any]:
        out = [h for held in self._by_set.values() for h in held if now - h.since > self.hold_s]
        for holder in out:
            self._by_set[holder.gpus].remove(holder)
        return out

    def gone(self, pid: int) -> Any:
        """The holder with ``pid`` (it exited), no longer held; None when no holder had it."""
        for held in self._by_set.values():
            for holder in held:
                if holder.pid == pid:
                    held.remove(holder)
                    return holder
        return None

    def all(self) -> list[Any]:
        return [h for held in self._by_set.values() for h in held]

    def describe(self) -> dict[str, list[list[Any]]]:
        return {str(gpus): [[h.pid, h.holding] for h in held] for gpus, held in self._by_set.items() if held}


def _job_exit(status: int, log_path: str) -> tuple[int, str]:
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), f"exit status {os.WEXITSTATUS(status)}"
    sig = os.WTERMSIG(status)
    text = f"killed by signal {signal.Signals(sig).name}"
    with contextlib.suppress(OSError), open(log_path, "a") as job_log:
        job_log.write(f"worker: the job's process was {text}\n")
    return 128 + sig, text


def _answer(conn: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((json.dumps(message) + "\n").encode())


def _listen(address: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        listener.bind(address)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    return listener


def serve(address: str, expected: str, idle_s: float) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker[%(process)d] %(message)s", force=True)
    if fingerprint() != expected:
        log.error("this server's fingerprint differs from the job's; not serving")
        return 4
    retire = False

    def on_retire(*_):
        nonlocal retire
        retire = True

    signal.signal(signal.SIGUSR1, on_retire)
    listener = _listen(address)
    inode = os.stat(address).st_ino
    standbys: dict[str | None, list[_Standby]] = {}
    n_standbys = max(1, int(os.environ.get(STANDBYS_ENV, DEFAULT_STANDBYS)))
    running: dict[int, tuple[socket.socket, dict[str, Any], _Standby]] = {}
    holders = _Holders(per_cpu_set=n_standbys, hold_s=float(os.environ.get(HOLD_ENV, DEFAULT_HOLD_S)))
    last_activity = time.monotonic()
    log.info("serving at %s; exits after %.0f s without a job", address, idle_s)

    def take(conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with conn.makefile("rb") as reader:
                line = reader.readline()
        except OSError:
            line = b""
        if not line:
            conn.close()
            return
        request = json.loads(line)
        op = request.get("op")
        if op == "ping":
            _answer(conn, {"fingerprint": expected, "pid": os.getpid(),
                           "standbys": {str(gpus): [sb.pid for sb in waiting] for gpus, waiting in standbys.items()},
                           "holders": holders.describe()})
        elif op == "retire":
            os.kill(os.getpid(), signal.SIGUSR1)
            _answer(conn, {"retiring": True})
        elif request.get("fingerprint") != expected:
            _answer(conn, {"error": "the worker runs other code or settings than this job"})
        elif op == "warm":
            waiting = standbys.setdefault(request.get("gpus"), [])
            while not retire and len(waiting) < n_standbys:
                waiting.append(_Standby(request.get("gpus")))
            _answer(conn, {"standbys": [sb.pid for sb in waiting]})
        else:
            gpus = request["env"].get("CUDA_VISIBLE_DEVICES")
            conn.settimeout(None)
            holder = holders.take(gpus, request.get("take"))
            if holder is not None and holder.hand(request):
                log.info("job for GPUs %r runs in holder %d, which holds its cell's model", gpus, holder.pid)
                running[holder.pid] = (conn, request, holder)
                return
            for holder in holders.before_other_job(gpus):  # their GPU memory is free before the job starts
                log.info("ending holder %d for GPUs %r: the next job does not take its model", holder.pid, gpus)
                holder.kill(wait=True)
            waiting = standbys.setdefault(gpus, [])
            standby = waiting.pop(0) if waiting else _Standby(gpus)  # the oldest: the likeliest to be ready
            if not standby.hand(request):
                standby = _Standby(gpus)
                standby.hand(request)
            running[standby.pid] = (conn, request, standby)
            while not retire and len(waiting) < n_standbys:
                waiting.append(_Standby(gpus))  # imports for the next jobs while this one runs
            return
        conn.close()

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            gone = holders.gone(pid)
            if gone is not None:
                log.warning("holder %d for GPUs %r exited (status %d)", pid, gone.gpus, status)
                gone.channel.close()
            if pid in running:
                conn, request, _ = running.pop(pid)
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == CANNOT_RUN_HERE:
                    _answer(conn, {"error": "the worker cannot run this job here (see the job log)"})
                else:
                    code, text = _job_exit(status, request["log"])
                    _answer(conn, {"exit": code, "status": text, "pid": pid})
                conn.close()
            else:
                for gpus, waiting in standbys.items():
                    for standby in [sb for sb in waiting if sb.pid == pid]:
                        log.warning("standby %d for GPUs %r exited while waiting (status %d)", pid, gpus, status)
                        standby.channel.close()
                        waiting.remove(standby)

    def dropped() -> None:
        """A job whose connection closed was killed (Ctrl-C, a scheduler): its process goes too."""
        by_conn = {conn: pid for pid, (conn, _, _) in running.items()}
        if not by_conn:
            return
        readable, _, _ = select.select(list(by_conn), [], [], 0)
        for conn in readable:
            with contextlib.suppress(OSError):
                if conn.recv(1, socket.MSG_PEEK):
                    continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(by_conn[conn], signal.SIGKILL)

    def messages() -> None:
        """Running jobs whose process says its job is done and it holds the cell's model: answered, and held."""
        by_channel = {sb.channel: pid for pid, (_, _, sb) in running.items() if sb.channel.fileno() >= 0}
        if not by_channel:
            return
        readable, _, _ = select.select(list(by_channel), [], [], 0)
        for channel in readable:
            pid = by_channel[channel]
            conn, request, standby = running[pid]
            message = standby.message()
            if message is None:
                continue
            if not message.get("holding"):
                standby.channel.close()  # closed: the process exits, and reap() answers its job
                continue
            del running[pid]
            _answer(conn, {"exit": 0, "status": "exit status 0 (its process stays, holding the cell's model)", "pid": pid})
            conn.close()
            standby.holding = message["holding"]
            for previous in holders.add(standby, time.monotonic()):
                previous.kill(wait=True)

    def expire() -> None:
        for holder in holders.expired(time.monotonic()):
            log.info("ending holder %d for GPUs %r: no job took its model within %.0f s", holder.pid, holder.gpus,
                     holders.hold_s)
            holder.kill(wait=True)

    try:
        while True:
            readable, _, _ = select.select([listener], [], [], 0.2)
            if readable:
                conn, _ = listener.accept()
                last_activity = time.monotonic()
                take(conn)
            messages()
            dropped()
            reap()
            expire()
            if running:
                last_activity = time.monotonic()
            try:
                moved = os.stat(address).st_ino != inode
            except FileNotFoundError:
                moved = True
            if moved or retire or time.monotonic() - last_activity > idle_s:
                break
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(address).st_ino == inode:
                os.unlink(address)
        listener.close()
        for waiting in standbys.values():
            for standby in waiting:
                standby.kill()
        for holder in holders.all():
            holder.kill()
        # A retired server lets its running jobs finish (and answers them) before it exits.
        while running:
            dropped()
            reap()
            time.sleep(0.2)
        reap()
    log.info("exiting (%s)", "retired" if retire else "idle or socket gone")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlmsens.worker", description="the warm GPU-job server (started by jobs)")
    parser.add_argument("--address", required=True)
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--idle", type=float, default=float(os.environ.get(IDLE_ENV, DEFAULT_IDLE_S)))
    args = parser.parse_args(argv)
    return serve(args.address, args.fingerprint, args.idle)


if __name__ == "__main__":
    raise SystemExit(main())
