"""The GPU slot pool on CPU: a fake pool of devices passed explicitly ("0,1"); no CUDA needed."""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from vlmsens import gpupool
from vlmsens.gpupool import GpuSlotTimeout, gpu_slot, parse_visible_devices

CTX = mp.get_context("fork")


def _worker(lock_dir: str, devices: str, hold: float, queue) -> None:
    with gpu_slot(lock_dir, devices, timeout=60, poll=0.02) as slot:
        start = time.monotonic()
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        time.sleep(hold)
        end = time.monotonic()
    queue.put({"pid": os.getpid(), "device": slot.device, "seen": seen, "start": start, "end": end})


def _holder(lock_dir: str, devices: str, ready) -> None:
    with gpu_slot(lock_dir, devices, timeout=10):
        ready.set()
        time.sleep(3600)


@pytest.fixture(autouse=True)
def _no_slurm_no_cuda(monkeypatch):
    for name in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", gpupool.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)


def test_concurrent_jobs_never_share_a_slot(tmp_path):
    n_jobs, devices = 8, "0,1"
    queue = CTX.Queue()
    procs = [CTX.Process(target=_worker, args=(str(tmp_path), devices, 0.3, queue)) for _ in range(n_jobs)]
    for p in procs:
        p.start()
    records = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    assert {r["device"] for r in records} <= {"0", "1"}
    for r in records:  # inside the block the job sees its one device only
        assert r["seen"] == r["device"]
    for dev in ("0", "1"):
        spans = sorted((r["start"], r["end"]) for r in records if r["device"] == dev)
        assert spans, f"no job ever took GPU {dev}"
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"two jobs held GPU {dev} at once: {spans}"
    # Both slots were used in parallel at some point: 8 x 0.3 s on 2 slots.
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    busy = peak = 0
    for _, step in events:
        busy += step
        peak = max(peak, busy)
    assert peak == 2


def test_cuda_visible_devices_set_inside_and_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with gpu_slot(tmp_path, ["2", "1"]) as slot:
        assert slot.mode == "pool"
        assert slot.device == "2"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
        holder = json.loads(Path(slot.lock_path).read_text())
        assert holder["pid"] == os.getpid() and holder["device"] == "2"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert Path(slot.lock_path).read_text() == ""  # released: empty lock file


def test_lock_of_sigkilled_process_is_reclaimed(tmp_path, caplog):
    ready = CTX.Event()
    proc = CTX.Process(target=_holder, args=(str(tmp_path), "0", ready))
    proc.start()
    assert ready.wait(30)
    with pytest.raises(GpuSlotTimeout):  # really held while the process lives
        with gpu_slot(tmp_path, "0", timeout=0.3, poll=0.05):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL

    caplog.set_level(logging.INFO, logger="vlmsens.gpupool")
    t0 = time.monotonic()
    with gpu_slot(tmp_path, "0", timeout=5, poll=0.05) as slot:
        assert slot.device == "0"
    assert time.monotonic() - t0 < 2
    assert f"last held by pid {proc.pid} (dead" in caplog.text


def test_lock_file_left_by_dead_pid_is_taken(tmp_path, caplog):
    # A lock file with a holder record but no flock on it: what a crash leaves behind.
    folder = tmp_path / gpupool.socket.gethostname()
    folder.mkdir()
    dead = CTX.Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    record = {"pid": dead.pid, "host": gpupool.socket.gethostname(), "device": "0", "since": "earlier"}
    (folder / "gpu-0.lock").write_text(json.dumps(record))
    caplog.set_level(logging.INFO, logger="vlmsens.gpupool")
    with gpu_slot(tmp_path, "0", timeout=1) as slot:
        assert slot.device == "0"
    assert "reclaimed" in caplog.text and str(dead.pid) in caplog.text


def test_waiting_beyond_timeout_raises_a_clear_error(tmp_path):
    with gpu_slot(tmp_path, "0,1", timeout=1), gpu_slot(tmp_path, "0,1", timeout=1):
        t0 = time.monotonic()
        with pytest.raises(GpuSlotTimeout) as err:
            with gpu_slot(tmp_path, "0,1", timeout=0.5, poll=0.05):
                pytest.fail("a third job got one of two slots")
        assert 0.5 <= time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "all 2 GPU slot(s)" in msg and "--resources gpu=N" in msg
    assert f"pid {os.getpid()}" in msg  # names the holders


def test_timeout_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(gpupool.TIMEOUT_ENV, "0.2")
    with gpu_slot(tmp_path, "0"):
        with pytest.raises(GpuSlotTimeout, match="timeout 0 s"):
            with gpu_slot(tmp_path, "0", poll=0.05):
                pass


def test_no_gpu_is_a_noop(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(gpupool.shutil, "which", lambda name: None)
    caplog.set_level(logging.INFO, logger="vlmsens.gpupool")
    with gpu_slot(tmp_path / "locks") as slot:
        assert slot.mode == "none" and slot.device is None
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not (tmp_path / "locks").exists()
    assert "no-op" in caplog.text


def test_under_slurm_uses_the_allocation(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    caplog.set_level(logging.INFO, logger="vlmsens.gpupool")
    with gpu_slot(tmp_path / "locks") as slot:
        assert slot.mode == "slurm" and slot.device == "3"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not (tmp_path / "locks").exists()
    assert "SLURM job 42" in caplog.text


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0,1", ["0", "1"]), (" 2 , 3 ", ["2", "3"]), ("", []), ("-1", []), ("0,-1,1", ["0"]),
     ("GPU-8a1b,MIG-77c", ["GPU-8a1b", "MIG-77c"]), ("NoDevFiles", [])],
)
def test_parse_visible_devices(value, expected):
    assert parse_visible_devices(value) == expected


def test_detect_devices_from_nvidia_smi(monkeypatch):
    listing = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaa)\n"
               "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbb)\n"
               "  MIG 3g.40gb     Device  0: (UUID: MIG-ccc)\n")

    class Done:
        stdout = listing

    monkeypatch.setattr(gpupool.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpupool.subprocess, "run", lambda *a, **k: Done())
    assert gpupool.detect_devices({}) == ["0", "1"]
    assert gpupool.detect_devices({"CUDA_VISIBLE_DEVICES": "1"}) == ["1"]


def test_warming_the_gpu_worker_uses_the_gpu_jobs_environment_and_first_device(tmp_path, monkeypatch):
    """The warm-up must reach the server the GPU jobs will use: same environment (the server's
    fingerprint covers it), the GPU set of the pool's first device; the CPU job's own environment
    is left as it was, and a worker that cannot start does not fail the job."""
    from types import SimpleNamespace

    from vlmsens import worker

    seen = {}

    def fake_warm(address, gpus, **_):
        seen.update(address=address, gpus=gpus, env={k: os.environ.get(k) for k in ("TORCH_EXTENSIONS_DIR", "PYTORCH_CUDA_ALLOC_CONF")})
        return [1, 2]

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv(worker.ENABLE_ENV, raising=False)
    monkeypatch.setattr(worker, "warm", fake_warm)
    monkeypatch.setattr(gpupool, "detect_devices", lambda: ["3", "5"])
    smk = SimpleNamespace(params=SimpleNamespace(extensions_cache=str(tmp_path / "ext"), gpu_locks=str(tmp_path / "locks")))
    gpupool.warm_gpu_worker(smk)
    assert seen["gpus"] == "3" and seen["address"] == worker.address_for(tmp_path / "locks")
    assert seen["env"] == gpupool.gpu_job_environment(smk) == {
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert "TORCH_EXTENSIONS_DIR" not in os.environ

    def unavailable(*_, **__):
        raise worker.WorkerUnavailable("cannot start")

    monkeypatch.setattr(worker, "warm", unavailable)
    gpupool.warm_gpu_worker(smk)  # logged, not raised
    monkeypatch.setenv(worker.ENABLE_ENV, "0")
    monkeypatch.setattr(worker, "warm", fake_warm)
    seen.clear()
    gpupool.warm_gpu_worker(smk)
    assert not seen
