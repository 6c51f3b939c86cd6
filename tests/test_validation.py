"""Validation of rankings on planted and unplanted tiny models (real ModelOpt, CPU).

Planted models carry known INT8-fragile groups (an outlier input channel in a text MLP and in a
vision attention projection; function unchanged). On them the ranking must predict the measured
damage: top-k hurts at least 5× more than bottom-k, the one-group ablations correlate with the
predicted scores (Spearman > 0.5), and the solver's recipe beats random recipes of the same budget.
Every validation is also checked against its cell's manifest (tests/invariants.py). The damage
measure itself is checked on known distributions (the KL direction) and on the real search model
(an all-BF16 selection does exactly no damage).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAMILIES, MAX_PIXELS, MIN_PIXELS
from invariants import check_validation, check_verdict_line, is_established
from legacy_reader import read_legacy
from planting import plant_mlp_outlier, plant_vision_attn_outlier

from vlmsens.calib import build_eval_subset, build_subset
from vlmsens.cell import prepare_samples, run_cell, validate_cell
from vlmsens.errors import VlmsensError
from vlmsens.models import load_processor
from vlmsens.render import primary_format
from vlmsens.validation import (
    Bootstrap,
    bits_tolerance,
    equal_weight_set,
    random_recipe_same_budget,
    rank_correlations,
    ranked_groups,
    ranking_format,
    ratio,
    size_only_recipe,
    stratified_positions,
    under_prediction,
    verdict,
    without_per_sample,
)

PROMPTS = {
    "image_instruction": "Describe this image in one sentence.",
    "text_instruction": "Write a one-sentence caption for an everyday scene.",
    "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS,
}
AUTOQUANT = {"method": "gradient", "effective_bits": {"wint8_aint8": 8.5, "wfp8_afp8": 8.5, "fp8_or_int8": 8.5}, "device": "cpu"}
VALIDATION = {"k": [0.05, 0.10, 0.25], "random_draws": 5, "ablation_groups": 24, "bootstrap_resamples": 400}
# A cheaper validation where the subject is the bookkeeping, not the statistics.
QUICK_VALIDATION = {"k": [0.10], "random_draws": 2, "ablation_groups": 6, "bootstrap_resamples": 50}
CANDIDATE_SET = {"fp8_or_int8": {"candidates": ["wfp8_afp8", "wint8_aint8"]}}
FRAGILE = ("model.language_model.layers.1.mlp", "model.visual.blocks.1.attn")


@pytest.fixture(scope="module")
def dbs(demo_coco, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("validation_dbs")
    build_subset(coco_root=demo_coco, split="train2017", size_name="small", num_samples=16, seed=0,
                 db_path=out / "calib.db", captions_path=out / "calib.txt")
    build_eval_subset(coco_root=demo_coco, split="val2017", num_images=12, seed=0, db_path=out / "eval.db",
                      captions_path=out / "eval.txt")
    return {"calib": out / "calib.db", "eval": out / "eval.db"}


@pytest.fixture(scope="module")
def planted(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    import transformers

    out = {}
    for family, path in tiny_checkpoints.items():
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        plant_mlp_outlier(model, FRAGILE[0])
        plant_vision_attn_outlier(model, FRAGILE[1])
        target = tmp_path_factory.mktemp(f"validation_planted_{family}")
        model.save_pretrained(target)
        load_processor(str(path)).save_pretrained(target)
        out[family] = target
    return out


_RESULTS: dict = {}


def _validated(checkpoint: Path, family: str, fmt: str, scope: str, dbs, coco, workdir: Path,
               formats_cfg: dict | None = None, validation_cfg: dict | None = None) -> tuple[dict, dict]:
    key = (str(checkpoint), fmt, scope)
    if key in _RESULTS:
        return _RESULTS[key]
    workdir.mkdir(parents=True, exist_ok=True)
    samples = {}
    for name in ("calib", "eval"):
        samples[name] = workdir / f"{name}-{scope}.pt"
        if not samples[name].exists():
            prepare_samples(checkpoint=str(checkpoint), calib_db=str(dbs[name]), coco_root=str(coco), scope=scope,
                            inputs="image+caption", prompts=PROMPTS, out_path=str(samples[name]), progress=lambda _: None)
    cell = workdir / f"{fmt}-{scope}"
    cell.mkdir(exist_ok=True)
    common = dict(model_name=f"tiny_{family}", model_cfg={"family": family}, checkpoint=str(checkpoint), format_name=fmt,
                  formats_cfg=formats_cfg or {}, scope=scope, size="small", autoquant_cfg=AUTOQUANT, batch_size=4, seed=0)
    manifest = run_cell(**common, samples_path=str(samples["calib"]), calib_db=str(dbs["calib"]), progress=lambda _: None,
                        outputs={k: str(cell / v) for k, v in (("json", "s.json"), ("markdown", "s.md"),
                                                               ("manifest", "quant_manifest.json"), ("state", "state.pt"))})
    lines: list[str] = []
    doc = validate_cell(**common, validation_cfg=validation_cfg or VALIDATION, manifest_path=str(cell / "quant_manifest.json"),
                        state_path=str(cell / "state.pt"),
                        samples_path=str(samples["calib"]), eval_samples_path=str(samples["eval"]),
                        outputs={"json": str(cell / "validation.json"), "markdown": str(cell / "validation.md")},
                        progress=lines.append)
    doc["_lines"] = lines
    doc["_dir"] = str(cell)
    _RESULTS[key] = (manifest, doc)
    return manifest, doc


def _row(doc: dict, fraction: float) -> dict:
    return next(r for r in doc["top_k"] if r["fraction"] == fraction)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", ["all-layers", "lm-only"])
def test_planted_ranking_predicts_damage(planted, dbs, demo_coco, tmp_path_factory, family, scope):
    manifest, doc = _validated(planted[family], family, "wint8_aint8", scope, dbs, demo_coco,
                               tmp_path_factory.getbasetemp() / f"validate_planted_{family}")
    check_validation(doc, manifest)
    # The planted answer: the verdict says the ranking predicts damage, without "not established".
    assert is_established(doc) and "not established" not in doc["verdict"], doc["verdict"]
    row = _row(doc, 0.10)
    assert row["top"]["within_tolerance"] and row["bottom"]["within_tolerance"], (row["top"]["weight_fraction"], row["bottom"]["weight_fraction"])
    assert all(d["within_tolerance"] for d in row["random"]["draws"])
    assert row["top"]["kl"] >= 5 * row["bottom"]["kl"], (row["top"]["kl"], row["bottom"]["kl"])
    assert row["top"]["kl"] > row["random"]["mean"]["kl"]
    rho = doc["ablations"]["correlation"]["kl"]["spearman"]
    assert rho["value"] > 0.5, rho
    lo, hi = rho["ci95"]
    assert lo <= rho["value"] <= hi
    # the ranking beats size alone: the planted groups are not the largest
    assert row["size_only"]["ratio_largest_smallest"]["kl"] is None or \
        row["ratio_top_bottom"]["kl"] > row["size_only"]["ratio_largest_smallest"]["kl"]
    lo, _ = row["ratio_top_bottom_ci95"]["kl"]
    assert lo > 1, row["ratio_top_bottom_ci95"]
    e2e = doc["end_to_end"]
    assert e2e["recipe"]["bits"] <= e2e["budget_bits"] + 1e-6
    draws = e2e["random_same_budget"]["draws"]
    # random recipes at the solver's bits, within the smallest group's share (no longer a prefix at or under it)
    assert all(draw["within_tolerance"] for draw in draws)
    assert all(abs(draw["bits"] - e2e["recipe"]["bits"]) <= e2e["bits_tolerance"] + 1e-9 for draw in draws)
    # a random recipe may by luck keep the planted groups in BF16 too; most do not
    assert len(draws) == 5 and e2e["random_same_budget"]["recipe_beats"] >= 4
    assert e2e["recipe"]["kl"] < e2e["random_same_budget"]["mean"]["kl"] / 10
    assert e2e["random_same_budget"]["ratio_random_recipe_ci95"]["kl"][0] > 1
    assert e2e["recipe"]["kl"] < e2e["uniform"]["kl"]


def test_planted_vision_group_counts_only_in_all_layers(planted, dbs, demo_coco, tmp_path_factory):
    family = "qwen2_5_vl"
    work = tmp_path_factory.getbasetemp() / f"validate_planted_{family}"
    _, full = _validated(planted[family], family, "wint8_aint8", "all-layers", dbs, demo_coco, work)
    text_manifest, text = _validated(planted[family], family, "wint8_aint8", "lm-only", dbs, demo_coco, work)
    assert any(g.startswith(FRAGILE[1]) for g in _row(full, 0.10)["top"]["groups"])
    towers = {r["tower"] for r in text["ablations"]["rows"]}
    assert "vision" not in towers and "vision" in {r["tower"] for r in full["ablations"]["rows"]}
    # lm-only differs from all-layers in what is quantized, not in what the model sees: its batches
    # hold the images, its text groups score nonzero, and the vision tower stays out of the search.
    assert text_manifest["config"]["inputs"] == text["dataset"]["inputs"] == "image+caption"
    assert text_manifest["batches"]["image_patches_per_sample_max"] > 0 and text["eval"]["image_patches_per_sample_max"] > 0
    assert all(g["scores_raw"]["wint8_aint8"] > 0 for g in text_manifest["groups"])
    assert not any(g["tower"] == "vision" for g in text_manifest["groups"])
    excluded = {g["tower"] for g in text_manifest["excluded_groups"]}
    assert excluded == {"vision"}, excluded


def test_validation_files_schema_and_provenance(planted, dbs, demo_coco, tmp_path_factory):
    family = "qwen3_vl"
    manifest, doc = _validated(planted[family], family, "wint8_aint8", "all-layers", dbs, demo_coco,
                               tmp_path_factory.getbasetemp() / f"validate_planted_{family}")
    on_disk = json.loads((Path(doc["_dir"]) / "validation.json").read_text())
    check_validation(on_disk, manifest)
    assert list(on_disk) == ["schema_version", "cell", "ranking_format", "n_groups", "damage_measure", "settings", "eval",
                             "intervals", "verdict_k", "top_k", "ablations", "end_to_end", "device", "dtype", "kernels",
                             "model_source", "timings_s", "peak_memory", "verdict", "dataset", "provenance"]
    assert on_disk["kernels"] == {"kernels": "eager", "fused": {}}  # a CPU job runs transformers as shipped
    assert on_disk["model_source"] == "restored from the cell's search state"  # in-process: nothing was kept
    assert "(k = 10%" in on_disk["verdict"]
    assert [r["fraction"] for r in on_disk["top_k"]] == [0.05, 0.10, 0.25]
    assert on_disk["intervals"]["resamples"] == 400 and "held-out samples" in on_disk["intervals"]["covers"]
    assert all(len(r["random"]["draws"]) == 5 for r in on_disk["top_k"])
    assert on_disk["ablations"]["correlation"]["kl"]["n"] == min(24, on_disk["n_groups"])
    assert on_disk["eval"]["samples"] == 12 and on_disk["eval"]["loss_tokens"] > 0
    assert 0 < on_disk["eval"]["text_layer_forwards_skipped"] < on_disk["eval"]["text_layer_forwards"]
    assert set(on_disk["timings_s"]) >= {"load", "restore", "reference", "top-k", "ablations", "end-to-end"}
    assert {"packages", "git", "inputs_sha256", "wall_time_s"} <= set(on_disk["provenance"])
    from vlmsens.provenance import sha256_file

    # hashed on a thread beside the measurement: still the files' own checksums
    assert on_disk["provenance"]["inputs_sha256"] == {
        "manifest": sha256_file(Path(doc["_dir"]) / "quant_manifest.json"),
        "state": sha256_file(Path(doc["_dir"]) / "state.pt"),
        "samples": sha256_file(on_disk["dataset"]["calibration_samples"]),
        "held_out_samples": sha256_file(on_disk["dataset"]["held_out_samples"])}
    md = (Path(doc["_dir"]) / "validation.md").read_text()
    assert on_disk["verdict"] in md and "## One-group ablations" in md and "## End to end" in md
    for phase in ("restore", "reference", "top-k", "ablations", "end-to-end"):
        assert any(line.startswith(f"{phase} done in") for line in doc["_lines"]), phase


def test_validation_is_deterministic(tiny_checkpoints, dbs, demo_coco, tmp_path_factory, tmp_path):
    """A second validation of the same cell repeats every number (on the quick settings of the
    candidate-set cell: the determinism of a validation does not depend on its size)."""
    family = "qwen2_5_vl"
    _, first = _validated(tiny_checkpoints[family], family, "fp8_or_int8", "all-layers", dbs, demo_coco,
                          tmp_path_factory.getbasetemp() / f"validate_candidates_{family}",
                          formats_cfg=CANDIDATE_SET, validation_cfg=QUICK_VALIDATION)
    cell = Path(first["_dir"])
    work = cell.parent
    again = validate_cell(model_name=f"tiny_{family}", model_cfg={"family": family}, checkpoint=str(tiny_checkpoints[family]),
                          format_name="fp8_or_int8", formats_cfg=CANDIDATE_SET, scope="all-layers", size="small",
                          autoquant_cfg=AUTOQUANT, validation_cfg=QUICK_VALIDATION, batch_size=4, seed=0,
                          manifest_path=str(cell / "quant_manifest.json"), state_path=str(cell / "state.pt"),
                          samples_path=str(work / "calib-all-layers.pt"),
                          eval_samples_path=str(work / "eval-all-layers.pt"),
                          outputs={"json": str(tmp_path / "v.json"), "markdown": str(tmp_path / "v.md")}, progress=lambda _: None)
    first_on_disk = json.loads((cell / "validation.json").read_text())
    for key in ("top_k", "ablations", "end_to_end", "verdict", "intervals"):
        # compared as JSON text: an undefined interval is NaN, which equals nothing, not even itself
        assert json.dumps(again[key], sort_keys=True) == json.dumps(first_on_disk[key], sort_keys=True), key


def test_a_validation_on_the_cells_own_model_measures_what_a_restored_one_does(tiny_checkpoints, dbs, demo_coco, tmp_path,
                                                                             monkeypatch):
    """In the worker's processes a cell keeps its search model (vlmsens.handoff) and the cell's validation,
    run next in the same process, takes it instead of loading the checkpoint and restoring the search state:
    every number is the one a validation on the restored model measures. The model is taken once, and only
    for the state file the cell wrote."""
    from vlmsens import handoff

    monkeypatch.setattr(handoff, "_enabled", True)
    monkeypatch.setattr(handoff, "_offered", None)
    monkeypatch.setattr(handoff, "_held", None)
    family = "qwen2_5_vl"
    samples = {}
    for name in ("calib", "eval"):
        samples[name] = tmp_path / f"{name}.pt"
        prepare_samples(checkpoint=str(tiny_checkpoints[family]), calib_db=str(dbs[name]), coco_root=str(demo_coco),
                        scope="all-layers", inputs="image+caption", prompts=PROMPTS, out_path=str(samples[name]),
                        progress=lambda _: None)
    common = dict(model_name=f"tiny_{family}", model_cfg={"family": family}, checkpoint=str(tiny_checkpoints[family]),
                  format_name="fp8_or_int8", formats_cfg=CANDIDATE_SET, scope="all-layers", size="small",
                  autoquant_cfg=AUTOQUANT, batch_size=4, seed=0)
    cell = tmp_path / "cell"
    cell.mkdir()
    run_cell(**common, samples_path=str(samples["calib"]), calib_db=str(dbs["calib"]), progress=lambda _: None,
             outputs={k: str(cell / v) for k, v in (("json", "s.json"), ("markdown", "s.md"),
                                                    ("manifest", "quant_manifest.json"), ("state", "state.pt"))})
    assert handoff.held_key() == handoff.state_key(cell / "state.pt")

    def validate(name: str) -> tuple[dict, list[str]]:
        lines: list[str] = []
        doc = validate_cell(**common, validation_cfg=QUICK_VALIDATION, manifest_path=str(cell / "quant_manifest.json"),
                            state_path=str(cell / "state.pt"), samples_path=str(samples["calib"]),
                            eval_samples_path=str(samples["eval"]),
                            outputs={"json": str(tmp_path / f"{name}.json"), "markdown": str(tmp_path / f"{name}.md")},
                            progress=lines.append)
        return doc, lines

    kept, kept_lines = validate("kept")
    assert handoff.held_key() is None  # taken once
    restored, restored_lines = validate("restored")
    assert kept["model_source"] == "kept by the cell's process"
    assert restored["model_source"] == "restored from the cell's search state"
    assert any(line.startswith("handoff done in") for line in kept_lines)
    assert not any(line.startswith(("load done in", "restore done in")) for line in kept_lines)
    assert any(line.startswith("restore done in") for line in restored_lines)
    assert restored["eval"]["configurations_measured"] == kept["eval"]["configurations_measured"] > 0
    for key in ("top_k", "ablations", "end_to_end", "verdict", "eval"):
        assert json.dumps(kept[key], sort_keys=True) == json.dumps(restored[key], sort_keys=True), key

    # a state file rewritten since the cell ran (another run of it) is not the kept model's: nothing is taken
    handoff.offer(object())
    handoff.seal(cell / "state.pt")
    (cell / "state.pt").write_bytes((cell / "state.pt").read_bytes() + b"\0")
    assert handoff.take(cell / "state.pt") is None and handoff.held_key() is None


def test_outside_the_workers_processes_a_cell_keeps_nothing(monkeypatch, tmp_path):
    from vlmsens import handoff

    monkeypatch.setattr(handoff, "_enabled", False)
    monkeypatch.setattr(handoff, "_held", None)
    state = tmp_path / "state.pt"
    state.write_bytes(b"x")
    handoff.offer(object())
    assert handoff.seal(state) is None and handoff.take(state) is None


def test_held_out_samples_must_not_overlap_calibration(planted, dbs, demo_coco, tmp_path_factory, tmp_path):
    family = "qwen3_vl"
    _, first = _validated(planted[family], family, "wint8_aint8", "all-layers", dbs, demo_coco,
                          tmp_path_factory.getbasetemp() / f"validate_planted_{family}")
    cell = Path(first["_dir"])
    calib = str(cell.parent / "calib-all-layers.pt")
    with pytest.raises(VlmsensError, match="shares 16 image"):
        validate_cell(model_name=f"tiny_{family}", model_cfg={"family": family}, checkpoint=str(planted[family]),
                      format_name="wint8_aint8", formats_cfg={}, scope="all-layers", size="small",
                      autoquant_cfg=AUTOQUANT, validation_cfg=VALIDATION, batch_size=4, seed=0,
                      manifest_path=str(cell / "quant_manifest.json"), state_path=str(cell / "state.pt"),
                      samples_path=calib, eval_samples_path=calib,
                      outputs={"json": str(tmp_path / "v.json"), "markdown": str(tmp_path / "v.md")}, progress=lambda _: None)
    assert not (tmp_path / "v.json").exists() and not (tmp_path / "v.md").exists()


def test_validation_of_a_candidate_set_cell(tiny_checkpoints, dbs, demo_coco, tmp_path_factory):
    """Groups ranked by the set's fewest-bits member (ties: the first listed), the recipe mixing formats as selected."""
    family = "qwen2_5_vl"
    manifest, doc = _validated(tiny_checkpoints[family], family, "fp8_or_int8", "all-layers", dbs, demo_coco,
                               tmp_path_factory.getbasetemp() / f"validate_candidates_{family}",
                               formats_cfg=CANDIDATE_SET, validation_cfg=QUICK_VALIDATION)
    assert manifest["cell"]["candidates"] == ["wfp8_afp8", "wint8_aint8"]
    assert doc["ranking_format"] == "wfp8_afp8"  # both 8 bits: the first listed (formats.ranking_format)
    check_validation(doc, manifest)
    for row in doc["ablations"]["rows"]:
        assert row["predicted_score"] != next(g for g in manifest["groups"] if g["layer"] == row["layer"])["scores_raw"]["wint8_aint8"]
    selected = {g["selected_format"] for g in manifest["groups"]}
    assert selected <= {"wfp8_afp8", "wint8_aint8", "bf16"} and selected - {"bf16"}
    assert doc["end_to_end"]["recipe"]["quantized_groups"] == sum(g["selected_format"] != "bf16" for g in manifest["groups"])


def test_evaluator_measures_kl_from_bf16_to_quantized(monkeypatch):
    """Known distributions: KL(P_bf16 ‖ Q_quantized) per caption token, not the reverse, and the loss change."""
    import torch

    from vlmsens import validation
    from vlmsens.validation import Evaluator

    targets = torch.tensor([0, 2, 1])

    class Model:
        logits = torch.tensor([[3.0, 0.0, -2.0], [0.5, 0.5, 0.0], [1.0, -1.0, 2.0]])

    model = Model()
    monkeypatch.setattr(validation, "caption_logits", lambda m, batch, inputs=None: (m.logits.clone(), targets))
    # two samples: the first predicts two caption tokens, the second one (labels are shifted by one)
    labels = torch.tensor([[-100, 0, 2, -100], [-100, 1, -100, -100]])
    evaluator = Evaluator(model, [{"labels": labels}])
    bf16_loss = evaluator.set_reference()
    assert evaluator.tokens == [2, 1]
    assert bf16_loss == pytest.approx(float(torch.nn.functional.cross_entropy(Model.logits, targets)))
    assert without_per_sample(evaluator.measure()) == {"loss": bf16_loss, "loss_increase": 0.0, "kl": 0.0}

    model.logits = torch.tensor([[0.0, 1.0, 1.0], [3.0, -1.0, 0.0], [-1.0, 2.0, 0.0]])
    p, q = torch.softmax(Model.logits, -1), torch.softmax(model.logits, -1)
    forward = float((p * (p.log() - q.log())).sum()) / 3
    reverse = float((q * (q.log() - p.log())).sum()) / 3
    assert abs(forward - reverse) > 0.1  # the two directions are told apart
    measured = evaluator.measure()
    assert measured["kl"] == pytest.approx(forward, rel=1e-5)
    per_position = (p * (p.log() - q.log())).sum(-1)
    assert measured["per_sample"]["kl"] == pytest.approx([float(per_position[:2].sum()), float(per_position[2])], rel=1e-5)
    loss = float(torch.nn.functional.cross_entropy(model.logits, targets))
    assert measured["loss"] == pytest.approx(loss, rel=1e-6)
    assert measured["loss_increase"] == pytest.approx(loss - bf16_loss, rel=1e-5)


def _calibrated_search_model(checkpoint, family, dbs, demo_coco, tmp_path, scope, inputs):
    """A tiny cell's search model calibrated on the calib subset, its searched groups, their switch and
    an evaluator on the eval subset (batches of 4)."""
    from vlmsens.autoquant import CellSpec, PhaseClock, device_batches, load_cell_model, search
    from vlmsens.batches import load_samples
    from vlmsens.families import get_family
    from vlmsens.formats import format_registry, resolve_format
    from vlmsens.validation import Evaluator, RecipeSwitch

    paths = {}
    for name in ("calib", "eval"):
        paths[name] = tmp_path / f"{name}.pt"
        prepare_samples(checkpoint=str(checkpoint), calib_db=str(dbs[name]), coco_root=str(demo_coco), scope=scope,
                        inputs=inputs, prompts=PROMPTS, out_path=str(paths[name]), progress=lambda _: None)
    spec = CellSpec(model="tiny", family=get_family(family), checkpoint=str(checkpoint), format_name="wint8_aint8",
                    formats=resolve_format("wint8_aint8", format_registry({})), scope=scope, size="small",
                    effective_bits=8.5, batch_size=4, device="cpu")
    clock = PhaseClock(lambda _: None)
    model, calib, device, dtype, _ = load_cell_model(spec, load_samples(paths["calib"])[0], clock)
    model, state, _, _ = search(model, spec, calib, clock)
    layers = [name.removesuffix(".quant_recipe") for name, stat in state["candidate_stats"].items() if len(stat["formats"]) > 1]
    switch = RecipeSwitch(model, spec.formats, layers)
    evaluator = Evaluator(model, device_batches(model, load_samples(paths["eval"])[0], 4, device, dtype))
    return layers, switch, evaluator


def test_all_bf16_selection_does_no_damage_on_the_search_model(tiny_checkpoints, dbs, demo_coco, tmp_path):
    """The per-group switch really restores BF16: after quantizing every group, all-BF16 gives KL = Δloss = 0."""
    family = "qwen3_vl"
    layers, switch, evaluator = _calibrated_search_model(tiny_checkpoints[family], family, dbs, demo_coco, tmp_path,
                                                          "lm-only", "caption-only")
    switch.apply({})
    bf16_loss = evaluator.set_reference()
    switch.apply(dict.fromkeys(layers, "wint8_aint8"))
    quantized = evaluator.measure()
    assert quantized["kl"] > 0 and quantized["loss"] != bf16_loss
    switch.apply({})
    again = evaluator.measure()
    assert without_per_sample(again) == {"loss": bf16_loss, "loss_increase": 0.0, "kl": 0.0}
    assert set(again["per_sample"]["kl"]) == {0.0} and len(again["per_sample"]["kl"]) == len(evaluator.tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_restored_calibration_measures_what_the_cells_own_model_does(family, tiny_checkpoints, dbs, demo_coco, tmp_path):
    """Validate and ladder restore the cell's calibration from its saved search state instead of
    calibrating again: no forward runs, and every configuration (each candidate format, mixed, vision
    groups included) measures exactly what it measures on the model the cell calibrated and scored."""
    from vlmsens.autoquant import (
        CellSpec,
        PhaseClock,
        device_batches,
        load_cell_model,
        load_search_state,
        load_spec_model,
        save_search_state,
        search,
    )
    from vlmsens.batches import load_samples
    from vlmsens.families import get_family
    from vlmsens.formats import format_registry, resolve_format
    from vlmsens.validation import Evaluator, RecipeSwitch

    checkpoint = tiny_checkpoints[family]
    paths = {}
    for name in ("calib", "eval"):
        paths[name] = tmp_path / f"{name}.pt"
        prepare_samples(checkpoint=str(checkpoint), calib_db=str(dbs[name]), coco_root=str(demo_coco), scope="all-layers",
                        inputs="image+caption", prompts=PROMPTS, out_path=str(paths[name]), progress=lambda _: None)
    spec = CellSpec(model="tiny", family=get_family(family), checkpoint=str(checkpoint), format_name="fp8_or_int8",
                    formats=resolve_format("fp8_or_int8", format_registry(CANDIDATE_SET)), scope="all-layers", size="small",
                    effective_bits=8.5, batch_size=4, device="cpu")
    clock = PhaseClock(lambda _: None)
    cell_model, calib, device, dtype, _ = load_cell_model(spec, load_samples(paths["calib"])[0], clock)
    cell_model, state, _, _ = search(cell_model, spec, calib, clock)
    save_search_state(state, tmp_path / "state.pt")

    restored_model, _, _ = load_spec_model(spec, clock)
    forwards = []
    hook = restored_model.register_forward_pre_hook(lambda *_: forwards.append(1))
    restored_model, _, _, _ = search(restored_model, spec, [], clock, restore=load_search_state(tmp_path / "state.pt"))
    hook.remove()
    assert forwards == []

    layers = [name.removesuffix(".quant_recipe") for name, stat in state["candidate_stats"].items() if len(stat["formats"]) > 1]
    assert any(".visual." in f".{layer}" or layer.startswith(("visual", "model.visual")) for layer in layers)
    eval_samples = load_samples(paths["eval"])[0]
    selections = [dict.fromkeys(layers, "wint8_aint8"), dict.fromkeys(layers, "wfp8_afp8"),
                  {layer: ("wfp8_afp8", "wint8_aint8", "bf16")[i % 3] for i, layer in enumerate(layers)}]
    measured = {}
    for name, model in (("cell", cell_model), ("restored", restored_model)):
        switch = RecipeSwitch(model, spec.formats, layers)
        evaluator = Evaluator(model, device_batches(model, eval_samples, 4, device, dtype))
        switch.apply({})
        evaluator.set_reference()
        measured[name] = []
        for selection in selections:
            switch.apply(selection)
            measured[name].append(evaluator.measure())
    assert all(m["kl"] > 0 for m in measured["cell"])
    assert measured["restored"] == measured["cell"]  # per-sample sums too, exactly


def test_a_search_state_without_calibration_is_refused(tiny_checkpoints):
    from vlmsens.autoquant import CellSpec, PhaseClock, load_spec_model, search
    from vlmsens.families import get_family
    from vlmsens.formats import format_registry, resolve_format

    spec = CellSpec(model="tiny", family=get_family("qwen3_vl"), checkpoint=str(tiny_checkpoints["qwen3_vl"]),
                    format_name="wint8_aint8", formats=resolve_format("wint8_aint8", format_registry({})), scope="lm-only",
                    size="small", effective_bits=8.5, batch_size=4, device="cpu")
    clock = PhaseClock(lambda _: None)
    model, _, _ = load_spec_model(spec, clock)
    with pytest.raises(VlmsensError, match=r"no calibration for \['wint8_aint8'\].*rerun the cell"):
        search(model, spec, [], clock, restore={"candidate_stats": {"x": {}}, "quantizer_states": {}})


def test_a_search_state_from_another_search_is_refused(tiny_checkpoints, dbs, demo_coco, tmp_path):
    """ModelOpt's own check of the saved state against the search (here: a state without its formats'
    signature, as an older cell's) ends in one clear line, not a ModelOpt traceback."""
    from vlmsens.autoquant import CellSpec, PhaseClock, load_cell_model, load_spec_model, search
    from vlmsens.batches import load_samples
    from vlmsens.families import get_family
    from vlmsens.formats import format_registry, resolve_format

    family = "qwen3_vl"
    checkpoint = tiny_checkpoints[family]
    prepare_samples(checkpoint=str(checkpoint), calib_db=str(dbs["calib"]), coco_root=str(demo_coco), scope="lm-only",
                    inputs="caption-only", prompts=PROMPTS, out_path=str(tmp_path / "calib.pt"), progress=lambda _: None)
    spec = CellSpec(model="tiny", family=get_family(family), checkpoint=str(checkpoint), format_name="wint8_aint8",
                    formats=resolve_format("wint8_aint8", format_registry({})), scope="lm-only", size="small",
                    effective_bits=8.5, batch_size=4, device="cpu")
    clock = PhaseClock(lambda _: None)
    model, calib, *_ = load_cell_model(spec, load_samples(tmp_path / "calib.pt")[0], clock)
    _, state, _, _ = search(model, spec, calib, clock)
    state["quantization_formats_signature"] = None
    fresh, _, _ = load_spec_model(spec, clock)
    with pytest.raises(VlmsensError, match="search state does not fit this search.*rerun the cell"):
        search(fresh, spec, [], clock, restore=state)


def test_text_layer_recordings_stay_on_the_gpu_only_within_the_budget(monkeypatch):
    """The reference's recordings go to the host off the GPU, without a budget, or past the budget's reserved memory."""
    import torch

    from vlmsens.prefix_reuse import TextPrefixReuse

    class CudaLike:
        is_cuda, device = True, "cuda:0"

        def numel(self):
            return 1000

        def element_size(self):
            return 2

    reserved = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved["bytes"])
    reuse = TextPrefixReuse(object(), device_budget_bytes=10_000)
    assert reuse._keep_on_device(CudaLike())
    reserved["bytes"] = 8_001  # 8,001 reserved + 2,000 recorded > 10,000
    assert not reuse._keep_on_device(CudaLike())
    assert not TextPrefixReuse(object())._keep_on_device(CudaLike())  # no budget: the host
    assert not reuse._keep_on_device(torch.zeros(3))  # a CPU tensor stays where it is: nothing to keep


def test_text_prefix_reuse_is_off_where_layers_are_not_found_or_return_tuples():
    """No text decoder layers, or layers returning a tuple (older transformers): nothing recorded, nothing skipped."""
    import torch

    from vlmsens.prefix_reuse import TextPrefixReuse

    class Layer(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return (hidden_states + 1,)

    assert not TextPrefixReuse(torch.nn.Linear(2, 2)).supported
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.language_model = torch.nn.Module()
    model.model.language_model.layers = torch.nn.ModuleList([Layer(), Layer()])
    prefix = TextPrefixReuse(model)
    assert prefix.supported and prefix.n_layers == 2
    with prefix.recording(0):
        for layer in prefix.layers:
            layer(torch.zeros(1, 3, 2))
    assert not prefix.supported and not prefix.has(0) and prefix.start_layer(["lm_head"]) == 0
    with prefix.skipping(0, 2) as skipped:
        assert skipped == 0 and "forward" not in prefix.layers[0].__dict__


def test_ratio_is_undefined_without_a_positive_denominator():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(0.0, 2.0) == 0.0
    assert ratio(1.0, 0.0) is None and ratio(1.0, -1e-12) is None
    assert ratio(math.nan, 1.0) is None and ratio(math.inf, 1.0) is None


# --- pure functions -------------------------------------------------------------------------


def _manifest(scores: list[float], costs: list[float] | None = None) -> dict:
    costs = costs or [1.0] * len(scores)
    groups = [{"layer": f"l{i}", "tower": "text", "scores_raw": {"wint8_aint8": s}, "scores_per_token": {"wint8_aint8": s},
               "costs": {"wint8_aint8": c / 2, "bf16": c}, "uncompressed_cost": c, "selected_format": "wint8_aint8"}
              for i, (s, c) in enumerate(zip(scores, costs, strict=True))]
    return {"cell": {"candidates": ["wint8_aint8"]}, "formats": {"wint8_aint8": {"bits": 8.0}}, "groups": groups,
            "search": {"effective_bits_target": 12.0}}


def test_ranking_and_sampling_helpers():
    manifest = _manifest([0.1, 3.0, 2.0, 0.5])
    assert [g["layer"] for g in ranked_groups(manifest, "wint8_aint8")] == ["l1", "l2", "l3", "l0"]
    both = {"cell": {"candidates": ["wfp8_afp8", "wint4_afp16"]}, "formats": {"wfp8_afp8": {"bits": 8.0}, "wint4_afp16": {"bits": 4.0}}}
    assert ranking_format(both) == "wint4_afp16"
    # one definition for the report and the validation: equal bits go to the first listed candidate
    tied = {"cell": {"candidates": ["wint8_aint8", "wfp8_afp8"]}, "formats": {"wfp8_afp8": {"bits": 8.0}, "wint8_aint8": {"bits": 8.0}}}
    assert ranking_format(tied) == primary_format(tied) == "wint8_aint8"
    assert stratified_positions(5, 24) == [0, 1, 2, 3, 4]
    positions = stratified_positions(100, 24)
    assert positions[0] == 0 and positions[-1] == 99 and len(positions) == 24


def test_random_and_size_only_recipes_reach_the_solvers_bits_within_the_smallest_groups_share():
    import numpy as np

    from vlmsens.recipes import bits_of

    manifest = _manifest([1.0] * 10, costs=[1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    tolerance = bits_tolerance(manifest, "wint8_aint8")
    assert tolerance == pytest.approx(16 * 0.5 / 30)  # the smallest group saves half of its cost 1 of 30
    rng = np.random.default_rng(0)
    for target in (8.5, 10.0, 12.0, 13.7):
        for _ in range(20):
            bits = bits_of(manifest, random_recipe_same_budget(manifest, "wint8_aint8", target, rng))
            assert abs(bits - target) <= tolerance + 1e-9, (target, bits)
        size = size_only_recipe(manifest, "wint8_aint8", target)
        assert abs(bits_of(manifest, size) - target) <= tolerance + 1e-9
        if target >= 10:  # the size-only recipe keeps the largest groups in BF16, quantizes the smallest
            assert "bf16" in (size["l4"], size["l9"]) and size["l0"] == size["l5"] == "wint8_aint8", size


def test_equal_weight_sets_quantize_the_same_weight_whatever_the_order():
    # scores grow with size, as gradient scores do: by count, the top set would weigh far more than the bottom one
    costs = [10, 8, 6, 4, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    manifest = _manifest([float(c) for c in costs], costs=costs)
    ranked = ranked_groups(manifest, "wint8_aint8")

    def weight(chosen):
        return sum(costs[int(layer[1:])] for layer in chosen) / sum(costs)

    # 25 % (10 of 40): the largest, most sensitive group alone against ten small ones
    assert equal_weight_set(manifest, ranked, 0.25) == ["l0"]
    bottom = equal_weight_set(manifest, ranked[::-1], 0.25)
    assert len(bottom) == 10 and weight(bottom) == 0.25
    # 45 %: the top set reaches it; the bottom set is drawn from the least sensitive half of the weight only
    # (16 of 40), so it never reaches into the top of the ranking, and falls short
    top = equal_weight_set(manifest, ranked, 0.45)
    assert top == ["l0", "l1"] and weight(top) == 0.45
    assert weight(equal_weight_set(manifest, ranked[::-1], 0.45)) == 0.4
    # 5 %: no group of the sensitive half is that light: an empty set, which no ratio uses
    assert equal_weight_set(manifest, ranked, 0.05) == []
    for fraction in (0.05, 0.25, 0.45):
        assert not set(equal_weight_set(manifest, ranked, fraction)) & set(equal_weight_set(manifest, ranked[::-1], fraction))


def test_bootstrap_intervals_cover_the_sample_spread():
    import numpy as np

    rng = np.random.default_rng(1)
    tokens = [10] * 40
    boot = Bootstrap(tokens, 500, 0)
    # per-token values: a set with ratio exactly 2 on every sample has a degenerate interval at 2
    base = rng.uniform(0.5, 1.5, size=40) * 10
    assert boot.ratio(2 * base, [base]) == pytest.approx([2.0, 2.0])
    # noisy samples widen it around the point estimate
    noisy = 2 * base * rng.uniform(0.2, 1.8, size=40)
    lo, hi = boot.ratio(noisy, [base])
    point = noisy.sum() / base.sum()
    assert lo < point < hi and hi - lo > 0.2
    # values: resampled sums over resampled tokens, one column per configuration
    values = boot.values([base, 2 * base])
    assert values.shape == (500, 2) and np.allclose(values[:, 1], 2 * values[:, 0])
    assert all(math.isnan(v) for v in Bootstrap(tokens, 0, 0).ratio(noisy, [base]))  # 0 resamples: no interval


def test_under_prediction_names_the_tower_above_the_trend():
    """Vision groups doing 10× the damage their score predicts, relative to the text groups."""
    import numpy as np

    rng = np.random.default_rng(0)
    predicted = list(np.geomspace(1e-6, 1e-3, 12))
    towers = ["text", "vision"] * 6
    tokens = [5] * 20
    per_sample = []
    for score, tower in zip(predicted, towers, strict=True):
        damage = score * (10 if tower == "vision" else 1)
        per_sample.append(list(damage * 5 * rng.uniform(0.8, 1.2, size=20)))
    out = under_prediction(predicted, per_sample, tokens, towers, 300, 0)
    assert out["vision"]["factor"] == pytest.approx(10, rel=0.2)
    assert out["vision"]["ci95"][0] > 1 and out["text"]["ci95"][1] < 1
    assert out["text"]["factor"] == pytest.approx(1 / out["vision"]["factor"])


def test_kendall_rows_equal_scipy_row_by_row_with_ties_and_constant_rows():
    """The vectorised bootstrap τ-b is scipy's kendalltau on every row (bootstrap rows repeat groups, so ties abound)."""
    import numpy as np
    from scipy import stats

    from vlmsens.validation import _kendall_rows

    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, size=(300, 24)).astype(float)  # few distinct values: ties in most rows
    y = x * 0.5 + rng.normal(size=(300, 24))
    y[:, ::5] = np.round(y[:, ::5])
    x[7] = 2.0  # a constant row: τ undefined
    expected = np.array([stats.kendalltau(a, b).statistic for a, b in zip(x, y, strict=True)])
    got = _kendall_rows(x, y, chunk=64)
    assert np.isnan(got[7]) and np.isnan(expected[7])
    assert np.allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_rank_correlations_known_answers():
    perfect = rank_correlations([1, 2, 3, 4, 5, 6], [10, 20, 30, 40, 50, 60], 200, 0)
    assert perfect["spearman"]["value"] == pytest.approx(1.0) and perfect["kendall"]["value"] == pytest.approx(1.0)
    reverse = rank_correlations([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], 200, 0)
    assert reverse["spearman"]["value"] == pytest.approx(-1.0)
    noisy = rank_correlations([1, 2, 3, 4, 5, 6, 7, 8], [2, 1, 4, 3, 6, 5, 8, 7], 500, 0)
    lo, hi = noisy["spearman"]["ci95"]
    assert lo < noisy["spearman"]["value"] < 1.0 and hi <= 1.0
    assert math.isnan(rank_correlations([1, 2], [1, 2], 100, 0)["spearman"]["value"])


def _verdict_doc() -> dict:
    return {"n_groups": 40, "verdict_k": 0.1, "settings": {"bootstrap_resamples": 1000}, "eval": {"samples": 100},
            "ablations": {"correlation": {"kl": {"spearman": {"value": 0.8234, "ci95": [0.61, 0.93]}}},
                          "size_only": {"kl": {"spearman": {"value": 0.4, "ci95": [0.05, 0.7]}}},
                          "towers": {"text": {"under_prediction": {"factor": 0.2, "ci95": [0.1, 0.4]}},
                                     "vision": {"under_prediction": {"factor": 5.0, "ci95": [2.5, 9.0]}}}},
            "top_k": [{"fraction": 0.1, "k": 4, "top": {"k": 4}, "bottom": {"k": 9}, "ratio_top_bottom": {"kl": 12.34},
                       "ratio_top_bottom_ci95": {"kl": [8.1, 19.02]}}]}


def test_verdict_line_names_rho_ratio_k_size_towers_and_what_the_intervals_cover():
    doc = _verdict_doc()
    line = verdict(doc)
    assert line == ("ranking predicts damage: ρ = 0.82 [0.61, 0.93], top-k/bottom-k damage ratio = 12.3× [8.1, 19] "
                    "(k = 10% of the weight, 4 and 9 of 40 groups); size alone: ρ = 0.40 [0.05, 0.70]; the score "
                    "under-predicts the vision tower's damage (5× the damage per unit of score of the other towers [2.5, 9]). "
                    "Intervals: 95% percentile bootstrap over the 100 held-out samples (ρ: and over the ablated groups "
                    "within each tower)")
    assert check_verdict_line(line)["towers"]
    doc["top_k"][0]["ratio_top_bottom"]["kl"] = None
    assert "undefined (bottom-k damage is 0)" in verdict(doc)
    check_verdict_line(verdict(doc))
    doc["ablations"]["correlation"]["kl"]["spearman"] = {"value": 0.21, "ci95": [-0.2, 0.55]}
    assert "; not established: the ρ interval does not exclude 0" in verdict(doc)
    check_verdict_line(verdict(doc))
    # a tower whose factor's interval reaches 1 is not named
    doc["ablations"]["towers"]["vision"]["under_prediction"]["ci95"] = [0.9, 9.0]
    assert "under-predicts" not in verdict(doc)


def test_per_layer_json_reads_like_the_older_files(planted, dbs, demo_coco, tmp_path_factory):
    """One reader of the earlier per-layer format opens its own file and ours (lm-only and all-layers)."""
    legacy = read_legacy(json.loads((Path(__file__).parent / "data" / "legacy-sensitivity" / "per-layer-sensitivity.json").read_text()))
    assert legacy["scheme"]["coverage_mode"] == "lm_only" and legacy["unsearched"]
    family = "qwen2_5_vl"
    work = tmp_path_factory.getbasetemp() / f"validate_planted_{family}"
    for scope in ("lm-only", "all-layers"):
        manifest, doc = _validated(planted[family], family, "wint8_aint8", scope, dbs, demo_coco, work)
        payload = json.loads((Path(doc["_dir"]) / "s.json").read_text())
        ours = read_legacy(payload)
        assert ours["scheme"]["quant_formats"] == ["INT8_DEFAULT_CFG"] and ours["model_id"] == str(planted[family])
        assert payload["dataset"]["batch_size"] == 4 and payload["dataset"]["num_calib_samples"] == 16
        assert payload["autoquant_state"]["keys"] and "candidate_stats" in payload["autoquant_state"]["keys"]
        assert set(payload["scheme"]["field_notes"]) >= {"num_bits", "sensitivity"}
        searched = [r for r in ours["rows"] if r["searched"]]
        assert [r["layer"] for r in searched] == [r["layer"] for r in payload["layer_sensitivity"][:len(searched)]]
        assert len(searched) == len(manifest["groups"])
        if scope == "lm-only":
            # the vision tower: rows kept at 16 bits, sensitivity 0, outside the search, sized by their weight
            assert payload["scheme"]["coverage_mode"] == "lm_only" and 0 < payload["scheme"]["coverage_fraction"] < 1
            assert sorted(ours["unsearched"]) == sorted(g["layer"] for g in manifest["excluded_groups"])
            unsearched = [r for r in payload["layer_sensitivity"] if not r["searched"]]
            assert unsearched and all(r["tower"] == "vision" and r["size_cost"] > 0 for r in unsearched)
        else:
            assert payload["scheme"]["coverage_mode"] == "full" and payload["scheme"]["coverage_fraction"] == 1.0
            assert not ours["unsearched"]


def test_validation_report_shows_intervals_sizes_bits_and_towers(planted, dbs, demo_coco, tmp_path_factory, tmp_path):
    """The summary and the plot of validated cells, from their validation.json files alone."""
    from vlmsens.reports import validation_plot, validation_report
    from vlmsens.reports.registry import Job

    family = "qwen2_5_vl"
    work = tmp_path_factory.getbasetemp() / f"validate_planted_{family}"
    paths = [str(Path(_validated(planted[family], family, "wint8_aint8", scope, dbs, demo_coco, work)[1]["_dir"]) / "validation.json")
             for scope in ("lm-only", "all-layers")]
    outputs = {k: str(tmp_path / name) for k, name in (("md", "v.md"), ("html", "v.html"), ("csv", "v.csv"),
                                                        ("towers_csv", "t.csv"))}
    job = Job(inputs=paths, outputs=outputs, params={"size_order": ["small"], "format_order": ["wint8_aint8"]})
    validation_report.write(job)
    md = (tmp_path / "v.md").read_text()
    for heading in ("## Verdict per cell", "## Figures", "## End to end at equal bits", "## Per tower"):
        assert heading in md, heading
    assert "percentile bootstrap over the 12 held-out samples" in md
    frame = pd.read_csv(tmp_path / "v.csv")
    assert list(frame["scope"]) == ["all-layers", "lm-only"] and set(frame["inputs"]) == {"image+caption"}
    assert (frame["ratio_top_bottom_lo"] <= frame["ratio_top_bottom"]).all() and frame["spearman_size_only"].notna().all()
    assert frame["random_recipes_bits"].str.count(",").eq(4).all()
    towers = pd.read_csv(tmp_path / "t.csv")
    assert set(towers[towers["scope"] == "all-layers"]["tower"]) >= {"vision", "text"}
    assert "vision" not in set(towers[towers["scope"] == "lm-only"]["tower"])
    validation_plot.write(Job(inputs=paths, outputs={"png": str(tmp_path / "v.png")}, wildcards={"model": f"tiny_{family}"},
                              params={"size_order": ["small"], "format_order": ["wint8_aint8"]}))
    assert (tmp_path / "v.png").stat().st_size > 10_000


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_reused_vision_features_measure_what_a_full_forward_does(family, tiny_checkpoints, dbs, demo_coco, tmp_path):
    """Image features computed once (vlmsens.vision_reuse) give the same KL and loss as recomputing the
    BF16 tower, for text-only configurations; with a vision group quantized the tower is recomputed."""
    from vlmsens.families import tower_of
    from vlmsens.validation import without_per_sample

    layers, switch, evaluator = _calibrated_search_model(tiny_checkpoints[family], family, dbs, demo_coco, tmp_path,
                                                          "all-layers", "image+caption")
    text = [layer for layer in layers if tower_of(layer) == "text"]
    vision = [layer for layer in layers if tower_of(layer) == "vision"]
    assert text and vision
    assert evaluator.vision.supported
    switch.apply({})
    evaluator.vision_bf16 = True
    evaluator.set_reference()
    assert len(evaluator.vision) == len(evaluator.batches)  # filled by the BF16 reference pass

    switch.apply(dict.fromkeys(text, "wint8_aint8"))
    reused = evaluator.measure()
    evaluator.vision_bf16 = False
    recomputed = evaluator.measure()
    assert reused["kl"] > 0
    assert without_per_sample(reused) == pytest.approx(without_per_sample(recomputed), rel=1e-5, abs=1e-9)
    assert reused["per_sample"]["kl"] == pytest.approx(recomputed["per_sample"]["kl"], rel=1e-5, abs=1e-9)

    switch.apply(dict.fromkeys(vision, "wint8_aint8"))
    with_vision = evaluator.measure()
    evaluator.vision_bf16 = True
    assert with_vision["kl"] > 0 and evaluator.measure()["kl"] == pytest.approx(0.0, abs=1e-9)  # reuse would hide the damage


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_geometry_made_once_gives_the_towers_own_features(family, tiny_checkpoints, dbs, demo_coco, tmp_path):
    """The vision tower fed its geometry made once per batch (vlmsens.vision_geometry, through
    transformers.vision_utils' keyword arguments) makes bit-identical features to the tower computing
    it itself; the keywords are those the family's tower reads (window order only for Qwen2.5-VL,
    position-embedding interpolation only for Qwen3-VL), and a tower that reads none gets none."""
    import torch

    from vlmsens.vision_geometry import BatchGeometry, geometry

    _, switch, evaluator = _calibrated_search_model(tiny_checkpoints[family], family, dbs, demo_coco, tmp_path,
                                                    "all-layers", "image+caption")
    inner = evaluator.model.model
    batch = evaluator.batches[0]
    made = geometry(inner.visual, batch["image_grid_thw"])
    expected = {"position_ids", "cu_seqlens", "max_seqlen"} | (
        {"window_index", "cu_window_seqlens", "max_window_seqlen"} if family == "qwen2_5_vl" else {"interp_indices", "interp_weights"})
    assert set(made) == expected
    switch.apply({})
    with torch.inference_mode():
        own = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        given = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True, **made)
    assert all(torch.equal(a, b) for a, b in zip(own.pooler_output, given.pooler_output, strict=True))
    for a, b in zip(getattr(own, "deepstack_features", None) or [], getattr(given, "deepstack_features", None) or [], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    per_batch = BatchGeometry(evaluator.model)
    assert per_batch.of(0, batch["image_grid_thw"]).keys() == made.keys()
    assert per_batch.of(0, batch["image_grid_thw"]) is not per_batch.of(0, batch["image_grid_thw"])  # a copy per forward

    class Tower(torch.nn.Module):  # a tower whose forward computes its own geometry: nothing is passed
        def forward(self, hidden_states, grid_thw, **kwargs):
            return hidden_states

    assert geometry(Tower(), batch["image_grid_thw"]) is None


def _same_as_full_forward(evaluator, start_attribute: str, computed: list[int], n_batches: int, reused: dict, case) -> None:
    """Measured again with nothing skipped (``start_attribute`` 0), every layer computes each batch,
    and the measurement with replayed layers (``reused``) equals this full forward's: damage, loss
    and per-sample sums, relative 1e-5 (KL here is ~1e-6 nats/token; abs=1e-12 only lets an exact 0 match)."""
    setattr(evaluator, start_attribute, 0)
    computed[:] = [0] * len(computed)
    full = evaluator.measure()
    assert computed == [n_batches] * len(computed)
    assert reused["kl"] > 0, case
    assert without_per_sample(reused) == pytest.approx(without_per_sample(full), rel=1e-5, abs=1e-12), case
    for m in ("kl", "loss_increase"):
        assert reused["per_sample"][m] == pytest.approx(full["per_sample"][m], rel=1e-5, abs=1e-12), (case, m)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_reused_text_prefix_measures_what_a_full_forward_does(family, tiny_checkpoints, dbs, demo_coco, tmp_path):
    """Text layers before the first quantized one, replayed from the BF16 reference (vlmsens.prefix_reuse),
    give the KL, loss and per-sample values of a full forward (rel 1e-5), without computing those layers;
    Qwen3-VL's deepstack additions after its first layers included. With a vision group quantized nothing is skipped."""
    from vlmsens.autoquant import NO_QUANT
    from vlmsens.families import block_index, tower_of
    from vlmsens.validation import HeldOutModel

    layers, switch, evaluator = _calibrated_search_model(tiny_checkpoints[family], family, dbs, demo_coco, tmp_path,
                                                          "all-layers", "image+caption")
    prefix = evaluator.prefix
    assert prefix.supported and prefix.name == "model.language_model.layers"
    n, n_batches = prefix.n_layers, len(evaluator.batches)
    assert n == 3 and n_batches > 1
    if family == "qwen3_vl":  # the deepstack features are added after layer 0, which a skip passes over
        assert evaluator.model.config.vision_config.deepstack_visual_indexes
    text = {b: [layer for layer in layers if tower_of(layer) == "text" and block_index(layer) == b] for b in range(n)}
    head = [layer for layer in layers if tower_of(layer) == "head"]
    vision = [layer for layer in layers if tower_of(layer) == "vision"]
    assert all(text.values()) and vision
    # HeldOutModel.measure decides what to skip from the selection; its model is the one built above
    held_out = HeldOutModel.__new__(HeldOutModel)
    held_out.switch, held_out.evaluator, held_out.measured = switch, evaluator, 0
    held_out.vision_layers = set(vision)
    held_out.group_modules = {layer: [layer] for layer in layers}

    computed = [0] * n  # forwards of each layer's own computation (its MLP runs in it)
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: computed.__setitem__(i, computed[i] + 1))
             for i, layer in enumerate(prefix.layers)]
    try:
        switch.apply({})
        evaluator.vision_bf16 = True
        reference_loss = evaluator.set_reference()
        assert computed == [n_batches] * n
        # the recording reference pass is a plain forward: a full all-BF16 forward repeats it exactly
        evaluator.text_start = 0
        assert without_per_sample(evaluator.measure()) == {"loss": reference_loss, "loss_increase": 0.0, "kl": 0.0}

        assert prefix.start_layer(["model.language_model.embed_tokens"]) == 0  # changes every layer's input
        assert prefix.start_layer(["lm_head", text[1][0]]) == 1 and prefix.start_layer([]) == n
        # the earliest quantized group decides: each case also quantizes a group of the last layer
        cases = {0: [text[0][0], text[n - 1][-1]], 1: [text[1][0], text[n - 1][-1]], n - 1: text[n - 1]}
        if head:
            cases[n] = head
        for start, quantized in cases.items():
            selection = dict.fromkeys(quantized, "wint8_aint8")
            computed[:] = [0] * n
            skipped_before = evaluator.text_layer_forwards_skipped
            reused = held_out.measure(selection)
            assert evaluator.text_start == start
            assert computed == [0] * start + [n_batches] * (n - start), (start, computed)
            assert evaluator.text_layer_forwards_skipped - skipped_before == start * n_batches
            assert all("forward" not in layer.__dict__ for layer in prefix.layers)  # the layers' own forward is back
            _same_as_full_forward(evaluator, "text_start", computed, n_batches, reused, start)

        # all BF16: every layer replayed, no damage at all
        computed[:] = [0] * n
        bf16 = held_out.measure({layer: NO_QUANT for layer in layers})
        assert evaluator.text_start == n and computed == [0] * n
        assert without_per_sample(bf16) == {"loss": reference_loss, "loss_increase": 0.0, "kl": 0.0}

        # a vision group changes every text layer's input: everything is recomputed
        computed[:] = [0] * n
        with_vision = held_out.measure({vision[0]: "wint8_aint8", text[n - 1][-1]: "wint8_aint8"})
        assert not evaluator.vision_bf16 and evaluator.text_start == 0 and computed == [n_batches] * n
        assert with_vision["kl"] > 0
        # even a caller's start layer is ignored while the tower is not BF16
        evaluator.text_start = n
        computed[:] = [0] * n
        assert evaluator.measure()["kl"] == pytest.approx(with_vision["kl"], rel=1e-5) and computed == [n_batches] * n
    finally:
        for hook in hooks:
            hook.remove()
        switch.apply({})


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_reused_vision_blocks_measure_what_a_full_tower_does(family, tiny_checkpoints, dbs, demo_coco, tmp_path):
    """Vision blocks before the first quantized one, replayed from the BF16 reference (vlmsens.vision_reuse),
    give the KL, loss and per-sample values of a full forward (rel 1e-5) without computing those blocks.
    Quantized mergers alone skip every block, Qwen3-VL's deepstack mergers then reading their blocks'
    recorded outputs; a module of the tower outside its blocks and mergers skips none."""
    from vlmsens.validation import Evaluator, HeldOutModel

    layers, switch, search_evaluator = _calibrated_search_model(tiny_checkpoints[family], family, dbs, demo_coco, tmp_path,
                                                                 "all-layers", "image+caption")
    evaluator = Evaluator(search_evaluator.model, search_evaluator.batches, record_vision_blocks=True)
    blocks = evaluator.vision.blocks
    assert blocks.supported and blocks.name == "model.visual"
    n, n_batches = blocks.n_layers, len(evaluator.batches)
    assert n == 2 and n_batches > 1
    assert blocks.taps == ({0} if family == "qwen3_vl" else set())  # the block feeding the deepstack merger
    in_block = {b: [layer for layer in layers if layer.startswith(f"model.visual.blocks.{b}.")] for b in range(n)}
    mergers = [layer for layer in layers if layer.startswith(("model.visual.merger.", "model.visual.deepstack_merger_list."))]
    deepstack = [layer for layer in mergers if "deepstack" in layer]
    assert all(in_block.values()) and mergers and bool(deepstack) == (family == "qwen3_vl")
    assert blocks.start_block(["model.visual.patch_embed.proj", in_block[1][0]]) == 0  # changes every block's input
    assert blocks.start_block(["model.language_model.layers.0.mlp.down_proj", "lm_head"]) == n  # outside the tower
    held_out = HeldOutModel.__new__(HeldOutModel)
    held_out.switch, held_out.evaluator, held_out.measured = switch, evaluator, 0
    held_out.vision_layers = {layer for layer in layers if layer.startswith("model.visual.")}
    held_out.group_modules = {layer: [layer] for layer in layers}

    computed = [0] * n
    hooks = [block.mlp.register_forward_pre_hook(lambda *_, i=i: computed.__setitem__(i, computed[i] + 1))
             for i, block in enumerate(blocks.layers)]
    try:
        switch.apply({})
        evaluator.vision_bf16 = True
        evaluator.set_reference()
        assert computed == [n_batches] * n
        assert sum(blocks.recording_counts().values()) == n * n_batches
        # the earliest quantized vision group decides; each case quantizes a text group too (recomputed anyway)
        text_group = next(layer for layer in layers if layer.startswith("model.language_model.layers."))
        cases = {"block 0": (0, in_block[0]), "block 1": (1, [in_block[1][0]]), "mergers": (n, mergers)}
        if deepstack:
            cases["deepstack merger"] = (n, deepstack)
        for case, (start, quantized) in cases.items():
            selection = dict.fromkeys([*quantized, text_group], "wint8_aint8")
            computed[:] = [0] * n
            skipped_before = evaluator.vision.block_forwards_skipped
            reused = held_out.measure(selection)
            assert not evaluator.vision_bf16 and evaluator.vision_start == start, case
            assert computed == [0] * start + [n_batches] * (n - start), (case, computed)
            assert evaluator.vision.block_forwards_skipped - skipped_before == start * n_batches
            assert all("forward" not in block.__dict__ for block in blocks.layers)  # the blocks' own forward is back
            _same_as_full_forward(evaluator, "vision_start", computed, n_batches, reused, case)
    finally:
        for hook in hooks:
            hook.remove()
        switch.apply({})
