"""Shared fixtures: a generated COCO tree and tiny checkpoints of both families (built once)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# Worker servers started by the tests' Snakemake runs exit soon after the last job, not 5 min later.
os.environ.setdefault("VLMSENS_WORKER_IDLE_S", "20")

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_5_vl", "qwen3_vl")
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
WORKFLOW_PARTS = ("Snakefile", "rules", "config", "workflow", "docs", "profiles", "envs")
PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json")


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
