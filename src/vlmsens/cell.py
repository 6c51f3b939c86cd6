"""Job-level entry points: what one Snakemake job of each rule does, minus the Snakemake object."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import handoff, provenance
from .autoquant import CellSpec, load_search_state, run_autoquant
from .batches import PromptSettings, encode_samples, load_samples, load_samples_meta, save_samples
from .calib import read_calib_db
from .config import AutoquantSettings, LadderSettings, ValidationSettings
from .errors import VlmsensError
from .export import ExportSettings, export_recipe
from .families import get_family
from .formats import format_bits, format_registry, resolve_format
from .io import atomic_path, atomic_write_json, atomic_write_text
from .ladder import run_ladder
from .models import load_processor
from .recipes import make_recipe
from .render import sensitivity_json, sensitivity_markdown
from .reports.export import export_doc
from .reports.validate import validation_doc
from .scopes import IMAGE_AND_CAPTION, sample_inputs
from .validation import run_validation

log = logging.getLogger(__name__)


def prepare_samples(
    *,
    checkpoint: str,
    calib_db: str,
    coco_root: str | None,
    scope: str,
    inputs: str,
    prompts: dict[str, Any],
    out_path: str,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Encode a calibration subset for one (model, scope): shared by every format's cell.

    ``inputs`` is what the samples hold (``calibration.inputs`` as the scope reads it:
    vlmsens.config.calibration_inputs); ``prompts`` holds the prompt keys of those inputs only.
    """
    samples, db_meta = read_calib_db(calib_db)
    if not samples:
        raise VlmsensError(f"calibration DB {calib_db} holds no samples")
    if sample_inputs(scope, inputs) != inputs:
        raise VlmsensError(f"scope {scope} searches the vision tower and needs image+caption samples, not {inputs}")
    with_image = inputs == IMAGE_AND_CAPTION
    if with_image and not coco_root:
        raise VlmsensError(f"{inputs} samples of scope {scope} need coco.root to read the images")
    settings = PromptSettings(
        image_instruction=prompts.get("image_instruction", ""),
        text_instruction=prompts.get("text_instruction", ""),
        min_pixels=int(prompts.get("min_pixels", 0)),
        max_pixels=int(prompts.get("max_pixels", 0)),
    )
    progress(f"preprocess: {len(samples)} samples, {inputs}")
    processor = load_processor(checkpoint)
    encoded = encode_samples(processor, samples, Path(coco_root) if coco_root else None, with_image, settings, progress)
    meta = {
        "scope": scope,
        "inputs": inputs,
        "num_samples": len(encoded),
        "calib_db": str(calib_db),
        "calib_meta": db_meta,
        "prompts": dict(sorted(prompts.items())),
        "loss_tokens": int(sum(int((s["labels"] != -100).sum()) for s in encoded)),
        "tokens": int(sum(s["input_ids"].shape[0] for s in encoded)),
        "images": [f"{s.split}/{s.image_relpath}" for s in samples],
    }
    save_samples(out_path, encoded, meta)
    progress(f"preprocess: wrote {out_path} ({meta['tokens']} tokens, {meta['loss_tokens']} caption tokens)")
    return meta


def run_cell(
    *,
    batch_halvings: int = 0,
    model_name: str,
    model_cfg: dict[str, Any],
    checkpoint: str,
    format_name: str,
    formats_cfg: dict[str, Any],
    scope: str,
    size: str,
    autoquant_cfg: dict[str, Any],
    batch_size: int,
    seed: int,
    samples_path: str,
    calib_db: str,
    outputs: dict[str, str],
    progress: Callable[[str], None] = log.info,
    job_started: float | None = None,
) -> dict[str, Any]:
    """Run one AutoQuantize cell and write its four files (JSON, Markdown, manifest, state).

    ``job_started``: when the job's process started (epoch seconds), so that ``job_wall_s`` counts
    its start-up (imports, the wait for a GPU) as well as the cell.
    """
    import torch

    started = time.perf_counter()
    spec = cell_spec(model_name=model_name, model_cfg=model_cfg, checkpoint=checkpoint, format_name=format_name,
                     formats_cfg=formats_cfg, scope=scope, size=size, autoquant_cfg=autoquant_cfg,
                     batch_size=batch_size, batch_halvings=batch_halvings, seed=seed)
    formats = spec.formats
    checksums = provenance.InputChecksums({"samples": samples_path, "calib_db": calib_db})
    read_started = time.perf_counter()
    samples, samples_meta = load_samples(samples_path)
    read_s = time.perf_counter() - read_started
    inputs = _samples_inputs(samples_path, samples_meta, scope)
    _, db_meta = read_calib_db(calib_db)
    progress(f"cell {model_name}/{format_name}/{scope}/{size}: {len(samples)} {inputs} samples, batch size {batch_size or 'auto'}")

    with atomic_path(outputs["state"]) as state_tmp:
        result = run_autoquant(spec, samples, progress=progress, state_path=str(state_tmp), read_s=read_s)
        manifest = {
            "schema_version": 1,
            "cell": {
                "model": model_name,
                "family": spec.family.name,
                "checkpoint": checkpoint,
                "format": format_name,
                "candidates": [f.name for f in formats],
                "scope": scope,
                "size": size,
            },
            "config": {
                "effective_bits": spec.effective_bits,
                "method": spec.method,
                "batch_size": batch_size or "auto",
                "batch_size_used": result["batch_plan"]["batch_size"],
                "seed": seed,
                "inputs": inputs,
                "prompts": samples_meta.get("prompts"),
                "autoquant": autoquant_cfg,
            },
            "formats": {
                f.name: {"base": f.base, "description": f.description, "bits": format_bits(f), "modelopt_config": _jsonable(f.modelopt_config)}
                for f in formats
            },
            "dataset": {**db_meta, "calib_db": str(calib_db), "samples_file": str(samples_path)},
            **result,
        }
        manifest["provenance"] = provenance.collect(checksums, checkpoint=checkpoint)
        manifest["provenance"]["wall_time_s"] = round(time.perf_counter() - started, 3)
        if job_started is not None:
            manifest["provenance"]["job_wall_s"] = round(time.time() - job_started, 3)
        manifest["provenance"]["torch_threads"] = torch.get_num_threads()
        write_cell_reports(manifest, outputs)
    handoff.seal(outputs["state"])  # the search model stays for the cell's validation (in the worker's processes)
    progress(
        f"write: done; effective bits {manifest['search']['effective_bits_achieved']:.3f} "
        f"(target {spec.effective_bits}), satisfied={manifest['search']['is_satisfied']}"
    )
    return manifest


def cell_arguments(smk) -> dict[str, Any]:
    """The cell's identity and settings from a Snakemake job of rule autoquant or validate."""
    w, params = smk.wildcards, smk.params
    return dict(
        model_name=w.model, model_cfg=params.model_cfg, checkpoint=params.checkpoint, format_name=w.format,
        formats_cfg=params.formats_cfg, scope=w.scope, size=w.size, autoquant_cfg=params.autoquant_cfg,
        batch_size=smk.resources.batch_size, batch_halvings=getattr(smk.resources, "batch_halvings", 0), seed=params.seed,
    )


def cell_spec(*, model_name: str, model_cfg: dict[str, Any], checkpoint: str, format_name: str,
              formats_cfg: dict[str, Any], scope: str, size: str, autoquant_cfg: dict[str, Any],
              batch_size: int, seed: int, batch_halvings: int = 0):
    """The CellSpec of one cell from the config (shared by the cell and its validation)."""
    formats = resolve_format(format_name, format_registry(formats_cfg))
    settings = AutoquantSettings.from_config(autoquant_cfg)
    return CellSpec(
        model=model_name,
        family=get_family(model_cfg["family"]),
        checkpoint=checkpoint,
        format_name=format_name,
        formats=formats,
        scope=scope,
        size=size,
        effective_bits=settings.effective_bits_of(format_name),
        method=settings.method,
        batch_size=batch_size,
        batch_halvings=batch_halvings,
        gpu_memory_gib=settings.gpu_memory_gib,
        device=settings.device,
        seed=seed,
        gradient_checkpointing=settings.gradient_checkpointing,
        kernels=settings.kernels,
    )


def validate_cell(
    *,
    validation_cfg: dict[str, Any],
    manifest_path: str,
    state_path: str,
    samples_path: str,
    eval_samples_path: str,
    outputs: dict[str, str],
    progress: Callable[[str], None] = log.info,
    **cell: Any,
) -> dict[str, Any]:
    """Measure whether the cell's ranking predicts real damage; writes validation.json and .md."""
    doc = _held_out_job("validate", cell, (manifest_path, state_path, samples_path, eval_samples_path),
                        lambda seed: ValidationSettings.from_config(validation_cfg, seed), run_validation, progress)
    atomic_write_text(outputs["markdown"], validation_doc(doc).to_markdown())
    atomic_write_json(outputs["json"], doc)
    return doc


def ladder_cell(
    *,
    ladder_cfg: dict[str, Any],
    manifest_path: str,
    state_path: str,
    samples_path: str,
    eval_samples_path: str,
    outputs: dict[str, str],
    progress: Callable[[str], None] = log.info,
    **cell: Any,
) -> dict[str, Any]:
    """Measure the cell's recipes across a ladder of budgets on the held-out samples; writes ladder.json."""
    doc = _held_out_job("ladder", cell, (manifest_path, state_path, samples_path, eval_samples_path),
                        lambda seed: LadderSettings.from_config(ladder_cfg, seed), run_ladder, progress,
                        detail=lambda settings: f", {len(settings.bits_above_uniform)} rungs")
    atomic_write_json(outputs["json"], doc)
    return doc


def _held_out_job(job: str, cell: dict[str, Any], paths: tuple[str, str, str, str], settings_for: Callable[[int], Any],
                  run: Callable[..., dict[str, Any]], progress: Callable[[str], None],
                  detail: Callable[[Any], str] = lambda settings: "") -> dict[str, Any]:
    """What validate and ladder do around their measurement: read the cell's manifest and search
    state and the held-out samples (checked against the calibration samples' meta: the samples
    themselves are not read, the search state holds their calibration), build their settings, run
    ``run`` and wrap its body into the document."""
    started = time.perf_counter()
    manifest_path, state_path, samples_path, eval_samples_path = paths
    # hashed beside the measurement (GBs of samples at the large size), not after it
    checksums = provenance.InputChecksums({"manifest": manifest_path, "state": state_path, "samples": samples_path,
                                           "held_out_samples": eval_samples_path})
    manifest = json.loads(Path(manifest_path).read_text())
    spec = _as_calibrated(manifest, cell)
    _, calib_meta, held_out, eval_meta, inputs = _held_out_pair(spec, manifest, manifest_path, samples_path, eval_samples_path,
                                                                 calibration=False)
    cell_model = handoff.take(state_path)  # the cell's own search model, where this process ran the cell
    state = load_search_state(state_path) if cell_model is None else None
    settings = settings_for(spec.seed)
    progress(f"{job} {spec.model}/{spec.format_name}/{spec.scope}/{spec.size}: the cell's calibration on "
             f"{manifest['batches']['samples']} samples, {len(held_out)} held-out samples{detail(settings)}")
    body = run(spec, manifest, state, held_out, settings, progress=progress, cell_model=cell_model)
    return _held_out_doc(spec, manifest, body, inputs, (manifest_path, samples_path, eval_samples_path),
                         (calib_meta, eval_meta), started, checksums)


def export_cell(
    *,
    export_cfg: dict[str, Any],
    budget: float,
    manifest_path: str,
    state_path: str,
    samples_path: str,
    eval_samples_path: str,
    outputs: dict[str, str],
    progress: Callable[[str], None] = log.info,
    **cell: Any,
) -> dict[str, Any]:
    """Export the cell's recipe at ``budget`` as a checked checkpoint folder, and its report page."""
    started = time.perf_counter()
    manifest = json.loads(Path(manifest_path).read_text())
    spec = cell_spec(**cell)
    calib, _, held_out, _, _ = _held_out_pair(spec, manifest, manifest_path, samples_path, eval_samples_path)
    # The recipe rule ``recipes`` writes for this budget: same manifest, same search state, same solver.
    recipe = make_recipe(manifest, float(budget), load_search_state(state_path))
    if not recipe["feasible"]:
        raise VlmsensError(f"budget {budget:g} bits is infeasible for {manifest_path} ({recipe['status']}); "
                           "pick a budget in export.budgets the cell's formats can reach")
    progress(f"export {spec.model}/{spec.format_name}/{spec.scope}/{spec.size} at {budget:g} bits: "
             f"{recipe['achieved_bits']:.4f} bits achieved, {recipe['groups_bf16']} of {recipe['groups']} groups BF16")
    record = provenance.collect(
        {"manifest": manifest_path, "state": state_path, "samples": samples_path, "held_out_samples": eval_samples_path},
        checkpoint=spec.checkpoint)
    doc = export_recipe(spec, manifest, recipe, calib, held_out, ExportSettings.from_config(export_cfg),
                        outputs["checkpoint"], provenance=record, started=started, progress=progress)
    export_doc(doc, outputs["checkpoint"]).write(outputs["markdown"], outputs["html"])
    return doc


def _samples_inputs(path: str, meta: dict[str, Any], scope: str) -> str:
    """What a samples file holds, checked against the scope it is used for."""
    if meta.get("scope") != scope:
        raise VlmsensError(f"{path} was prepared for scope {meta.get('scope')!r}, not {scope!r}")
    inputs = meta.get("inputs")
    if inputs is None:
        raise VlmsensError(f"{path} does not record its inputs (made by an older vlmsens): prepare the samples again")
    return inputs


def _as_calibrated(manifest: dict[str, Any], cell: dict[str, Any]) -> CellSpec:
    """The cell's spec (its own keyword arguments, see run_cell) searching exactly as the cell did:
    its own target, method and candidates."""
    return replace(cell_spec(**cell), effective_bits=float(manifest["search"]["effective_bits_target"]),
                   method=manifest["search"]["method"])


def _held_out_doc(spec: CellSpec, manifest: dict[str, Any], body: dict[str, Any], inputs: str,
                  paths: tuple[str, str, str], metas: tuple[dict[str, Any], dict[str, Any]], started: float,
                  checksums: provenance.InputChecksums) -> dict[str, Any]:
    """validation.json or ladder.json: the cell, the measurements, the samples they used and provenance."""
    manifest_path, samples_path, eval_samples_path = paths
    calib_meta, eval_meta = metas
    doc = {
        "schema_version": 1,
        "cell": {k: manifest["cell"][k] for k in ("model", "family", "format", "candidates", "scope", "size")},
        **body,
        "dataset": {"inputs": inputs, "calibration": calib_meta.get("calib_meta"), "held_out": eval_meta.get("calib_meta"),
                    "calibration_samples": str(samples_path), "held_out_samples": str(eval_samples_path)},
    }
    doc["provenance"] = provenance.collect(checksums, checkpoint=spec.checkpoint)
    doc["provenance"]["wall_time_s"] = round(time.perf_counter() - started, 3)
    return doc


def _held_out_pair(spec: CellSpec, manifest: dict[str, Any], manifest_path: str, samples_path: str,
                   eval_samples_path: str, calibration: bool = True
                   ) -> tuple[list[dict] | None, dict[str, Any], list[dict], dict[str, Any], str]:
    """The cell's calibration samples and the held-out ones, checked to belong to the cell and to each
    other (formats, scope, inputs, no shared image): (calib, its meta, held-out, its meta, inputs).
    ``calibration=False`` reads the calibration samples' meta only (calib is None)."""
    if [f.name for f in spec.formats] != manifest["cell"]["candidates"]:
        raise VlmsensError(
            f"{manifest_path} was made with formats {manifest['cell']['candidates']}, the config now gives "
            f"{[f.name for f in spec.formats]}: rerun the cell")
    calib, calib_meta = load_samples(samples_path) if calibration else (None, load_samples_meta(samples_path))
    held_out, eval_meta = load_samples(eval_samples_path)
    inputs = _samples_inputs(samples_path, calib_meta, spec.scope)
    if _samples_inputs(eval_samples_path, eval_meta, spec.scope) != inputs:
        raise VlmsensError(f"{eval_samples_path} holds {eval_meta['inputs']} samples, the calibration samples {inputs}: "
                           "measure on what the cell was calibrated with (rerun prepare_eval_samples)")
    if manifest["config"].get("inputs", inputs) != inputs:
        raise VlmsensError(f"{manifest_path} was calibrated on {manifest['config']['inputs']} samples, {samples_path} "
                           f"holds {inputs}: rerun the cell")
    overlap = set(calib_meta.get("images", [])) & set(eval_meta.get("images", []))
    if overlap:
        raise VlmsensError(f"{eval_samples_path} shares {len(overlap)} image(s) with the calibration samples; "
                           "the evaluation subset must be held out")
    return calib, calib_meta, held_out, eval_meta, inputs


def write_cell_reports(manifest: dict[str, Any], outputs: dict[str, str]) -> None:
    """JSON, Markdown and manifest, each written atomically; the manifest last."""
    atomic_write_json(outputs["json"], sensitivity_json(manifest))
    atomic_write_text(outputs["markdown"], sensitivity_markdown(manifest))
    atomic_write_json(outputs["manifest"], manifest)


def rerender(manifest_path: str, json_out: str, markdown_out: str) -> None:
    """The report-only path: JSON and Markdown again from quant_manifest.json alone."""
    manifest = json.loads(Path(manifest_path).read_text())
    atomic_write_json(json_out, sensitivity_json(manifest))
    atomic_write_text(markdown_out, sensitivity_markdown(manifest))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
