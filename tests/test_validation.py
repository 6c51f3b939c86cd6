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

import pytest
from conftest import FAMILIES, MAX_PIXELS, MIN_PIXELS
from invariants import check_validation, is_established
from planting import plant_mlp_outlier, plant_vision_attn_outlier

from vlmsens.calib import build_eval_subset, build_subset
from vlmsens.cell import prepare_samples, run_cell, validate_cell
from vlmsens.errors import VlmsensError
from vlmsens.models import load_processor
from vlmsens.validation import (
    k_of,
    random_recipe_same_budget,
    rank_correlations,
    ranked_groups,
    ranking_format,
    ratio,
    stratified_positions,
    verdict,
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
    assert row["top"]["kl"] >= 5 * row["bottom"]["kl"], (row["top"]["kl"], row["bottom"]["kl"])
    assert row["top"]["kl"] > row["random"]["mean"]["kl"]
    rho = doc["ablations"]["correlation"]["kl"]["spearman"]
    assert rho["value"] > 0.5, rho
    lo, hi = rho["ci95"]
    assert lo <= rho["value"] <= hi
    e2e = doc["end_to_end"]
    assert e2e["recipe"]["bits"] <= e2e["budget_bits"] + 1e-6
    draws = e2e["random_same_budget"]["draws"]
    assert all(draw["bits"] <= e2e["recipe"]["bits"] + 1e-6 for draw in draws)
    # a random recipe may by luck keep the planted groups in BF16 too; most do not
    assert len(draws) == 5 and e2e["random_same_budget"]["recipe_beats"] >= 4
    assert e2e["recipe"]["kl"] < e2e["random_same_budget"]["mean"]["kl"] / 10
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
                             "verdict_k", "top_k", "ablations", "end_to_end", "device", "dtype", "timings_s",
                             "peak_memory", "verdict", "dataset", "provenance"]
    assert "(k = 10%" in on_disk["verdict"]
    assert [r["k"] for r in on_disk["top_k"]] == [k_of(f, on_disk["n_groups"]) for f in (0.05, 0.10, 0.25)]
    assert all(len(r["random"]["draws"]) == 5 for r in on_disk["top_k"])
    assert on_disk["ablations"]["correlation"]["kl"]["n"] == min(24, on_disk["n_groups"])
    assert on_disk["eval"]["samples"] == 12 and on_disk["eval"]["loss_tokens"] > 0
    assert set(on_disk["timings_s"]) >= {"load", "calibrate", "reference", "top-k", "ablations", "end-to-end"}
    assert {"packages", "git", "inputs_sha256", "wall_time_s"} <= set(on_disk["provenance"])
    assert set(on_disk["provenance"]["inputs_sha256"]) == {"manifest", "samples", "held_out_samples"}
    md = (Path(doc["_dir"]) / "validation.md").read_text()
    assert on_disk["verdict"] in md and "## One-group ablations" in md and "## End to end" in md
    for phase in ("calibrate", "reference", "top-k", "ablations", "end-to-end"):
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
                          manifest_path=str(cell / "quant_manifest.json"), samples_path=str(work / "calib-all-layers.pt"),
                          eval_samples_path=str(work / "eval-all-layers.pt"),
                          outputs={"json": str(tmp_path / "v.json"), "markdown": str(tmp_path / "v.md")}, progress=lambda _: None)
    for key in ("top_k", "ablations", "end_to_end", "verdict"):
        assert again[key] == json.loads((cell / "validation.json").read_text())[key], key


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
                      manifest_path=str(cell / "quant_manifest.json"), samples_path=calib, eval_samples_path=calib,
                      outputs={"json": str(tmp_path / "v.json"), "markdown": str(tmp_path / "v.md")}, progress=lambda _: None)
    assert not (tmp_path / "v.json").exists() and not (tmp_path / "v.md").exists()


def test_validation_of_a_candidate_set_cell(tiny_checkpoints, dbs, demo_coco, tmp_path_factory):
    """Groups ranked by the set's fewest-bits member (ties by name), the recipe mixing formats as selected."""
    family = "qwen2_5_vl"
    manifest, doc = _validated(tiny_checkpoints[family], family, "fp8_or_int8", "all-layers", dbs, demo_coco,
                               tmp_path_factory.getbasetemp() / f"validate_candidates_{family}",
                               formats_cfg=CANDIDATE_SET, validation_cfg=QUICK_VALIDATION)
    assert manifest["cell"]["candidates"] == ["wfp8_afp8", "wint8_aint8"]
    assert doc["ranking_format"] == "wfp8_afp8"  # both 8 bits: the first by name
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
    monkeypatch.setattr(validation, "caption_logits", lambda m, batch: (m.logits.clone(), targets))
    evaluator = Evaluator(model, [{}])
    bf16_loss = evaluator.set_reference()
    assert bf16_loss == pytest.approx(float(torch.nn.functional.cross_entropy(Model.logits, targets)))
    assert evaluator.measure() == {"loss": bf16_loss, "loss_increase": 0.0, "kl": 0.0}

    model.logits = torch.tensor([[0.0, 1.0, 1.0], [3.0, -1.0, 0.0], [-1.0, 2.0, 0.0]])
    p, q = torch.softmax(Model.logits, -1), torch.softmax(model.logits, -1)
    forward = float((p * (p.log() - q.log())).sum()) / 3
    reverse = float((q * (q.log() - p.log())).sum()) / 3
    assert abs(forward - reverse) > 0.1  # the two directions are told apart
    measured = evaluator.measure()
    assert measured["kl"] == pytest.approx(forward, rel=1e-5)
    loss = float(torch.nn.functional.cross_entropy(model.logits, targets))
    assert measured["loss"] == pytest.approx(loss, rel=1e-6)
    assert measured["loss_increase"] == pytest.approx(loss - bf16_loss, rel=1e-6)


def test_all_bf16_selection_does_no_damage_on_the_search_model(tiny_checkpoints, dbs, demo_coco, tmp_path):
    """The per-group switch really restores BF16: after quantizing every group, all-BF16 gives KL = Δloss = 0."""
    from vlmsens.autoquant import CellSpec, PhaseClock, device_batches, load_cell_model, search
    from vlmsens.batches import load_samples
    from vlmsens.families import get_family
    from vlmsens.formats import format_registry, resolve_format
    from vlmsens.validation import Evaluator, RecipeSwitch

    family = "qwen3_vl"
    checkpoint = tiny_checkpoints[family]
    paths = {}
    for name in ("calib", "eval"):
        paths[name] = tmp_path / f"{name}.pt"
        prepare_samples(checkpoint=str(checkpoint), calib_db=str(dbs[name]), coco_root=str(demo_coco), scope="lm-only",
                        inputs="caption-only", prompts=PROMPTS, out_path=str(paths[name]), progress=lambda _: None)
    spec = CellSpec(model="tiny", family=get_family(family), checkpoint=str(checkpoint), format_name="wint8_aint8",
                    formats=resolve_format("wint8_aint8", format_registry({})), scope="lm-only", size="small",
                    effective_bits=8.5, batch_size=4, device="cpu")
    clock = PhaseClock(lambda _: None)
    model, calib, device, dtype, _ = load_cell_model(spec, load_samples(paths["calib"])[0], clock)
    model, state, _, _ = search(model, spec, calib, clock, num_score_steps=1)
    layers = [name.removesuffix(".quant_recipe") for name, stat in state["candidate_stats"].items() if len(stat["formats"]) > 1]
    switch = RecipeSwitch(model, spec.formats, layers)
    evaluator = Evaluator(model, device_batches(model, load_samples(paths["eval"])[0], 4, device, dtype))
    switch.apply({})
    bf16_loss = evaluator.set_reference()
    switch.apply(dict.fromkeys(layers, "wint8_aint8"))
    quantized = evaluator.measure()
    assert quantized["kl"] > 0 and quantized["loss"] != bf16_loss
    switch.apply({})
    assert evaluator.measure() == {"loss": bf16_loss, "loss_increase": 0.0, "kl": 0.0}


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
    assert [k_of(f, 40) for f in (0.05, 0.10, 0.25)] == [2, 4, 10]
    assert k_of(0.05, 6) == 1
    assert stratified_positions(5, 24) == [0, 1, 2, 3, 4]
    positions = stratified_positions(100, 24)
    assert positions[0] == 0 and positions[-1] == 99 and len(positions) == 24


def test_random_recipes_meet_the_budget_without_slack():
    import numpy as np

    from vlmsens.recipes import bits_of

    manifest = _manifest([1.0] * 10, costs=[1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    rng = np.random.default_rng(0)
    for _ in range(20):
        selection = random_recipe_same_budget(manifest, "wint8_aint8", 12.0, rng)
        bits = bits_of(manifest, selection)
        assert bits <= 12.0
        # one group fewer would miss the budget: no random recipe is needlessly aggressive
        quantized = [g for g in manifest["groups"] if selection[g["layer"]] != "bf16"]
        assert any(bits_of(manifest, {**selection, g["layer"]: "bf16"}) > 12.0 for g in quantized)


def test_rank_correlations_known_answers():
    perfect = rank_correlations([1, 2, 3, 4, 5, 6], [10, 20, 30, 40, 50, 60], 200, 0)
    assert perfect["spearman"]["value"] == pytest.approx(1.0) and perfect["kendall"]["value"] == pytest.approx(1.0)
    reverse = rank_correlations([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], 200, 0)
    assert reverse["spearman"]["value"] == pytest.approx(-1.0)
    noisy = rank_correlations([1, 2, 3, 4, 5, 6, 7, 8], [2, 1, 4, 3, 6, 5, 8, 7], 500, 0)
    lo, hi = noisy["spearman"]["ci95"]
    assert lo < noisy["spearman"]["value"] < 1.0 and hi <= 1.0
    assert math.isnan(rank_correlations([1, 2], [1, 2], 100, 0)["spearman"]["value"])


def test_verdict_line_names_rho_ratio_and_k():
    doc = {"n_groups": 40, "verdict_k": 0.1,
           "ablations": {"correlation": {"kl": {"spearman": {"value": 0.8234, "ci95": [0.61, 0.93]}}}},
           "top_k": [{"fraction": 0.1, "k": 4, "ratio_top_bottom": {"kl": 12.34}}]}
    assert verdict(doc) == ("ranking predicts damage: ρ = 0.82 [0.61, 0.93], top-k/bottom-k damage ratio = 12.3× "
                            "(k = 10%, 4 of 40 groups)")
    doc["top_k"][0]["ratio_top_bottom"]["kl"] = None
    assert "undefined (bottom-k damage is 0)" in verdict(doc)
    doc["ablations"]["correlation"]["kl"]["spearman"] = {"value": 0.21, "ci95": [-0.2, 0.55]}
    assert verdict(doc).endswith("; not established: the ρ interval does not exclude 0")
