"""Bad input fails fast and names the key or file; nothing complete-looking is left behind.

One test (or a few) per fault case that once got through: wrong architecture, family mismatch, a hub
id missing from the cache, a missing relative checkpoint path, invalid UTF-8 captions, more
evaluation images than the split has, ``~`` in paths, params that reran unrelated GPU cells (and the
demo config merged into the real one), temporary files left by killed attempts, and retries of
errors that are not out-of-memory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_workflow, fake_checkpoint, fake_hub_snapshot

from vlmsens.calib import build_eval_subset, build_subset, load_annotations
from vlmsens.config import (
    autoquant_settings,
    calibration_inputs,
    check_config,
    check_not_merged,
    format_settings,
    prompt_settings,
    validation_settings,
)
from vlmsens.errors import VlmsensError
from vlmsens.failures import describe, is_oom, marker_path
from vlmsens.io import atomic_path, sweep_stale_tmp
from vlmsens.logs import run_logged

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def real_config(tmp_path: Path, checkpoint: str, family: str | None = "qwen2_5_vl") -> dict:
    """A one-model real config (after schema defaults) over a placeholder COCO tree in ``tmp_path``."""
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in (("train2017", 20), ("val2017", 5)):
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(n)]
        (coco / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": []}))
    model = {"checkpoint": checkpoint, **({"family": family} if family else {})}
    return {
        "outdir": str(tmp_path / "results"),
        "models": {"m": model},
        "grid": {"models": ["m"], "formats": ["wfp8_afp8"], "scopes": ["lm-only"], "sizes": ["small"]},
        "sizes": {"small": 4},
        "coco": {"root": str(coco), "calib_split": "train2017", "eval_split": "val2017", "eval_images": 5,
                 "on_bad_image": "error", "prebuilt_dir": None},
        "prompts": {"min_pixels": 3136, "max_pixels": 12544},
        "autoquant": {"method": "gradient", "batch_size": 4, "effective_bits": {"wfp8_afp8": 8.5}},
        "validation": {"enabled": True, "k": [0.1]},
        "formats": {},
    }


def check_fails(config: dict, *needles: str) -> str:
    from snakemake.utils import validate

    validate(config, str(REPO / "config" / "schema.yaml"))  # as the Snakefile does first: defaults filled
    with pytest.raises(VlmsensError) as info:
        check_config(config)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert not Path(config["outdir"]).exists(), "the config check must write nothing"
    return message


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


# 1. Wrong architecture --------------------------------------------------------------------------
def test_checkpoint_of_an_unknown_architecture_fails_in_the_config_check(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "llama", "llama")
    message = check_fails(real_config(tmp_path, str(ckpt)), "models.m.checkpoint", "'llama'", "qwen2_5_vl")
    assert str(ckpt / "config.json") in message


def test_checkpoint_without_processor_files_fails_in_the_config_check(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "bare", "qwen2_5_vl", processor=False)
    check_fails(real_config(tmp_path, str(ckpt)), "models.m.checkpoint", "processor_config.json", str(ckpt))


# 2. Family mismatch, and the family read from the checkpoint when omitted ------------------------
def test_family_that_contradicts_the_checkpoint_fails(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "q25", "qwen2_5_vl")
    check_fails(real_config(tmp_path, str(ckpt), family="qwen3_vl"), "models.m.family", "'qwen3_vl'", "'qwen2_5_vl'")


def test_family_is_read_from_the_checkpoint_when_omitted(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "q3", "qwen3_vl")
    config = real_config(tmp_path, str(ckpt), family=None)
    check_config(config)
    assert config["models"]["m"]["family"] == "qwen3_vl"


# 3. Hub id not in the cache: fails at once, names the key and HF_HUB_OFFLINE --------------------
def test_uncached_hub_id_fails_at_once_naming_the_key_and_offline_switch(tmp_path, empty_hub_cache):
    started = time.monotonic()
    message = check_fails(real_config(tmp_path, "Qwen/Qwen2.5-VL-3B-Instruct"),
                          "models.m.checkpoint", "HF_HUB_OFFLINE", "Qwen/Qwen2.5-VL-3B-Instruct", str(empty_hub_cache))
    assert time.monotonic() - started < 10, "no network retries"
    assert "hf download" in message


def test_cached_hub_id_resolves_to_its_snapshot_and_jobs_load_it_offline(tmp_path, empty_hub_cache):
    from vlmsens.models import _source

    snapshot = fake_hub_snapshot(empty_hub_cache, "Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl")
    config = real_config(tmp_path, "Qwen/Qwen3-VL-4B-Instruct", family="qwen3_vl")
    check_config(config)
    assert _source("Qwen/Qwen3-VL-4B-Instruct") == (str(snapshot), True)


def test_downloads_only_when_hf_hub_offline_is_0(tmp_path, empty_hub_cache, monkeypatch):
    from vlmsens.models import _source

    with pytest.raises(VlmsensError, match="HF_HUB_OFFLINE"):
        _source("Qwen/Qwen2.5-VL-3B-Instruct")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_config(real_config(tmp_path, "Qwen/Qwen2.5-VL-3B-Instruct"))
    assert _source("Qwen/Qwen2.5-VL-3B-Instruct") == ("Qwen/Qwen2.5-VL-3B-Instruct", False)


# 4. Relative checkpoint paths resolve against the working directory ------------------------------
def test_missing_relative_checkpoint_is_a_missing_folder_not_a_hub_id(tmp_path, empty_hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    message = check_fails(real_config(tmp_path, "checkpoints/qwen25_vl"), "models.m.checkpoint",
                          "checkpoint folder checkpoints/qwen25_vl not found", str(tmp_path / "checkpoints" / "qwen25_vl"),
                          "relative to the working directory")
    assert "cache" not in message
    for value in ("./qwen25_vl", "../elsewhere/qwen25_vl", "a/b/c"):
        check_fails(real_config(tmp_path, value), "models.m.checkpoint", f"checkpoint folder {value} not found")


def test_missing_relative_path_without_its_parent_still_names_the_folder(tmp_path, empty_hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_fails(real_config(tmp_path, "checkpoints/qwen25_vl"), "models.m.checkpoint",
                str(tmp_path / "checkpoints" / "qwen25_vl"), "does not exist", "HF_HUB_OFFLINE")


def test_existing_relative_checkpoint_is_used(tmp_path, empty_hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_checkpoint(tmp_path / "checkpoints" / "qwen25_vl", "qwen2_5_vl")
    check_config(real_config(tmp_path, "checkpoints/qwen25_vl"))


# 5. Invalid UTF-8 in the captions JSON ----------------------------------------------------------
def test_captions_that_are_not_utf8_name_the_file(tmp_path, demo_coco):
    import shutil

    coco = tmp_path / "coco"
    shutil.copytree(demo_coco, coco)
    ann = coco / "annotations" / "captions_val2017.json"
    ann.write_bytes(ann.read_bytes().replace(b'"caption": "', b'"caption": "\xff\xfe', 1))
    with pytest.raises(VlmsensError, match="not valid UTF-8") as info:
        load_annotations(ann)
    assert str(ann) in str(info.value)
    db, captions = tmp_path / "out" / "eval.db", tmp_path / "out" / "eval.txt"
    with pytest.raises(VlmsensError, match=re.escape(str(ann))):
        build_eval_subset(coco_root=coco, split="val2017", num_images=4, seed=0, db_path=db, captions_path=captions)
    assert not db.exists() and not captions.exists()


@pytest.mark.workflow
def test_a_failing_job_ends_its_rule_log_with_the_clear_line(tmp_path, demo_coco):
    """Through Snakemake: the calibration job meets non-UTF-8 captions; its log's last line names the file."""
    import shutil

    workdir = copy_workflow(tmp_path / "wf")
    config = real_config(tmp_path, str(fake_checkpoint(tmp_path / "ck", "qwen2_5_vl")))
    coco = Path(config["coco"]["root"])
    shutil.rmtree(coco)
    shutil.copytree(demo_coco, coco)
    ann = coco / "annotations" / "captions_train2017.json"
    ann.write_bytes(b"\xff" + ann.read_bytes())
    config["outdir"] = "results"
    (workdir / "bad.yaml").write_text(yaml.safe_dump(config))
    target = "results/calib/coco2017_vlm_calib_small.db"
    proc = _snakemake(workdir, "--configfile", "bad.yaml", "--replace-workflow-config", "--cores", "1", target)
    assert proc.returncode != 0
    last = (workdir / "results" / "logs" / "coco_subset" / "small.log").read_text().splitlines()[-1]
    assert "coco_subset small failed" in last and str(ann) in last and "not valid UTF-8" in last
    assert not (workdir / target).exists() and not list((workdir / "results" / "calib").glob("*"))


# 6. More evaluation images than the split has ---------------------------------------------------
def test_eval_images_above_the_split_names_coco_eval_images(tmp_path, demo_coco):
    config = real_config(tmp_path, str(fake_checkpoint(tmp_path / "ck", "qwen2_5_vl")))
    config["coco"]["eval_images"] = 6  # the placeholder val2017 has 5 images
    message = check_fails(config, "coco.eval_images", "val2017")
    assert "sizes" not in message
    db, captions = tmp_path / "out" / "eval.db", tmp_path / "out" / "eval.txt"
    with pytest.raises(VlmsensError, match="lower coco.eval_images") as info:
        build_eval_subset(coco_root=demo_coco, split="val2017", num_images=13, seed=0, db_path=db, captions_path=captions)
    assert "'sizes'" not in str(info.value)
    with pytest.raises(VlmsensError, match="coco.eval_images=40"):  # the held-out images of the same split
        build_subset(coco_root=demo_coco, split="val2017", size_name="small", num_samples=2, seed=0, db_path=db,
                     captions_path=captions, eval_split="val2017", eval_images=40)
    assert not db.exists() and not captions.exists()


def test_demo_eval_images_above_the_demo_split_fails_in_the_config_check(tmp_path):
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config.update(outdir=str(tmp_path / "results"), validation={"enabled": True})
    config["coco"].update(eval_split="val2017", eval_images=17)
    check_fails(config, "coco.eval_images", "coco.demo.val_images")


# 7. ~ in paths ---------------------------------------------------------------------------------
def test_tilde_expands_in_coco_root_checkpoints_and_prebuilt_dir(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    config = real_config(home, "~/ck")
    fake_checkpoint(home / "ck", "qwen2_5_vl")
    config["coco"]["root"] = "~/coco"
    config["coco"]["prebuilt_dir"] = "~/dbs"
    config["outdir"] = "~/results"
    (home / "dbs").mkdir()
    (home / "dbs" / "coco2017_vlm_calib_small.db").write_bytes(b"")
    check_config(config)
    assert config["coco"]["root"] == str(home / "coco")
    assert config["coco"]["prebuilt_dir"] == str(home / "dbs")
    assert config["models"]["m"]["checkpoint"] == str(home / "ck")
    assert config["outdir"] == str(home / "results")


def test_missing_coco_root_names_the_key_and_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = real_config(tmp_path, str(fake_checkpoint(tmp_path / "ck", "qwen2_5_vl")))
    config["coco"]["root"] = "data/coco"
    check_fails(config, "coco.root", "data/coco", str(tmp_path))


# 8. Params carry only what changes a job's output; no silent merge with config/config.yaml -------
def test_cell_params_hold_only_the_cells_own_settings():
    config = {
        "autoquant": {"method": "gradient", "batch_size": 4, "effective_bits": {"a": 8.5, "b": 8.5, "set": 6.0}},
        "formats": {"a": {"base": "FP8_DEFAULT_CFG"}, "b": {"base": "INT8_DEFAULT_CFG"}, "c": {"base": "INT8_DEFAULT_CFG"},
                    "set": {"candidates": ["a", "wint4_afp16"]}},
        "validation": {"enabled": True, "k": [0.1]},
    }
    assert autoquant_settings(config, "a") == {"batch_size": 4, "effective_bits": {"a": 8.5}, "method": "gradient"}
    assert format_settings(config, "b") == {"b": {"base": "INT8_DEFAULT_CFG"}}
    assert format_settings(config, "set") == {"a": config["formats"]["a"], "set": config["formats"]["set"]}
    assert format_settings(config, "wfp8_afp8") == {}
    assert validation_settings(config) == {"k": [0.1]}
    prompts = {"prompts": {"image_instruction": "i", "text_instruction": "t", "min_pixels": 1, "max_pixels": 2}}
    image_keys = {"image_instruction": "i", "min_pixels": 1, "max_pixels": 2}
    # image+caption for both scopes by default: the scopes' samples depend on the same keys
    assert prompt_settings(prompts, "lm-only") == prompt_settings(prompts, "all-layers") == image_keys
    assert calibration_inputs(prompts, "lm-only") == calibration_inputs(prompts, "all-layers") == "image+caption"
    caption_only = {**prompts, "calibration": {"inputs": "caption-only"}}
    assert calibration_inputs(caption_only, "lm-only") == "caption-only"
    assert prompt_settings(caption_only, "lm-only") == {"text_instruction": "t"}
    assert calibration_inputs(caption_only, "all-layers") == "image+caption"
    assert prompt_settings(caption_only, "all-layers") == image_keys


def test_demo_merged_into_the_real_config_is_refused():
    real = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())

    def merge(base, extra):  # what Snakemake does without --replace-workflow-config
        for key, value in extra.items():
            base[key] = merge(base.get(key, {}), value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return base

    merged = merge(real, demo)
    with pytest.raises(VlmsensError, match="--replace-workflow-config") as info:
        check_not_merged(merged)
    assert "coco.root" in str(info.value) and "coco.demo" in str(info.value)
    check_not_merged(yaml.safe_load((REPO / "config" / "demo.yaml").read_text()))


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, env=env, timeout=900)


def _planned_jobs(dry_run_output: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run plans."""
    jobs = re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)*)", dry_run_output, flags=re.MULTILINE)
    return [(rule, (re.search(r"wildcards: (.*)", body) or [None, ""])[1]) for rule, body in jobs]


@pytest.mark.workflow
def test_new_target_for_one_format_reruns_only_that_formats_cells(tmp_path):
    """Every demo output exists and is recorded (--touch); a new wint8_aint8 target reruns only its cells."""
    workdir = copy_workflow(tmp_path / "wf")
    demo = ["--configfile", "config/demo.yaml", "--replace-workflow-config"]
    # Forgetting --replace-workflow-config is refused before any job: nothing is written.
    forgot = _snakemake(workdir, "--configfile", "config/demo.yaml", "-n")
    assert forgot.returncode != 0 and "--replace-workflow-config" in forgot.stdout + forgot.stderr
    assert not (workdir / "results").exists()

    summary = _snakemake(workdir, *demo, "--summary")
    assert summary.returncode == 0, summary.stderr[-3000:]
    for line in summary.stdout.splitlines()[1:]:
        path = workdir / line.split("\t")[0]
        # demo_coco, demo_checkpoint and export outputs are folders
        if "/inputs/" in str(path) or re.search(r"/export/.*/bits-[0-9.]+$", str(path)):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    touched = _snakemake(workdir, *demo, "--touch", "--forceall", "--cores", "1")
    assert touched.returncode == 0, touched.stderr[-3000:]
    up_to_date = _snakemake(workdir, *demo, "-n")
    assert "Nothing to be done" in up_to_date.stdout + up_to_date.stderr

    edited = yaml.safe_load((workdir / "config" / "demo.yaml").read_text())
    edited["autoquant"]["effective_bits"]["wint8_aint8"] = 9.0
    (workdir / "edited.yaml").write_text(yaml.safe_dump(edited))
    dry = _snakemake(workdir, "--configfile", "edited.yaml", "--replace-workflow-config", "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    log = dry.stdout + dry.stderr
    jobs = _planned_jobs(log)
    cells = [wc for rule, wc in jobs if rule == "autoquant"]
    assert len(cells) == 12 and all("format=wint8_aint8" in wc for wc in cells), cells
    assert not any("format=wfp8_afp8" in wc for _, wc in jobs), [j for j in jobs if "wfp8_afp8" in j[1]]
    assert "params have changed since last execution:\n        autoquant\n" in log
    # Both scopes see image+caption samples by default: the caption-only instruction re-encodes nothing,
    # and switching lm-only to caption-only inputs re-encodes (and reruns) lm-only cells alone.
    edited = yaml.safe_load((workdir / "config" / "demo.yaml").read_text())
    edited["prompts"]["text_instruction"] = "Caption this."
    (workdir / "prompt.yaml").write_text(yaml.safe_dump(edited))
    prompt = _snakemake(workdir, "--configfile", "prompt.yaml", "--replace-workflow-config", "-n")
    assert "Nothing to be done" in prompt.stdout + prompt.stderr, _planned_jobs(prompt.stdout + prompt.stderr)
    edited["calibration"] = {"inputs": "caption-only"}
    (workdir / "inputs.yaml").write_text(yaml.safe_dump(edited))
    inputs = _snakemake(workdir, "--configfile", "inputs.yaml", "--replace-workflow-config", "-n")
    input_jobs = _planned_jobs(inputs.stdout + inputs.stderr)
    encoded = [wc for rule, wc in input_jobs if rule in ("prepare_samples", "prepare_eval_samples")]
    assert len(encoded) == 8 and all("scope=lm-only" in wc for wc in encoded), encoded
    assert not any("scope=all-layers" in wc for _, wc in input_jobs)
    # The GPU jobs learn their attempt (vlmsens.logs.run_job), so a retry can refuse a non-OOM failure.
    bodies = re.findall(r"^rule (?:autoquant|validate):\n((?:    .*\n)*)", log, flags=re.MULTILINE)
    assert bodies and all(re.search(r"resources: .*\battempt=1\b", body) for body in bodies)


# 9. Temporary files go away on failure and are swept on the next run ----------------------------
def test_atomic_path_removes_its_temporary_file_on_any_exception(tmp_path):
    target = tmp_path / "autoquant_state.pt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_files_are_swept_before_the_job(tmp_path):
    stale_file = tmp_path / ".autoquant_state.pt.abc123.pt.tmp"
    stale_file.write_bytes(b"")
    stale_dir = tmp_path / ".tiny.x1y2.tmp"
    stale_dir.mkdir()
    (stale_dir / "config.json").write_text("{}")
    unrelated = tmp_path / ".other.pt.q.tmp"
    unrelated.write_bytes(b"")
    log = tmp_path / "job.log"
    run_logged(str(log), "job", lambda: None, job_outputs=[str(tmp_path / "autoquant_state.pt"), str(tmp_path / "tiny")])
    assert not stale_file.exists() and not stale_dir.exists() and unrelated.exists()
    assert "killed" in log.read_text()
    assert sweep_stale_tmp([tmp_path / "absent" / "x"]) == []


def test_sigterm_unwinds_so_no_temporary_file_is_left(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from vlmsens.io import atomic_path
        from vlmsens.logs import run_logged

        def job():
            with atomic_path({str(tmp_path / "autoquant_state.pt")!r}) as tmp:
                tmp.write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGTERM)

        run_logged({str(tmp_path / "job.log")!r}, "autoquant m/f/s/z", job)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".job.log.failure.json", "job.log"]
    assert "autoquant m/f/s/z was interrupted" in (tmp_path / "job.log").read_text().splitlines()[-1]


# 10. Only out-of-memory errors are retried; every error ends the log with one line ---------------
def _run(log: Path, func, attempt: int, **kwargs) -> int:
    with pytest.raises(SystemExit) as info:
        run_logged(str(log), "autoquant m/wfp8_afp8/lm-only/small", func, job_attempt=attempt, **kwargs)
    return info.value.code


def test_a_non_oom_error_is_not_retried(tmp_path):
    log = tmp_path / "cell.log"
    calls = []

    def fails(batch_size):
        calls.append(batch_size)
        raise ValueError("Unrecognized configuration class LlamaConfig")

    assert _run(log, fails, 1, batch_size=4) == 1
    lines = log.read_text().splitlines()
    assert "Traceback" in log.read_text() and "ValueError: Unrecognized configuration class LlamaConfig" in lines[-1]
    assert lines[-1].index("Unrecognized") > 0 and "autoquant m/wfp8_afp8/lm-only/small failed" in lines[-1]
    # Snakemake's retry deletes the log, then the job stops at once without calling ``fails``; its log
    # carries the first attempt's traceback and line again.
    log.unlink()
    assert _run(log, fails, 2, batch_size=2) == 1
    assert calls == [4]
    text = log.read_text()
    assert text.count("Traceback") == 1 and "in fails" in text
    assert "not retried: attempt 1 failed with ValueError" in text.splitlines()[-1]
    assert "Unrecognized configuration class LlamaConfig" in text.splitlines()[-1]
    # A new run (attempt 1 again) starts afresh.
    assert _run(log, fails, 1, batch_size=4) == 1 and calls == [4, 4]


def test_an_oom_is_retried_and_a_success_clears_the_record(tmp_path):
    import torch

    log = tmp_path / "cell.log"
    calls = []

    def oom_at_4(batch_size):
        calls.append(batch_size)
        if batch_size == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "ok"

    assert _run(log, oom_at_4, 1, batch_size=4) == 1
    assert "CUDA out of memory at batch size 4" in log.read_text().splitlines()[-1]
    assert run_logged(str(log), "cell", oom_at_4, job_attempt=2, batch_size=2) == "ok"
    assert calls == [4, 2] and not marker_path(log).exists()


def test_run_job_takes_the_attempt_log_and_outputs_from_the_job(tmp_path):
    from types import SimpleNamespace

    from vlmsens.logs import run_job

    class Named(dict):
        def __iter__(self):
            return iter(self.values())

    log = tmp_path / "cell.log"
    stale = tmp_path / ".state.pt.x.pt.tmp"
    stale.write_bytes(b"")
    job = SimpleNamespace(log=[str(log)], resources=SimpleNamespace(attempt=2),
                          input=Named(samples="s.pt"), output=Named(state=str(tmp_path / "state.pt")))
    marker_path(log).write_text(json.dumps({"attempt": 1, "oom": False, "error": "ValueError", "line": "bad"}))
    with pytest.raises(SystemExit):
        run_job(job, "autoquant m/f/s/z", lambda: pytest.fail("a futile retry must not run the job"))
    assert "not retried" in log.read_text() and stale.exists()  # stopped before any work
    marker_path(log).unlink()
    assert run_job(job, "autoquant m/f/s/z", lambda: "ran") == "ran" and not stale.exists()


def test_oom_recognition():
    import torch

    assert is_oom(torch.cuda.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    try:
        try:
            raise RuntimeError("CUDA error: out of memory")
        except RuntimeError as inner:
            raise ValueError("forward failed") from inner
    except ValueError as outer:
        assert is_oom(outer)
    assert not is_oom(RuntimeError("expected scalar type BFloat16"))
    assert not is_oom(MemoryError())


def test_every_error_names_the_job_and_the_file(tmp_path):
    missing = tmp_path / "samples.pt"
    line = describe(FileNotFoundError(2, "No such file or directory", str(missing)), "prepare_samples m/lm-only/small")
    assert str(missing) in line and line.startswith("prepare_samples m/lm-only/small failed")
    line = describe(KeyError("image_id"), "coco_subset small", {"annotations": "ann.json"})
    assert "KeyError" in line and "ann.json" in line
    assert describe(VlmsensError("coco.root: /x does not exist"), "coco_subset small").endswith("coco.root: /x does not exist")
