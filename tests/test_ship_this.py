"""Ship this: the consensus keep-BF16 view, nested recipes, and the measured damage-vs-bits ladder.

On a planted tiny model (tests/planting.py: an INT8-fragile text MLP and vision attention
projection, function unchanged) the consensus table must name both planted groups as top in every
cell that searches them, and never as safe; the ladder's measured damage must fall with bits.
Nested recipes are checked on hand-made manifests where the optimal recipes are not nested.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MAX_PIXELS, MIN_PIXELS
from planting import plant_mlp_outlier, plant_vision_attn_outlier

from vlmsens.calib import build_eval_subset, build_subset
from vlmsens.cell import ladder_cell, prepare_samples, run_cell
from vlmsens.config import LadderSettings
from vlmsens.errors import VlmsensError
from vlmsens.formats import ranking_format
from vlmsens.ladder import ladder_budgets, ladder_plan
from vlmsens.models import load_processor
from vlmsens.recipes import bits_of, is_nested, make_recipe, nested_recipes, nested_selection, score_of, solve_budget
from vlmsens.reports.damage_vs_bits import damage_doc, ladder_frame, random_bits_gaps
from vlmsens.reports.damage_vs_bits import write as write_damage
from vlmsens.reports.registry import Job
from vlmsens.reports.ship_this import consensus_frame, evidence_frame
from vlmsens.reports.ship_this import write as write_ship_this
from vlmsens.validation import bits_tolerance

FAMILY = "qwen2_5_vl"
FORMAT = "wint8_aint8"
PLANTED = ("model.language_model.layers.1.mlp.down_proj", "model.visual.blocks.1.attn.proj")
PROMPTS = {
    "image_instruction": "Describe this image in one sentence.",
    "text_instruction": "Write a one-sentence caption for an everyday scene.",
    "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS,
}
AUTOQUANT = {"method": "gradient", "effective_bits": {FORMAT: 8.5}, "device": "cpu"}
SIZES = {"small": 8, "large": 16}
SCOPES = ("lm-only", "all-layers")
LADDER = {"bits_above_uniform": [0.0, 0.5, 1.0, 2.0], "random_draws": 3}


# --- nested recipes: pure functions of the manifest ------------------------------------------


def _manifest(scores: list[float], costs: list[float]) -> dict:
    groups = [{"layer": f"l{i}", "modules": [f"m{i}"], "tower": "text", "scores_raw": {FORMAT: s},
               "scores_per_token": {FORMAT: s}, "scores_modelopt_clipped": {FORMAT: s},
               "costs": {FORMAT: c / 2, "bf16": c}, "uncompressed_cost": c, "selected_format": FORMAT}
              for i, (s, c) in enumerate(zip(scores, costs, strict=True))]
    cell = {"model": "m", "family": FAMILY, "format": FORMAT, "scope": "lm-only", "size": "small", "candidates": [FORMAT]}
    formats = {FORMAT: {"bits": 8.0, "modelopt_config": {"quant_cfg": [], "algorithm": "max"}}}
    return {"cell": cell, "formats": formats, "groups": groups,
            "search": {"effective_bits_target": 8.5, "effective_bits_achieved": 8.0, "disabled_layers": []}}


# A big sensitive group and two small ones: at a small budget the two small groups fit, at a larger
# one the big group wins and the small ones go: the optimal recipes are not nested.
KNAPSACK = _manifest(scores=[10.0, 4.0, 4.0, 0.1], costs=[4.0, 2.0, 2.0, 8.0])


def test_optimal_recipes_need_not_nest_but_nested_ones_do():
    budgets = [8.0, 9.0, 10.0, 11.0, 12.0, 14.0, 16.0]
    optimal = [solve_budget(KNAPSACK, b).selection for b in budgets]
    assert not is_nested(optimal, KNAPSACK)  # the case this exists for
    nested = nested_recipes(KNAPSACK, budgets)
    assert is_nested([n["selection"] for n in nested], KNAPSACK)
    for n, opt in zip(nested, optimal, strict=True):
        assert n["feasible"] and n["achieved_bits"] <= n["budget_bits"] + 1e-9
        # greedy never beats the exact optimum of the same budget
        assert n["predicted_score"] >= score_of(KNAPSACK, opt) - 1e-12
        kept = {layer for layer, fmt in n["selection"].items() if fmt == "bf16"}
        assert set(n["kept_bf16"]) == kept and n["groups_bf16"] == len(kept)
        assert n["ignore"] == [f"m{layer[1:]}" for layer in n["kept_bf16"]]
    # score per unit of cost: l0 10/2, l1 and l2 4/1, l3 0.1/4; a move that does not fit ends the prefix
    assert [n["kept_bf16"] for n in nested] == [[], [], ["l0"], ["l0", "l1"], ["l0", "l1", "l2"], ["l0", "l1", "l2"],
                                                ["l0", "l1", "l2", "l3"]]


def test_nested_selection_is_a_prefix_and_infeasible_below_the_fewest_bits():
    low = nested_selection(KNAPSACK, 7.0)
    assert not low.feasible and all(fmt == FORMAT for fmt in low.selection.values())
    fine = [nested_selection(KNAPSACK, 8.0 + 0.1 * i).selection for i in range(81)]
    assert is_nested(fine, KNAPSACK)
    assert [bits_of(KNAPSACK, s) for s in fine] == sorted(bits_of(KNAPSACK, s) for s in fine)


def test_make_recipe_is_unchanged_by_nested_recipes():
    # nested recipes are additive: the optimal recipe of a budget is still the exact MILP's
    recipe = make_recipe(KNAPSACK, 10.0)
    assert recipe["selection"] == solve_budget(KNAPSACK, 10.0).selection and "kind" not in recipe


def test_ladder_plan_rungs_and_random_recipes_of_the_same_bits():
    import numpy as np

    settings = LadderSettings.from_config(LADDER, seed=0)
    assert ladder_budgets(KNAPSACK, settings.bits_above_uniform) == [8.0, 8.5, 9.0, 10.0]
    assert ladder_budgets(KNAPSACK, (0.0, 9.0)) == [8.0]  # nothing above 16 bits
    plan = ladder_plan(KNAPSACK, settings, np.random.default_rng(0))
    assert is_nested([r["nested"] for r in plan["rungs"]], KNAPSACK)
    for rung in plan["rungs"]:
        optimal_bits = bits_of(KNAPSACK, rung["optimal"])
        assert optimal_bits <= rung["budget_bits"] + 1e-9 and len(rung["random"]) == 3
        assert all(bits_of(KNAPSACK, s) <= optimal_bits + 1e-9 for s in rung["random"])
    again = ladder_plan(KNAPSACK, settings, np.random.default_rng(0))
    assert again == plan  # deterministic for a fixed seed


# --- planted model: consensus and ladder (real ModelOpt, CPU) --------------------------------


@pytest.fixture(scope="module")
def planted_cells(tiny_checkpoints, demo_coco, tmp_path_factory) -> dict:
    """One model's planted cells (INT8, both scopes, two sizes) and its held-out samples."""
    import transformers

    work = tmp_path_factory.mktemp("ship_this")
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[FAMILY], local_files_only=True)
    plant_mlp_outlier(model, "model.language_model.layers.1.mlp")
    plant_vision_attn_outlier(model, "model.visual.blocks.1.attn")
    checkpoint = work / "planted"
    model.save_pretrained(checkpoint)
    load_processor(str(tiny_checkpoints[FAMILY])).save_pretrained(checkpoint)
    build_eval_subset(coco_root=demo_coco, split="val2017", num_images=12, seed=0, db_path=work / "eval.db",
                      captions_path=work / "eval.txt")
    cells = {}
    for size, n in SIZES.items():
        build_subset(coco_root=demo_coco, split="train2017", size_name=size, num_samples=n, seed=0,
                     db_path=work / f"{size}.db", captions_path=work / f"{size}.txt")
        for scope in SCOPES:
            samples = {}
            for name, db in (("calib", work / f"{size}.db"), ("eval", work / "eval.db")):
                samples[name] = work / f"{name}-{size}-{scope}.pt"
                if not samples[name].exists():
                    prepare_samples(checkpoint=str(checkpoint), calib_db=str(db), coco_root=str(demo_coco), scope=scope,
                                    inputs="image+caption", prompts=PROMPTS, out_path=str(samples[name]), progress=lambda _: None)
            folder = work / f"{scope}-{size}"
            folder.mkdir()
            common = dict(model_name="planted", model_cfg={"family": FAMILY}, checkpoint=str(checkpoint), format_name=FORMAT,
                          formats_cfg={}, scope=scope, size=size, autoquant_cfg=AUTOQUANT, batch_size=4, seed=0)
            run_cell(**common, samples_path=str(samples["calib"]), calib_db=str(work / f"{size}.db"), progress=lambda _: None,
                     outputs={k: str(folder / v) for k, v in (("json", "s.json"), ("markdown", "s.md"),
                                                              ("manifest", "quant_manifest.json"), ("state", "state.pt"))})
            cells[(scope, size)] = {"common": common, "dir": folder, "samples": samples}
    return {"work": work, "cells": cells}


def test_consensus_finds_the_planted_groups(planted_cells, tmp_path):
    manifests = [json.loads((c["dir"] / "quant_manifest.json").read_text()) for c in planted_cells["cells"].values()]
    evidence = evidence_frame(manifests, top_fraction=0.10, safe_fraction=0.5)
    consensus = consensus_frame(evidence).set_index("layer")
    for layer in PLANTED:
        row = consensus.loc[layer]
        assert row["consensus_top"] and not row["safe_everywhere"], (layer, row.to_dict())
    # the text plant is searched in all four cells, the vision plant in the two all-layers cells only
    assert consensus.loc[PLANTED[0], "cells"] == 4 and consensus.loc[PLANTED[1], "cells"] == 2
    assert consensus["safe_everywhere"].any()
    assert not (consensus["consensus_top"] & consensus["safe_everywhere"]).any()

    out = {"html": tmp_path / "s.html", "csv": tmp_path / "s.csv", "evidence_csv": tmp_path / "e.csv", "md": tmp_path / "s.md"}
    write_ship_this(Job([str(c["dir"] / "quant_manifest.json") for c in planted_cells["cells"].values()],
                        {k: str(v) for k, v in out.items()}, {"model": "planted"},
                        {"size_order": list(SIZES), "format_order": [FORMAT],
                         "ship_this": {"top_fraction": 0.10, "safe_fraction": 0.5}}))
    md = out["md"].read_text()
    keep = md.split("## Keep in BF16 first")[1].split("## ")[0]
    assert "layers.1.mlp.down_proj" in keep and "visual.blocks.1.attn.proj" in keep
    assert "Most sensitive vs kept in BF16 by the solver" in md and "score *per bit" in md
    import pandas as pd

    written = pd.read_csv(out["evidence_csv"])
    assert list(written.columns) == list(evidence.columns) and len(written) == len(evidence)


@pytest.fixture(scope="module")
def planted_ladder(planted_cells) -> tuple[dict, dict, Path]:
    cell = planted_cells["cells"][("lm-only", "large")]
    lines: list[str] = []
    doc = ladder_cell(**cell["common"], ladder_cfg=LADDER, manifest_path=str(cell["dir"] / "quant_manifest.json"),
                      state_path=str(cell["dir"] / "state.pt"),
                      samples_path=str(cell["samples"]["calib"]), eval_samples_path=str(cell["samples"]["eval"]),
                      outputs={"json": str(cell["dir"] / "ladder.json")}, progress=lines.append)
    manifest = json.loads((cell["dir"] / "quant_manifest.json").read_text())
    return doc, manifest, cell["dir"] / "ladder.json"


def test_ladder_damage_falls_with_bits_on_the_planted_model(planted_ladder):
    doc, manifest, path = planted_ladder
    rungs = doc["rungs"]
    assert [r["budget_bits"] for r in rungs] == ladder_budgets(manifest, LADDER["bits_above_uniform"])
    assert doc["nested_is_nested"]
    assert doc["eval"]["tokens"] > 0 and doc["eval"]["configurations_measured"] == 1 + len(rungs) * (2 + 3)
    uniform = doc["uniform"]["kl"]
    assert uniform > 0
    optimal = [r["optimal"]["kl"] for r in rungs]
    nested = [r["nested"]["kl"] for r in rungs]
    tolerance = bits_tolerance(manifest, ranking_format(manifest))
    # the lowest rung is uniform quantization; the planted group kept in BF16 removes most damage
    assert optimal[0] == pytest.approx(uniform, rel=1e-6)
    assert optimal[-1] < optimal[0] / 5 and nested[-1] < nested[0] / 5, (optimal, nested)
    assert all(b <= a * 1.05 + 1e-9 for a, b in zip(optimal, optimal[1:], strict=False)), optimal
    for rung in rungs[1:]:
        assert rung["optimal"]["bits"] <= rung["budget_bits"] + 1e-9
        assert PLANTED[0] in rung["optimal"]["kept_bf16"]
        # random recipes of the same bits as the optimal one, within the smallest group's share
        assert all(abs(d["bits"] - rung["optimal"]["bits"]) <= tolerance + 1e-9 for d in rung["random"]["draws"]), rung
        assert rung["optimal"]["kl"] < rung["random"]["mean"]["kl"], rung
        assert rung["random"]["min"]["kl"] <= rung["random"]["mean"]["kl"] <= rung["random"]["max"]["kl"]
    on_disk = json.loads(path.read_text())
    assert on_disk["rungs"] == json.loads(json.dumps(rungs)) and on_disk["cell"]["size"] == "large"


def test_damage_vs_bits_report_of_the_ladder(planted_ladder, tmp_path):
    doc, _, path = planted_ladder
    frame = ladder_frame([path])
    assert set(frame["kind"]) == {"optimal", "nested", "random", "uniform"}
    assert len(frame) == 1 + 3 * len(doc["rungs"])
    out = {k: str(tmp_path / f"{k}.{ext}") for k, ext in (("png", "png"), ("loss_png", "png"), ("html", "html"),
                                                          ("csv", "csv"), ("md", "md"))}
    write_damage(Job([str(path)], out, {"model": "planted"}, {"size_order": list(SIZES)}))
    for key in ("png", "loss_png"):
        assert Path(out[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "nested" in Path(out["md"]).read_text()


def test_ladder_refuses_overlapping_held_out_samples(planted_cells, tmp_path):
    cell = planted_cells["cells"][("lm-only", "small")]
    with pytest.raises(VlmsensError, match="held out"):
        ladder_cell(**cell["common"], ladder_cfg=LADDER, manifest_path=str(cell["dir"] / "quant_manifest.json"),
                    state_path=str(cell["dir"] / "state.pt"),
                    samples_path=str(cell["samples"]["calib"]), eval_samples_path=str(cell["samples"]["calib"]),
                    outputs={"json": str(tmp_path / "ladder.json")}, progress=lambda _: None)
    assert not (tmp_path / "ladder.json").exists()


def test_random_recipes_short_of_the_optimal_bits_are_flagged():
    import pandas as pd

    cell = {"model": "m", "format": FORMAT, "scope": "lm-only", "size": "large"}
    rows = [{**cell, "budget_bits": b, "kind": kind, "bits": bits, "kl": 1.0, "loss_increase": 0.0, "draws": 1, "tokens": 9}
            for b, kind, bits in ((8.5, "optimal", 8.49), (8.5, "random", 8.485), (9.0, "optimal", 8.98), (9.0, "random", 8.5))]
    frame = pd.DataFrame(rows)
    gaps = random_bits_gaps(frame)
    assert list(gaps["budget_bits"]) == [9.0] and gaps["bits_gap"].iloc[0] == pytest.approx(0.48)
    assert "Not a same-bits comparison at 1 rung(s)" in damage_doc("m", frame).to_markdown()
    assert "same-bits" not in damage_doc("m", frame[frame["budget_bits"] == 8.5]).to_markdown()
