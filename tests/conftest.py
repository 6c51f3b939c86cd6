"""Shared fixtures: a generated COCO tree and tiny checkpoints of both families (built once), and
the rule that a skip in CI is a failure unless it names a missing optional tool."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Worker servers started by the tests' Snakemake runs are retired when their test ends (the demo's
# when the session does: its tests share it). Their idle time only bounds a server whose test was
# killed; it must outlast any gap between a run's worker jobs on a loaded 2-core machine, where a
# standby's imports take over 30 s (20 s was too short: a demo job found its server gone).
os.environ.setdefault("VLMSENS_WORKER_IDLE_S", "120")

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_5_vl", "qwen3_vl")
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
WORKFLOW_PARTS = ("Snakefile", "rules", "config", "workflow", "docs", "profiles", "envs")
PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json")
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
DEMO = ["--configfile", "config/demo.yaml", "--replace-workflow-config"]
# How the tests run the CPU-only demo. Its "GPU" jobs (autoquant, validate) touch no GPU, so the
# profile's one-GPU limit (`gpu=1`) and their 2 threads would run them one at a time on a 2-core
# machine, each mostly single-threaded start-up. One thread and one "GPU" per core instead runs one
# job per core; the rules and profiles users run keep their GPU semantics.
CORES = max(2, os.cpu_count() or 2)
CPU_DEMO = ["--cores", str(CORES), "--resources", f"gpu={CORES}", "--set-threads", "autoquant=1", "validate=1", "ladder=1"]

# Tools a machine may lack without the project being broken: a test that cannot run without one
# skips with a reason starting "needs <tool>". In CI (env CI set) any other skip fails the session,
# so a missing fixture or dependency cannot pass as a green run.
OPTIONAL_TOOLS = ("SLURM", "headless Chromium")
ALLOWED_SKIP_PREFIXES = tuple(f"needs {tool}" for tool in OPTIONAL_TOOLS)


def skip_reason(report: pytest.TestReport) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if not reason.startswith(ALLOWED_SKIP_PREFIXES):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in CI: {reason!r}\nIn CI a test may skip only for a missing optional tool, with a reason "
            f"starting with one of {list(ALLOWED_SKIP_PREFIXES)} (tests/conftest.py)."
        )


def load_bench(name: str):
    """A bench/ script as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_workflow(dest: Path) -> Path:
    """A copy of the workflow (no results, no venv) to run Snakemake in, away from the checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / part)
    return dest


def fake_checkpoint(folder: Path, model_type: str, processor: bool = True) -> Path:
    """The files the preflight reads: config.json and the processor files (no weights needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name in PROCESSOR_FILES if processor else ():
        (folder / name).write_text("{}")
    return folder


def fake_hub_snapshot(cache: Path, repo_id: str, model_type: str) -> Path:
    """A snapshot of ``repo_id`` laid out as huggingface_hub caches it (refs/main -> snapshots/<sha>)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    sha = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return fake_checkpoint(repo / "snapshots" / sha, model_type)


# Workdirs whose Snakemake runs may have started a worker server; the shared ones outlive their test.
_WORKER_WORKDIRS: set[Path] = set()
_SHARED_WORKDIRS: set[Path] = set()


def retire_workers(workdirs) -> None:
    """Retire the worker servers of these workdirs' results folders (their standbys and holders end)."""
    from vlmsens import worker

    for workdir in map(Path, workdirs):
        # the server's address comes from the results folder (``outdir``: results, results/demo, ...)
        for outdir in [workdir, *workdir.glob("[!.]*/"), *workdir.glob("[!.]*/[!.]*/")]:
            worker.retire(worker.address_for(outdir / ".locks" / "gpu"))


@pytest.fixture(autouse=True)
def _retire_test_workers():
    yield
    done = _WORKER_WORKDIRS - _SHARED_WORKDIRS
    retire_workers(done)
    _WORKER_WORKDIRS.difference_update(done)


@pytest.fixture(scope="session", autouse=True)
def _retire_shared_workers():
    yield
    retire_workers(_WORKER_WORKDIRS)


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    _WORKER_WORKDIRS.add(Path(workdir))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, env=env, timeout=3600)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """(workdir, Snakemake's output) of one demo run, shared by the workflow and browser tests.

    Tests that change the run (rerunning a cell) leave it complete again: nothing left to do."""
    workdir = copy_workflow(tmp_path_factory.mktemp("demo"))
    _SHARED_WORKDIRS.add(workdir)
    proc = snakemake(workdir, *DEMO, *CPU_DEMO)
    return workdir, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def demo_coco(tmp_path_factory) -> Path:
    from vlmsens.demo import build_demo_coco

    root = tmp_path_factory.mktemp("coco") / "coco"
    build_demo_coco(root, n_train=40, n_val=12, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, demo_coco) -> dict[str, Path]:
    from vlmsens.demo import build_demo_checkpoint

    base = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for family in FAMILIES:
        build_demo_checkpoint(family, base / family, demo_coco, seed=0, vocab_size=512, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        out[family] = base / family
    return out
