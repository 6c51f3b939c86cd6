"""The warm worker: jobs run in forked children of one server that imported everything once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmsens import worker

TESTS = Path(__file__).resolve().parent
HOLD_S = 30  # how long the module's server keeps a cell's process that holds its model


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    """One server for the module's tests (each start imports torch, transformers and ModelOpt)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        mp.setenv(worker.IDLE_ENV, "60")
        mp.setenv(worker.HOLD_ENV, str(HOLD_S))
        mp.delenv("SLURM_JOB_ID", raising=False)
        address = worker.address_for(tmp_path_factory.mktemp("results"))
        yield address
        worker.retire(address, wait_s=10)


def _server_pid(address: str) -> int:
    return worker._ask(address, {"op": "ping"})["pid"]


def test_jobs_run_in_children_of_one_warm_server(address, tmp_path, monkeypatch):
    import worker_jobs

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    log_path = tmp_path / "job.log"
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}.json"
        code = worker.run_job(address, worker_jobs.report, {"out": str(out)}, log_path=str(log_path), prefix="test", threads=1)
        assert code == 0
        outs.append(json.loads(out.read_text()))
        if i == 0:
            server = _server_pid(address)
    assert _server_pid(address) == server  # the second job found the first job's server
    assert outs[0]["pid"] != outs[1]["pid"] and server not in (outs[0]["pid"], outs[1]["pid"])
    assert all(o["threads"] == 1 and o["cuda_visible_devices"] == "" for o in outs)
    text = log_path.read_text()
    assert f"[test] job running in pid {outs[1]['pid']}" in text
    # the next jobs' standbys were forked (and import) while these jobs ran; none is a finished job's process
    waiting = worker._ask(address, {"op": "ping"})["standbys"][""]
    assert len(waiting) == worker.DEFAULT_STANDBYS and not {o["pid"] for o in outs} & set(waiting)


def test_warming_readies_standbys_that_the_first_job_then_takes(address, tmp_path, monkeypatch):
    """A CPU job the GPU jobs wait for warms the worker: standbys for that GPU set import before any
    job asks, and the first job of that set runs in one of them instead of a fresh fork."""
    import worker_jobs

    gpus = "-1"  # a GPU set no other test uses: no standby waits for it yet
    assert gpus not in worker._ask(address, {"op": "ping"})["standbys"]
    warmed = worker.warm(address, gpus)
    assert len(warmed) == worker.DEFAULT_STANDBYS
    assert worker._ask(address, {"op": "ping"})["standbys"][gpus] == warmed
    assert worker.warm(address, gpus) == warmed  # warming again starts no more

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)
    out = tmp_path / "out.json"
    assert worker.run_job(address, worker_jobs.report, {"out": str(out)}, log_path=str(tmp_path / "w.log"), prefix="t", threads=1) == 0
    assert json.loads(out.read_text())["pid"] == warmed[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _hand_over(address, tmp_path, func, name: str, state: Path, take: str | None = None) -> dict:
    out = tmp_path / f"{name}.json"
    code = worker.run_job(address, func, {"state": str(state), "out": str(out)}, log_path=str(tmp_path / f"{name}.log"),
                          prefix="test", threads=1, take=take)
    assert code == 0, (tmp_path / f"{name}.log").read_text()
    return json.loads(out.read_text())


def test_a_cells_process_holds_its_model_for_the_job_that_takes_it(address, tmp_path, monkeypatch):
    """The job after a cell that names the cell's search state runs in the cell's process and gets its model
    (vlmsens.handoff); that process ends after it."""
    import worker_jobs

    from vlmsens import handoff

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    state = tmp_path / "state.pt"
    kept = _hand_over(address, tmp_path, worker_jobs.keep_model, "cell", state)
    key = handoff.state_key(state)
    assert worker._ask(address, {"op": "ping"})["holders"] == {"": [[kept["pid"], key]]}
    took = _hand_over(address, tmp_path, worker_jobs.take_model, "validate", state, take=key)
    assert took == {"pid": kept["pid"], "took": {"kept_by": kept["pid"]}}
    assert worker._ask(address, {"op": "ping"})["holders"] == {} and not _alive(kept["pid"])


def test_a_held_model_goes_only_to_its_own_state_file_and_not_for_ever(address, tmp_path, monkeypatch):
    """A job naming a rewritten state file takes nothing (it runs in another process); CPU jobs leave a CPU
    holder be; with no job taking its model within the hold time, the holder ends."""
    import worker_jobs

    from vlmsens import handoff

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    state = tmp_path / "state.pt"
    kept = _hand_over(address, tmp_path, worker_jobs.keep_model, "cell", state)
    state.write_text("the cell ran again since")
    took = _hand_over(address, tmp_path, worker_jobs.take_model, "stale", state, take=handoff.state_key(state))
    assert took["pid"] != kept["pid"] and took["took"] is None and _alive(kept["pid"])
    deadline = time.monotonic() + HOLD_S + 10
    while _alive(kept["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(kept["pid"]) and worker._ask(address, {"op": "ping"})["holders"] == {}


class _Held:
    def __init__(self, gpus, pid, holding):
        self.gpus, self.pid, self.holding, self.since = gpus, pid, holding, 0.0


def test_a_gpu_holds_one_model_and_any_other_job_ends_it_first():
    """The server's holding policy: one held model per GPU set, ended before any job that does not take it;
    CPU sets keep a few and let other jobs be; a holder is taken once, by its key only; the hold time ends any."""
    holders = worker._Holders(per_cpu_set=2, hold_s=10)
    first, second = _Held("0", 1, "a"), _Held("0", 2, "b")
    assert holders.add(first, now=0) == []
    assert holders.add(second, now=1) == [first]  # a GPU holds one model
    assert holders.take("0", "a") is None and holders.take("1", "b") is None and holders.take("0", None) is None
    assert holders.take("0", "b") is second and holders.take("0", "b") is None  # taken once
    gpu, other_gpu = _Held("0", 3, "c"), _Held("1", 4, "d")
    holders.add(gpu, now=2)
    holders.add(other_gpu, now=2)
    assert holders.before_other_job("0") == [gpu]  # ended before the job runs on its GPU
    assert holders.describe() == {"1": [[4, "d"]]}  # another GPU's holder stays
    cpu = [_Held(None, 5 + i, f"cpu{i}") for i in range(3)]
    assert holders.add(cpu[0], now=3) == [] and holders.add(cpu[1], now=4) == [] and holders.add(cpu[2], now=5) == [cpu[0]]
    assert holders.before_other_job(None) == [] and holders.before_other_job("") == []
    assert holders.gone(6) is cpu[1] and holders.gone(6) is None
    assert holders.expired(now=13) == [other_gpu] and holders.expired(now=15.5) == [cpu[2]] and holders.all() == []


def test_a_child_starts_with_modelopt_imported_and_frozen(address, tmp_path):
    import worker_jobs

    out = tmp_path / "modules.json"
    assert worker.run_job(address, worker_jobs.report, {"out": str(out)}, log_path=str(tmp_path / "a.log"), prefix="t", threads=1) == 0
    ran = json.loads(out.read_text())
    assert ran["modelopt_preloaded"]
    # the imports' objects are out of the job's garbage collections (torch, transformers and ModelOpt: >100,000)
    assert ran["frozen_objects"] > 100_000
    probe = subprocess.run([sys.executable, "-c", "import sys; print('modelopt.torch.quantization' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"  # a fresh interpreter has not


@pytest.mark.parametrize(("job", "code", "in_log"), [
    ("fail_clearly", 1, "calibration DB /x/y.db holds no samples"),
    ("crash", 1, "RuntimeError: an unexpected failure deep inside"),
    ("die", 128 + signal.SIGKILL, "the job's process was killed by signal SIGKILL"),
])
def test_a_failing_job_fails_its_caller_with_the_reason_in_its_log(address, tmp_path, job, code, in_log):
    import worker_jobs

    log_path = tmp_path / "job.log"
    assert worker.run_job(address, getattr(worker_jobs, job), {}, log_path=str(log_path), prefix="t", threads=1) == code
    assert in_log in log_path.read_text()
    # the server survives a job's death and serves the next one
    assert worker.run_job(address, worker_jobs.report, {"out": str(tmp_path / "o.json")}, log_path=str(log_path), prefix="t", threads=1) == 0


def test_a_killed_job_takes_its_child_with_it(address, tmp_path):
    pid_file = tmp_path / "pid"
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import worker_jobs; from vlmsens import worker; "
            f"worker.run_job({address!r}, worker_jobs.sleep_forever, {{'out': {str(pid_file)!r}}}, log_path={str(tmp_path / 'j.log')!r}, prefix='t', threads=1)")
    job = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.2)
    child = int(pid_file.read_text())
    os.kill(child, 0)  # running
    job.kill()
    job.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the child {child} outlived its job")


def test_other_settings_get_their_own_server(address, tmp_path, monkeypatch):
    import worker_jobs

    args = dict(log_path=str(tmp_path / "j.log"), prefix="t", threads=1)
    assert worker.run_job(address, worker_jobs.report, {"out": str(tmp_path / "1.json")}, **args) == 0
    first = _server_pid(address)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # changes what a job may load
    assert worker.run_job(address, worker_jobs.report, {"out": str(tmp_path / "2.json")}, **args) == 0
    assert _server_pid(address) != first


def test_disabled_by_environment_and_under_slurm():
    assert worker.enabled({})
    assert not worker.enabled({worker.ENABLE_ENV: "0"})
    assert not worker.enabled({"SLURM_JOB_ID": "42"})


def test_a_server_that_cannot_start_is_not_tried_again_by_every_job(tmp_path, monkeypatch):
    import worker_jobs

    monkeypatch.setenv(worker.START_TIMEOUT_ENV, "0")  # no time to come up
    address = worker.address_for(tmp_path / "slow-results")
    args = dict(log_path=str(tmp_path / "j.log"), prefix="t", threads=1)
    with pytest.raises(worker.WorkerUnavailable, match="did not come up"):
        worker.run_job(address, worker_jobs.report, {"out": str(tmp_path / "1.json")}, **args)
    started = time.monotonic()
    with pytest.raises(worker.WorkerUnavailable, match="failed to start before"):
        worker.run_job(address, worker_jobs.report, {"out": str(tmp_path / "2.json")}, **args)
    assert time.monotonic() - started < 5
