"""Rule export's job on tiny real-class models (real ModelOpt, CPU): a recipe exported with
ModelOpt's exporter, read back from the folder alone, keeps the recipe's BF16 layers unquantized
and quantizes every other layer with the recipe's format; lm-only keeps the vision tower BF16; the
reloaded export matches the fake-quantized model; an unexportable format leaves no folder."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_validation import AUTOQUANT, CANDIDATE_SET, PROMPTS

from vlmsens.calib import build_eval_subset, build_subset
from vlmsens.cell import export_cell, prepare_samples, run_cell
from vlmsens.config import check_config, export_targets
from vlmsens.errors import VlmsensError
from vlmsens.io import sha256_file

EXPORT_CFG = {"check_samples": 4, "max_kl_ratio": 0.1}
# What ModelOpt exports each recipe format as, per layer (exported tensors; hf_quant_config.json).
EXPORTED_AS = {"wfp8_afp8": ("fp8", "FP8"), "wint8_aint8": ("int8_sq", "W8A8_SQ_PER_CHANNEL")}
AUTOQUANT_EXPORT = {**AUTOQUANT, "effective_bits": {**AUTOQUANT["effective_bits"], "wint4_afp16": 8.5}}


@pytest.fixture(scope="module")
def export_dbs(demo_coco, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export_dbs")
    build_subset(coco_root=demo_coco, split="train2017", size_name="small", num_samples=8, seed=0,
                 db_path=out / "calib.db", captions_path=out / "calib.txt")
    build_eval_subset(coco_root=demo_coco, split="val2017", num_images=4, seed=0, db_path=out / "eval.db",
                      captions_path=out / "eval.txt")
    return {"calib": out / "calib.db", "eval": out / "eval.db"}


def _cell(checkpoint: Path, family: str, fmt: str, scope: str, dbs, coco, work: Path, formats_cfg=None) -> dict:
    """Run one tiny cell; returns the keyword arguments export_cell needs besides the budget."""
    work.mkdir(parents=True, exist_ok=True)
    samples = {}
    for name in ("calib", "eval"):
        samples[name] = work / f"{name}-{scope}.pt"
        if not samples[name].exists():
            prepare_samples(checkpoint=str(checkpoint), calib_db=str(dbs[name]), coco_root=str(coco), scope=scope,
                            inputs="image+caption", prompts=PROMPTS, out_path=str(samples[name]), progress=lambda _: None)
    common = dict(model_name=f"tiny_{family}", model_cfg={"family": family}, checkpoint=str(checkpoint), format_name=fmt,
                  formats_cfg=formats_cfg or {}, scope=scope, size="small", autoquant_cfg=AUTOQUANT_EXPORT, batch_size=4, seed=0)
    cell = work / f"{fmt}-{scope}"
    cell.mkdir(exist_ok=True)
    run_cell(**common, samples_path=str(samples["calib"]), calib_db=str(dbs["calib"]), progress=lambda _: None,
             outputs={k: str(cell / v) for k, v in (("json", "s.json"), ("markdown", "s.md"),
                                                    ("manifest", "quant_manifest.json"), ("state", "state.pt"))})
    return dict(common, manifest_path=str(cell / "quant_manifest.json"), state_path=str(cell / "state.pt"),
                samples_path=str(samples["calib"]), eval_samples_path=str(samples["eval"]), export_cfg=EXPORT_CFG)


def _outputs(folder: Path) -> dict[str, str]:
    return {"checkpoint": str(folder / "bits-8.5"), "markdown": str(folder / "bits-8.5.md"), "html": str(folder / "bits-8.5.html")}


@pytest.mark.parametrize(("family", "fmt", "scope"), [("qwen2_5_vl", "wfp8_afp8", "lm-only"), ("qwen3_vl", "fp8_or_int8", "all-layers")])
def test_export_keeps_bf16_layers_and_quantizes_the_rest_with_the_recipe_format(
        tiny_checkpoints, export_dbs, demo_coco, tmp_path, family, fmt, scope):
    import torch
    from modelopt.torch.export.quant_aware_conversion import build_reverse_name_mapper
    from safetensors.torch import load_file

    from vlmsens.exported import load_exported

    job = _cell(tiny_checkpoints[family], family, fmt, scope, export_dbs, demo_coco, tmp_path / "work", CANDIDATE_SET)
    outputs = _outputs(tmp_path / "export")
    doc = export_cell(**job, budget=8.5, outputs=outputs, progress=lambda _: None)
    folder = Path(outputs["checkpoint"])
    manifest = json.loads(Path(job["manifest_path"]).read_text())

    # The folder, as a runtime reads it: tensors, ModelOpt's config, processor files.
    reloaded, formats = load_exported(folder, "cpu")
    mapper = build_reverse_name_mapper(reloaded) or (lambda name: name)
    tensors = load_file(str(folder / "model.safetensors"))
    hf_quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name

    selection = doc["selection"]
    kept_by_export = {row["layer"] for row in doc["kept_bf16_by_export"]}
    for layer, fmt_of_group in doc["recipe"]["selection"].items():
        assert selection[layer] == fmt_of_group or (layer in kept_by_export and selection[layer] == "bf16"), layer
    modules = dict(reloaded.named_modules())
    assert all(not isinstance(modules[m], torch.nn.Linear) for g in manifest["groups"] if g["layer"] in kept_by_export
               for m in g["modules"])
    used = {f for f in selection.values() if f != "bf16"}
    assert "bf16" in selection.values() and used, selection  # a mixed recipe: something kept, something quantized
    for group in manifest["groups"]:
        fmt_of_group = selection[group["layer"]]
        for module in group["modules"]:
            exported = mapper(module)
            if fmt_of_group == "bf16":
                assert exported not in formats and f"{exported}.weight_scale" not in tensors, module
                assert tensors[f"{exported}.weight"].is_floating_point() and tensors[f"{exported}.weight"].element_size() >= 2
                if hf_quant["quant_algo"] == "MIXED_PRECISION":
                    assert exported not in hf_quant["quantized_layers"], module
                else:
                    assert any(fnmatch.fnmatch(exported, p) for p in hf_quant["exclude_modules"]), module
            else:
                own, algo = EXPORTED_AS[fmt_of_group]
                assert formats[exported] == own, (module, fmt_of_group, formats[exported])
                if hf_quant["quant_algo"] == "MIXED_PRECISION":
                    assert hf_quant["quantized_layers"][exported]["quant_algo"] == algo
                else:
                    assert hf_quant["quant_algo"] == algo
    quantized = {mapper(m) for g in manifest["groups"] if selection[g["layer"]] != "bf16" for m in g["modules"]}
    assert set(formats) == quantized
    if scope == "lm-only":
        assert not any("visual" in name for name in formats)
        assert any("visual" in name for name in tensors)
    else:
        assert any("visual" in name for name in formats)

    on_disk = json.loads((folder / "vlmsens-export.json").read_text())
    check = on_disk["check"]
    assert check["passed"] and check["kl_exported_vs_fake_quant"] <= check["max_kl"]
    assert check["kl_vs_bf16"]["fake_quant"] > 0 and check["held_out_samples"] == 4 and check["caption_tokens"] > 0
    assert abs(check["loss"]["exported"] - check["loss"]["fake_quant"]) < 1e-3
    assert on_disk["recipe_achieved_bits"] <= on_disk["budget_bits"] + 1e-6
    assert on_disk["achieved_bits"] >= on_disk["recipe_achieved_bits"] - 1e-9
    assert (on_disk["achieved_bits"] > on_disk["recipe_achieved_bits"]) == bool(kept_by_export)
    assert on_disk["cell"]["format"] == fmt and on_disk["cell"]["scope"] == scope
    for name, digest in on_disk["files_sha256"].items():
        assert sha256_file(folder / name) == digest, name
    assert {"model.safetensors", "config.json", "hf_quant_config.json"} <= set(on_disk["files_sha256"])
    page = Path(outputs["markdown"]).read_text()
    assert str(folder) in page and "Check passed" in page


def test_a_format_modelopt_cannot_export_names_it_and_leaves_no_folder(tiny_checkpoints, export_dbs, demo_coco, tmp_path):
    """INT4 blocks of 128 do not fit the tiny model's 32-wide layers: ModelOpt's exporter refuses."""
    family = "qwen2_5_vl"
    job = _cell(tiny_checkpoints[family], family, "wint4_afp16", "lm-only", export_dbs, demo_coco, tmp_path / "work")
    outputs = _outputs(tmp_path / "export")
    with pytest.raises(VlmsensError, match="wint4_afp16"):
        export_cell(**job, budget=8.5, outputs=outputs, progress=lambda _: None)
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())


def _demo_config() -> dict:
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    validate(config, str(REPO / "config" / "schema.yaml"))
    return config


def test_export_targets_default_to_each_cells_own_budget_and_must_be_grid_cells():
    config = _demo_config()
    check_config(config, check_paths=False)
    targets = export_targets(config)
    assert [(f"{c.model}/{c.format}/{c.scope}/{c.size}", b) for c, b in targets] == [
        ("tiny_qwen2_5_vl/wfp8_afp8/lm-only/small", 8.5), ("tiny_qwen3_vl/wint8_aint8/all-layers/small", 8.5)]
    assert {c.model for c, _ in targets} == set(config["grid"]["models"])  # one cell per demo model
    config["export"]["budgets"] = [9.0, 10.0]
    assert [b for _, b in export_targets(config)] == [9.0, 10.0, 9.0, 10.0]
    config["export"]["cells"] = ["tiny_qwen2_5_vl/wfp8_afp8/lm-only/huge"]
    with pytest.raises(VlmsensError, match=r"export.cells\[0\].*not a cell of the grid"):
        check_config(config, check_paths=False)
    config["export"]["cells"] = ["tiny_qwen2_5_vl/wfp8_afp8"]
    with pytest.raises(VlmsensError, match=r"export.cells\[0\].*model/format/scope/size"):
        check_config(config, check_paths=False)


def test_cli_export_names_the_targets_of_the_cell(tmp_path):
    from vlmsens.cli import export_targets as cli_targets

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"outdir": "out", "autoquant": {"effective_bits": {"wfp8_afp8": 8.5}}}))
    assert cli_targets("m/wfp8_afp8/lm-only/small", [], config) == ["out/export/m/wfp8_afp8/lm-only/small/bits-8.5"]
    assert cli_targets("m/wfp8_afp8/lm-only/small", [9.0, 8.25], config) == [
        "out/export/m/wfp8_afp8/lm-only/small/bits-9", "out/export/m/wfp8_afp8/lm-only/small/bits-8.25"]
    with pytest.raises(VlmsensError, match="effective_bits.wint8_aint8"):
        cli_targets("m/wint8_aint8/lm-only/small", [], config)


def test_an_export_that_differs_from_its_recipe_fails_the_check_and_leaves_no_folder(
        tiny_checkpoints, export_dbs, demo_coco, tmp_path, monkeypatch):
    """A wrong scale in the files (here: one layer's dequantized weight 1.5× too large) is damage the
    fake-quantized model does not have: the check fails and the folder never appears."""
    import torch

    import vlmsens.export as export_module

    read_back = export_module.load_exported

    def with_a_wrong_scale(folder, device, kernels):
        model, formats = read_back(folder, device, kernels)
        layer = dict(model.named_modules())["model.language_model.layers.1.mlp.down_proj"]
        with torch.no_grad():
            layer.weight.mul_(1.5)
        return model, formats

    monkeypatch.setattr(export_module, "load_exported", with_a_wrong_scale)
    family = "qwen2_5_vl"
    job = _cell(tiny_checkpoints[family], family, "wfp8_afp8", "lm-only", export_dbs, demo_coco, tmp_path / "work")
    outputs = _outputs(tmp_path / "export")
    with pytest.raises(VlmsensError, match="export check failed"):
        export_cell(**job, budget=8.0, outputs=outputs, progress=lambda _: None)  # 8 bits: every group FP8
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())
