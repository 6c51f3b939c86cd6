"""The workflow as users drive it: the demo end to end, lint, a dry run of the real grid,
rerunning one cell, and configs that must fail before any job starts."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import CPU_DEMO, DEMO, REPO, copy_workflow, fake_hub_snapshot, snakemake
from invariants import check_recipes, check_validation

CELL_FILES = ("per-layer-sensitivity.json", "per-layer-sensitivity.md", "quant_manifest.json", "autoquant_state.pt")

pytestmark = pytest.mark.workflow


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from Snakemake's 'Job stats' table (without the 'total' row)."""
    counts = {}
    table = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match or match.group(1) == "total":
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def test_demo_writes_every_cell_and_the_report(demo_run):
    workdir, log = demo_run
    out = workdir / "results" / "demo"
    cells = sorted(out.glob("autoquant/*/*/*/*"))
    assert len(cells) == 24
    for cell in cells:
        for name in CELL_FILES:
            assert (cell / name).stat().st_size > 0, cell / name
    for name in ("summary.md", "summary.csv", "rank_stability.csv"):
        assert (out / "reports" / name).is_file()
    for model in ("tiny_qwen2_5_vl", "tiny_qwen3_vl"):
        assert (out / "reports" / model / "sensitivity.png").stat().st_size > 10_000
    assert (out / "calib" / "coco2017_vlm_eval.db").is_file()
    # Every cell is validated on the held-out subset, and the report carries the verdicts.
    validations = sorted(out.glob("autoquant/*/*/*/*/validation.json"))
    assert len(validations) == 24 and len(list(out.glob("autoquant/*/*/*/*/validation.md"))) == 24
    summary = (out / "reports" / "validation.md").read_text()
    for path in validations:
        doc = json.loads(path.read_text())
        # The ranking, ratios, bits and verdict are recomputed from the cell's manifest.
        check_validation(doc, json.loads((path.parent / "quant_manifest.json").read_text()))
        assert doc["eval"]["samples"] == 12 and doc["cell"]["size"] == path.parent.name
        assert doc["verdict"] in summary and doc["verdict"] in (path.parent / "validation.md").read_text()
    for model in ("tiny_qwen2_5_vl", "tiny_qwen3_vl"):
        assert (out / "reports" / model / "validation.png").stat().st_size > 10_000
    # Every job left a log and a benchmark record.
    assert len(list((out / "logs" / "autoquant").rglob("*.log"))) == 24
    assert len(list((out / "benchmarks" / "autoquant").rglob("*.tsv"))) == 24
    # One checked export per demo model (export.cells), with its report page.
    exports = sorted(out.glob("export/*/*/*/*/bits-*/vlmsens-export.json"))
    assert [p.relative_to(out / "export").parts[:5] for p in exports] == [
        ("tiny_qwen2_5_vl", "wfp8_afp8", "lm-only", "small", "bits-8.5"),
        ("tiny_qwen3_vl", "wint8_aint8", "all-layers", "small", "bits-8.5")]
    for path in exports:
        doc = json.loads(path.read_text())
        assert doc["check"]["passed"] and doc["check"]["kl_exported_vs_fake_quant"] <= doc["check"]["max_kl"]
        assert (path.parent / "hf_quant_config.json").is_file() and (path.parent / "tokenizer.json").is_file()
        assert str(path.parent.relative_to(workdir)) in Path(f"{path.parent}.md").read_text()
    assert not any("visual" in name for name in json.loads(exports[0].read_text())["exported_layers"])
    manifest = json.loads((out / "autoquant/tiny_qwen3_vl/wint8_aint8/all-layers/large/quant_manifest.json").read_text())
    assert manifest["batches"]["samples"] == 32
    assert manifest["cell"] == {
        "model": "tiny_qwen3_vl", "family": "qwen3_vl", "checkpoint": "results/demo/inputs/checkpoints/tiny_qwen3_vl",
        "format": "wint8_aint8", "candidates": ["wint8_aint8"], "scope": "all-layers", "size": "large",
    }


def test_demo_logs_are_quiet_and_say_progress_device_and_wall(demo_run):
    from vlmsens.logs import KNOWN_WARNINGS

    workdir, console = demo_run
    out = workdir / "results" / "demo"
    # Snakemake's console carries job starts and ends, not the jobs' progress lines or library warnings.
    assert "UserWarning" not in console and "FutureWarning" not in console and " INFO [" not in console
    logs = sorted((out / "logs" / "autoquant").rglob("*.log"))
    assert len(logs) == 24
    for log in logs:
        text = log.read_text()
        # Per-batch progress with an ETA, and each phase's batches and rate.
        assert re.search(r"calibrate: batch \d+/\d+, \d+ done in .+ s/batch\), ETA ", text), log
        assert re.search(r"score: batch \d+/\d+, \d+ done in .+ s/batch\), ETA ", text), log
        assert re.search(r"score done in [\d.]+ s \(\d+ batches, [\d.]+ s/batch\)", text), log
        assert "it/s]" not in text and "s/it]" not in text, f"{log}: a progress bar"
        for pattern, _ in KNOWN_WARNINGS:
            assert len(re.findall(pattern, text)) <= 1, (log, pattern)
        assert " WARNING " not in text, log
    summary = pd.read_csv(out / "reports" / "summary.csv")
    assert not summary["device"].isin(["x86_64", "aarch64", ""]).any(), summary["device"].unique()
    assert (summary["wall_s"] >= summary["search_s"]).all()
    for path in out.glob("autoquant/*/*/*/*/quant_manifest.json"):
        provenance = json.loads(path.read_text())["provenance"]
        assert provenance["job_wall_s"] >= provenance["wall_time_s"] > 0
    front = (out / "reports" / "front_page.md").read_text()
    assert "24 cells" in front and "Bit budget: all 24 cells reached it." in front and "from each job's process start" in front


def test_demo_jobs_find_the_worker_warm(demo_run):
    """The sample-encoding jobs start the worker for the GPU jobs (same settings, so no GPU job starts
    or retires one), and every recipes job runs in one of its warm standbys."""
    workdir, _ = demo_run
    logs = workdir / "results" / "demo" / "logs"
    gpu_logs = sorted((logs / "autoquant").rglob("*.log")) + sorted((logs / "validate").rglob("*.log"))
    assert len(gpu_logs) == 48
    for log in gpu_logs:
        text = log.read_text()
        assert "worker: job finished" in text, log
        assert "starting a server" not in text and "retiring it" not in text, log
    recipes = sorted((logs / "recipes").rglob("*.log"))
    assert len(recipes) == 24
    for log in recipes:
        assert "worker: job finished" in log.read_text(), log
    # Each cell's process stays, holding its model, for its validation (vlmsens.handoff); a validation that
    # came in time measured on that model (no load, no restore), the others rebuilt it, and each says which.
    results = workdir / "results" / "demo" / "autoquant"
    for log in sorted((logs / "autoquant").rglob("*.log")):
        assert "exit status 0 (its process stays, holding the cell's model)" in log.read_text(), log
    for log in sorted((logs / "validate").rglob("*.log")):
        text = log.read_text()
        source = json.loads((results / log.relative_to(logs / "validate").with_suffix("") / "validation.json").read_text())
        if source["model_source"] == "kept by the cell's process":
            assert "handoff done in" in text and "load done in" not in text and "restore done in" not in text, log
        else:
            assert source["model_source"] == "restored from the cell's search state"
            assert "restore done in" in text and "handoff done in" not in text, log


def test_demo_recipes_meet_their_budgets_and_report_each_disagreement(demo_run, capsys):
    import pandas as pd

    workdir, _ = demo_run
    out = workdir / "results" / "demo"
    recipe_files = sorted(out.glob("recipes/*/*/*/*/recipes.json"))
    assert len(recipe_files) == 24
    disagreements = []
    for path in recipe_files:
        cell = path.parent.relative_to(out / "recipes")
        manifest = json.loads((out / "autoquant" / cell / "quant_manifest.json").read_text())
        payload = json.loads(path.read_text())
        assert payload["budgets"] == [8.25, 8.5, 9.0, 10.0]
        disagreements += check_recipes(payload, manifest, (path.parent / "recipes.md").read_text())
    # The per-model recipe tables flag exactly the disagreeing recipes.
    flagged = set()
    for model in ("tiny_qwen2_5_vl", "tiny_qwen3_vl"):
        frame = pd.read_csv(out / "reports" / model / "recipes.csv")
        assert len(frame) == 12 * 4
        rows = frame[~frame["milp_agrees"]]
        flagged |= {(model, r["format"], r["scope"], r["size"], r["budget_bits"]) for _, r in rows.iterrows()}
    expected = {(r["cell"]["model"], r["cell"]["format"], r["cell"]["scope"], r["cell"]["size"], r["budget_bits"])
                for r in disagreements}
    assert flagged == expected
    with capsys.disabled():
        print(f"\n[test_workflow] {len(disagreements)} of {24 * 4} demo recipes where ModelOpt's pick and the MILP's "
              f"disagree, each reported with its gap: "
              + ", ".join(f"{r['cell']['model']}/{r['cell']['format']}/{r['cell']['scope']}/{r['cell']['size']}@"
                          f"{r['budget_bits']:g} {r['cross_check']['score_gap_rel']:+.3%}" for r in disagreements))


def test_demo_sizes_are_nested_and_distinct(demo_run):
    from vlmsens.calib import read_calib_db

    workdir, _ = demo_run
    calib = workdir / "results" / "demo" / "calib"
    rows = {s: read_calib_db(calib / f"coco2017_vlm_calib_{s}.db")[0] for s in ("small", "medium", "large")}
    assert [len(rows[s]) for s in ("small", "medium", "large")] == [8, 16, 32]
    assert rows["medium"][:8] == rows["small"] and rows["large"][:16] == rows["medium"]
    eval_rows, _ = read_calib_db(calib / "coco2017_vlm_eval.db")
    assert not {r.image_relpath for r in eval_rows} & {r.image_relpath for r in rows["large"]}


def test_rerun_one_cell_runs_exactly_that_cell(demo_run):
    workdir, _ = demo_run
    cell = workdir / "results/demo/autoquant/tiny_qwen2_5_vl/wfp8_afp8/lm-only/medium"
    untouched = workdir / "results/demo/autoquant/tiny_qwen3_vl/wint8_aint8/all-layers/small/quant_manifest.json"
    before = untouched.stat().st_mtime_ns
    (cell / "per-layer-sensitivity.json").unlink()
    dry = snakemake(workdir, *DEMO, "-n")
    assert job_counts(dry.stdout)["autoquant"] == 1
    run = snakemake(workdir, *DEMO, *CPU_DEMO)
    counts = job_counts(run.stdout + run.stderr)
    assert counts.get("autoquant") == 1 and counts.get("validate") == 1, counts
    assert not {"prepare_samples", "prepare_eval_samples", "coco_subset", "demo_checkpoint", "demo_coco"} & set(counts)
    assert (cell / "per-layer-sensitivity.json").is_file()
    assert untouched.stat().st_mtime_ns == before
    # Targeting a single file reruns just that cell too.
    target = str(cell.relative_to(workdir) / "quant_manifest.json")
    forced = snakemake(workdir, *DEMO, "-n", "--forcerun", target, "--", target)
    assert job_counts(forced.stdout) == {"autoquant": 1}
    # A lost validation reruns the validation alone, not the cell it validates.
    (cell / "validation.json").unlink()
    assert job_counts(snakemake(workdir, *DEMO, "-n").stdout) == {
        "validate": 1, "validation_report": 1, "validation_plot": 1, "validation_page": 1, "front_page": 1, "all": 1}
    snakemake(workdir, *DEMO, *CPU_DEMO)
    # Nothing is left to do afterwards.
    after = snakemake(workdir, *DEMO, "-n")
    assert "Nothing to be done" in after.stdout + after.stderr


def test_out_of_memory_on_the_first_attempt_retries_at_half_the_batch(demo_run, tmp_path):
    """A real cell whose first AutoQuantize attempt runs out of GPU memory (injected by tests/hooks)."""
    workdir = tmp_path / "wf"
    shutil.copytree(demo_run[0], workdir, symlinks=True)  # a finished demo: only the forced cell runs
    record = tmp_path / "attempts.txt"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "hooks"), os.environ.get("PYTHONPATH")])),
           "VLMSENS_TEST_OOM_RECORD": str(record)}
    cell = Path("results/demo/autoquant/tiny_qwen3_vl/wint8_aint8/lm-only/small")
    target = str(cell / "quant_manifest.json")
    run = snakemake(workdir, *DEMO, *CPU_DEMO, "--forcerun", target, "--", target, env=env)
    assert job_counts(run.stdout + run.stderr) == {"autoquant": 1}
    # Attempt 1 at the configured batch (4) ran out of memory; attempt 2 ran at half of it.
    assert record.read_text().splitlines() == ["oom 4", "ran 2"]
    manifest = json.loads((workdir / target).read_text())
    assert manifest["config"]["batch_size"] == 2
    assert (manifest["batches"]["samples"], manifest["batches"]["batches"]) == (8, 4)
    assert "CUDA out of memory at batch size 4" in run.stdout + run.stderr


def test_lint_is_clean(tmp_path):
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, *DEMO, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def rule_edges(mermaid: str) -> set[tuple[str, str]]:
    """(upstream rule, downstream rule) pairs of a mermaid rule graph; ids and order vary per run."""
    names = dict(re.findall(r"^\s*(id\d+)\[(\w+)\]", mermaid, flags=re.M))
    edges = re.findall(r"^\s*(id\d+) --> (id\d+)", mermaid, flags=re.M)
    return {(names[a], names[b]) for a, b in edges} | {(n, n) for n in names.values()}


def test_committed_rulegraph_is_current(tmp_path):
    workdir = copy_workflow(tmp_path)
    current = rule_edges(snakemake(workdir, *DEMO, "--rulegraph", "mermaid-js").stdout)
    committed = rule_edges((REPO / "docs" / "rulegraph.mmd").read_text())
    assert len(current) > 10
    assert current == committed, "docs/rulegraph.mmd is stale: run `make dag`"


def _placeholder_coco(root: Path, eval_images: int = 100) -> Path:
    """Annotation files only; val2017 lists as many images as the held-out subset takes (preflight)."""
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_train2017.json").write_text('{"images": [], "annotations": []}')
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(eval_images)]
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": []}))
    return root


def test_dry_run_of_the_real_grid(tmp_path, monkeypatch):
    workdir = copy_workflow(tmp_path / "wf")
    coco = _placeholder_coco(tmp_path / "coco")
    # The preflight needs each checkpoint's config and processor files in the local hub cache.
    cache = tmp_path / "hf-cache"
    for repo_id, model_type in (("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl"), ("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl")):
        fake_hub_snapshot(cache, repo_id, model_type)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    proc = snakemake(workdir, "-n", "--config", f"coco={{root: {coco}}}")
    counts = job_counts(proc.stdout)
    assert counts["coco_subset"] == 3
    assert counts["autoquant"] == 24
    assert counts["prepare_samples"] == 12
    assert counts["validate"] == 24 and counts["prepare_eval_samples"] == 4
    assert "demo_checkpoint" not in counts and "demo_coco" not in counts


def _demo_config() -> dict:
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def _real_coco_root(config):
    config["coco"] = {"root": "/nonexistent/coco2017"}


def _missing_checkpoint(config):
    config["models"]["tiny_qwen3_vl"] = {"family": "qwen3_vl", "checkpoint": "/nonexistent/ckpt"}


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(unknwon_key=1), "unknwon_key"),
        (lambda c: c["grid"]["formats"].append("wint3_aint3"), "wint3_aint3"),
        (lambda c: c["sizes"].update(small=0), "small"),
        (lambda c: c["grid"]["models"].append("qwen9"), "qwen9"),
        (lambda c: c["grid"]["scopes"].append("vision-only"), "vision-only"),
        (lambda c: c["grid"]["sizes"].append("huge"), "huge"),
        (_real_coco_root, "coco.root"),
        (_missing_checkpoint, "models.tiny_qwen3_vl.checkpoint"),
        (lambda c: c["autoquant"].update(method="hessian"), "hessian"),
        (lambda c: c.update(formats={"bad": {"candidates": ["wfp8_afp8", "nope"]}}), "nope"),
        (lambda c: c.update(validation={"k": [0.1, 1.5]}), "1.5"),
    ],
    ids=["unknown-key", "unknown-format", "zero-size", "unknown-model", "unknown-scope", "unknown-size",
         "missing-coco-root", "missing-checkpoint", "unknown-method", "bad-candidate", "validation-k-above-1"],
)
def test_bad_config_fails_before_any_job_with_the_key_named(tmp_path, mutate, expected):
    workdir = copy_workflow(tmp_path)
    config = _demo_config()
    mutate(config)
    (workdir / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workdir, "--configfile", "bad.yaml", "--replace-workflow-config", "-n", check=False)
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr
    assert not (workdir / "results").exists()


def test_prebuilt_legacy_dbs_without_images_fail_clearly(tmp_path):
    legacy = REPO / "tests" / "data" / "legacy-calib"
    workdir = copy_workflow(tmp_path / "wf")
    coco = _placeholder_coco(tmp_path / "coco")
    config = _demo_config()
    config["coco"] = {"root": str(coco), "prebuilt_dir": str(legacy)}
    config["sizes"] = {"small": 16, "medium": 128}
    config["grid"]["sizes"] = ["small", "medium"]
    (workdir / "legacy.yaml").write_text(yaml.safe_dump(config))
    target = "results/demo/calib/coco2017_vlm_calib_small.db"
    proc = snakemake(workdir, "--configfile", "legacy.yaml", "--replace-workflow-config", "--cores", "1", target, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "coco2017_vlm_calib_small.db" in text and "file not found" in text
    assert "train2017/000000448463.jpg" in text
    assert not (workdir / target).exists()
