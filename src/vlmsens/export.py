"""From map to model: one recipe of a cell as a deployable mixed-precision checkpoint, checked.

For a cell and an effective-bits budget this module

* re-solves the cell's recipe for the budget exactly as rule ``recipes`` does
  (:func:`vlmsens.recipes.make_recipe` on the cell's manifest and search state),
* builds the recipe's ModelOpt ``quant_cfg`` from the formats' own ModelOpt configs (the groups kept
  in BF16 and, in ``lm-only`` cells, the vision tower left off) and applies it to the BF16
  checkpoint with ``mtq.quantize``, calibrated on the cell's own calibration samples,
* writes a Hugging Face checkpoint with ModelOpt's exporter (``export_hf_checkpoint``: quantized
  weights, scales, ``hf_quant_config.json`` and the ``quantization_config`` of ``config.json``
  listing each layer's format and the layers kept in BF16), the processor and tokenizer files,
  and ``vlmsens-export.json`` (the recipe, the cell, bits, per-layer formats, check, checksums),
* checks it: the folder is read back as its runtime would read it (:mod:`vlmsens.exported`) and
  compared, on held-out samples and caption tokens, with the fake-quantized model of the same
  recipe (KL per caption token, and the caption loss of BF16, fake-quantized and exported).

Everything is written into a temporary folder that replaces the target only once the check has
passed: a format ModelOpt cannot export, or an export the check rejects, leaves no folder.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .autoquant import NO_QUANT, CellSpec, PhaseClock, _device_info, caption_logits, device_batches, load_cell_model
from .calibration import install as install_calibrators
from .config import ExportSettings
from .errors import VlmsensError
from .exported import READABLE_ALGOS, load_exported
from .formats import FormatSpec
from .io import atomic_dir, atomic_write_json, sha256_file
from .models import load_processor
from .recipes import bits_of, quant_cfg_from_manifest, with_bf16_guards
from .validation import Evaluator

log = logging.getLogger(__name__)

EXPORT_JSON = "vlmsens-export.json"


def budget_dirname(budget: float) -> str:
    """The export folder of a budget: 8.5 -> 'bits-8.5', 9.0 -> 'bits-9'."""
    return f"bits-{float(budget):g}"


def deployable_quant_cfg(manifest: dict[str, Any], selection: dict[str, str], formats: list[FormatSpec]) -> dict[str, Any]:
    """The recipe's quant_cfg for ``mtq.quantize``, from the formats' live ModelOpt configs.

    Same entries as the recipe JSON of rule ``recipes`` (everything off, the cell's disabled
    patterns off, each quantized group's modules set from its format, BF16 groups explicitly
    off), but with ModelOpt's own Python values: block sizes keep their integer keys and tuples,
    which a JSON round trip turns into strings and lists.
    """
    live = copy.deepcopy(manifest)
    by_name = {f.name: f for f in formats}
    used = sorted({fmt for fmt in selection.values() if fmt != NO_QUANT})
    unknown = [fmt for fmt in used if fmt not in by_name]
    if unknown:
        raise VlmsensError(f"the recipe selects format {unknown[0]!r}, which the config does not define: rerun the cell")
    for name in used:
        live["formats"][name] = {**live["formats"].get(name, {}), "modelopt_config": by_name[name].modelopt_config}
    cfg = quant_cfg_from_manifest(live, selection)
    algorithms = {repr(by_name[name].modelopt_config.get("algorithm", "max")) for name in used}
    if len(algorithms) == 1:
        cfg["algorithm"] = copy.deepcopy(by_name[used[0]].modelopt_config.get("algorithm", "max"))
    return with_bf16_guards(cfg, manifest, selection)


def exportable_selection(model, manifest: dict[str, Any], selection: dict[str, str]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The recipe as ModelOpt's HF exporter can write it, and the groups it had to keep in BF16.

    The exporter packs quantized ``Linear`` layers only: a quantized convolution (the patch
    embedding of the vision tower) would be written with its BF16 weights and no scales, so the
    checkpoint would not be the recipe. Such groups are kept in BF16 in the export (and in the
    fake-quantized model it is checked against), and listed with the bits this costs.
    """
    import torch

    modules = dict(model.named_modules())
    out, kept = dict(selection), []
    for group in manifest["groups"]:
        fmt = selection[group["layer"]]
        odd = [name for name in group["modules"] if not isinstance(modules[name], torch.nn.Linear)]
        if fmt != NO_QUANT and odd:
            out[group["layer"]] = NO_QUANT
            kept.append({"layer": group["layer"], "recipe_format": fmt,
                         "reason": f"{type(modules[odd[0]]).__name__} layers are not packed by ModelOpt's HF exporter"})
    return out, kept


def modelopt_layer_formats(model, manifest: dict[str, Any], selection: dict[str, str]) -> dict[str, dict[str, str]]:
    """Per module of every searched group: the recipe's format and ModelOpt's export format for it.

    A format ModelOpt cannot export (or exports as something the check cannot read) fails here,
    naming the recipe's format, before anything is written.
    """
    from modelopt.torch.export.quant_utils import get_quantization_format

    modules = dict(model.named_modules())
    out: dict[str, dict[str, str]] = {}
    for group in manifest["groups"]:
        fmt = selection[group["layer"]]
        for name in group["modules"]:
            try:
                algo = get_quantization_format(modules[name])
            except (NotImplementedError, AssertionError) as err:
                raise VlmsensError(f"format {fmt!r} (layer {name}) cannot be exported by ModelOpt: {err}") from None
            algo = algo or NO_QUANT
            if fmt == NO_QUANT and algo != NO_QUANT:
                raise VlmsensError(f"layer {name} is BF16 in the recipe but ModelOpt quantized it ({algo}): the quant_cfg is wrong")
            if fmt != NO_QUANT and algo not in READABLE_ALGOS:
                raise VlmsensError(
                    f"format {fmt!r} is exported by ModelOpt as {algo!r}, which vlmsens cannot check after export "
                    f"(it reloads {', '.join(READABLE_ALGOS)}: the 8-bit formats); export it without vlmsens' check "
                    "with modelopt.torch.export.export_hf_checkpoint")
            out[name] = {"recipe_format": fmt, "modelopt_format": algo}
    return out


def export_recipe(
    spec: CellSpec,
    manifest: dict[str, Any],
    recipe: dict[str, Any],
    calib_samples: list[dict],
    held_out: list[dict],
    settings: ExportSettings,
    out_dir: str | Path,
    *,
    provenance: dict[str, Any] | None = None,
    started: float | None = None,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Quantize, export, reload and check one recipe; returns vlmsens-export.json's body."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    if not held_out:
        raise VlmsensError("the export check needs held-out samples; none were given")
    clock = PhaseClock(progress)
    model, calib_batches, device, dtype, plan = load_cell_model(spec, calib_samples, clock)
    selection, kept_by_export = exportable_selection(model, manifest, recipe["selection"])
    for row in kept_by_export:
        progress(f"export: {row['layer']} kept in BF16 instead of {row['recipe_format']}: {row['reason']}")
    quant_cfg = deployable_quant_cfg(manifest, selection, spec.formats)
    check = held_out[: settings.check_samples]
    eval_batches = device_batches(model, check, plan["batch_size"], device, dtype)

    clock.enter("reference", f"BF16 on {len(check)} held-out samples")
    against_bf16 = Evaluator(model, eval_batches)
    bf16_loss = against_bf16.set_reference()

    clock.enter("quantize", f"mtq.quantize with the recipe, calibrated on {len(calib_samples)} samples of the cell")

    def calibrate(m):
        install_calibrators(m)
        with torch.no_grad():
            for batch in calib_batches:
                caption_logits(m, batch)

    model = mtq.quantize(model, quant_cfg, forward_loop=calibrate)
    layers = modelopt_layer_formats(model, manifest, selection)
    fake = against_bf16.measure()
    against_fake = Evaluator(model, eval_batches)
    against_fake.set_reference()

    with atomic_dir(out_dir) as tmp:
        clock.enter("export", str(out_dir))
        source_dtype = getattr(model.config, "dtype", None)
        if isinstance(source_dtype, torch.dtype) and next(model.parameters()).dtype != source_dtype:
            model.to(source_dtype)  # a CPU cell computes in fp32; the export keeps the checkpoint's dtype
        export_hf_checkpoint(model, export_dir=tmp)
        load_processor(spec.checkpoint).save_pretrained(tmp)
        del model, against_bf16.model, against_fake.model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # the reloaded copy takes the quantized model's place, not a second one
        clock.enter("check", "reload the folder and compare with the fake-quantized model")
        reloaded, exported_formats = load_exported(tmp, device, spec.kernels)  # the fake-quantized model's kernels
        against_bf16.model = against_fake.model = reloaded
        exported = against_bf16.measure()
        drift = against_fake.measure()
        quantized_modules = {name for name, row in layers.items() if row["recipe_format"] != NO_QUANT}
        limit = settings.kl_limit(fake["kl"])
        result = {
            "passed": drift["kl"] <= limit,
            "held_out_samples": len(check),
            "caption_tokens": sum(against_bf16.tokens),
            "max_kl": limit,
            "max_kl_ratio": settings.max_kl_ratio,
            "kl_exported_vs_fake_quant": drift["kl"],
            "loss": {"bf16": bf16_loss, "fake_quant": fake["loss"], "exported": exported["loss"]},
            "kl_vs_bf16": {"fake_quant": fake["kl"], "exported": exported["kl"]},
            "layers_quantized_in_export": len(exported_formats),
            "modules_quantized_in_recipe": len(quantized_modules),
        }
        progress(f"check: KL exported vs fake-quant {drift['kl']:.3g} per caption token (max {limit:.3g}); "
                 f"loss BF16 {bf16_loss:.4f}, fake-quant {fake['loss']:.4f}, exported {exported['loss']:.4f}")
        if not result["passed"]:
            raise VlmsensError(f"export check failed: the reloaded export differs from the fake-quantized model by "
                               f"KL {drift['kl']:.3g} per caption token, more than export.max_kl_ratio = {settings.max_kl_ratio:g} of the "
                               f"recipe's own KL to BF16 ({fake['kl']:.3g}); nothing written")
        doc = {
            "schema_version": 1,
            "cell": {k: manifest["cell"][k] for k in ("model", "family", "checkpoint", "format", "scope", "size")},
            "budget_bits": recipe["budget_bits"],
            "achieved_bits": bits_of(manifest, selection),
            "recipe_achieved_bits": recipe["achieved_bits"],
            "feasible": recipe["feasible"],
            "selection": selection,
            "kept_bf16_by_export": kept_by_export,
            "recipe": {k: recipe[k] for k in ("source", "groups", "groups_bf16", "groups_by_format", "kept_bf16",
                                               "selection", "predicted_score", "predicted_score_per_token", "notes")},
            "disabled_patterns": manifest["search"].get("disabled_layers", []),
            "layers": layers,
            "exported_layers": exported_formats,
            "quant_cfg": quant_cfg,
            "check": result,
            "device": _device_info(device),
            "timings_s": clock.stop(),
            "files_sha256": {p.name: sha256_file(p) for p in sorted(Path(tmp).iterdir()) if p.is_file()},
            "provenance": {**(provenance or {}),
                           "wall_time_s": round(time.perf_counter() - started, 3) if started is not None else None},
        }
        atomic_write_json(Path(tmp) / EXPORT_JSON, doc)
    return doc
