"""One AutoQuantize cell: model × format × scope × size → per-group sensitivity and selection.

What this adds to a plain ``mtq.auto_quantize`` call, and why:

* the loss is summed over caption tokens only, and ``lm_head`` runs on those positions only;
* every calibration sample is used for calibration *and* scoring (sizes stay distinct);
* ``lm-only`` keeps the vision tower out of the search and out of the bit budget;
* the raw per-format score of every group is read before ModelOpt's monotone clipping, so FP8
  and INT8 sensitivities are both visible, and is normalised per caption token;
* the solver's selected format per group is recorded, not the candidate list.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import handoff
from .batches import IGNORE_INDEX, batch_stats, largest_batch_shape, make_batches, plan_batch_size
from .calibration import install as install_calibrators
from .errors import VlmsensError
from .families import Family, block_index, sublayer_of, tower_of
from .formats import FormatSpec
from .kernels import check_choice as check_kernels
from .logs import BatchProgress
from .models import dtype_for, load_model, pick_device
from .provenance import cpu_name
from .scopes import get_scope
from .vision_reuse import VisionFeatures

log = logging.getLogger(__name__)

METHODS = ("gradient", "kl_div")
NO_QUANT = "bf16"


@dataclass
class CellSpec:
    model: str
    family: Family
    checkpoint: str
    format_name: str
    formats: list[FormatSpec]
    scope: str
    size: str
    effective_bits: float
    method: str = "gradient"
    # 0: the largest batch that fits the GPU memory budget (gpu_memory_gib, or the card's free memory
    # less a margin), from the family's measured memory model; each halving (an OOM retry) halves it.
    batch_size: int = 4
    batch_halvings: int = 0
    gpu_memory_gib: float | None = None
    device: str = "auto"
    seed: int = 0
    vision_attention: str = "varlen"
    gradient_checkpointing: bool = True
    kernels: str = "liger"

    def validate(self) -> None:
        get_scope(self.scope)
        if self.method not in METHODS:
            raise VlmsensError(f"autoquant.method must be one of {METHODS}, got {self.method!r}")
        if self.batch_size < 0 or self.batch_halvings < 0:
            raise VlmsensError(f"batch size must be positive or 0 (auto), got {self.batch_size}")
        if not 0 < self.effective_bits <= 16:
            raise VlmsensError(f"effective bits target must be in (0, 16], got {self.effective_bits}")
        check_kernels(self.kernels)


@dataclass
class PhaseClock:
    """Wall time per phase, a progress line at each phase change, and per-batch progress with an ETA
    (``expected``: batches per phase, where known)."""
    progress: Callable[[str], None]
    times: dict[str, float] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    _phase: str | None = None
    _start: float = 0.0
    _batches: BatchProgress | None = None

    def enter(self, phase: str | None, detail: str = "") -> None:
        if phase == self._phase:
            return
        now = time.perf_counter()
        if self._phase is not None:
            self.times[self._phase] = self.times.get(self._phase, 0.0) + now - self._start
            batches = self._batches.summary() if self._batches else ""
            self.progress(f"{self._phase} done in {self.times[self._phase]:.2f} s{batches}")
        self._phase, self._start, self._batches = phase, now, None
        if phase is not None:
            self.progress(f"{phase} ..." + (f" {detail}" if detail else ""))

    def batch(self, phase: str) -> None:
        """A batch of ``phase`` starts (entering the phase when it is a new one)."""
        self.enter(phase)
        if self._batches is None:
            self._batches = BatchProgress(self.progress, phase, self.expected.get(phase))
        self._batches.step()

    def stop(self) -> dict[str, float]:
        self.enter(None)
        return {k: round(v, 4) for k, v in self.times.items()}


def _to_device(batch: dict, device: str, dtype) -> dict:
    import torch

    moved = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.to(device, non_blocking=True)
        if value.is_floating_point():
            value = value.to(dtype)
        moved[key] = value
    return moved


def caption_logits(model, batch: dict, inputs: dict | None = None):
    """Logits at the positions that predict caption tokens, and their targets.

    The backbone runs on the whole sequence; ``lm_head`` only on the positions whose next token
    is a caption token, which saves the (tokens × vocab) product everywhere else. ``inputs``
    replaces the model inputs taken from ``batch`` (e.g. precomputed image features).
    """
    if inputs is None:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][mask])
    return logits, targets[mask]


@contextlib.contextmanager
def gradient_checkpointing(model, enabled: bool):
    """Let ModelOpt's score phase checkpoint activations, or keep it from doing so.

    ModelOpt turns gradient checkpointing on for every Hugging Face model that supports it, which
    recomputes each block's forward (with all quantizer hooks) during backward. A model that
    reports no support keeps every activation instead: one forward pass fewer per batch, more memory.
    """
    if enabled:
        yield
        return
    model.supports_gradient_checkpointing = False  # instance attribute, shadows the class default
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="AutoQuantize: Huggingface model without gradient checkpointing")
            yield
    finally:
        del model.supports_gradient_checkpointing


def _recipe_name_map(formats: list[FormatSpec]):
    from modelopt.torch.quantization.algorithms import QuantRecipe

    mapping = {QuantRecipe(quant_cfg=None): NO_QUANT}
    for spec in formats:
        mapping[QuantRecipe(spec.modelopt_config, name=spec.name)] = spec.name
    return mapping


def _name_of(recipe, mapping) -> str:
    for known, name in mapping.items():
        if recipe == known:
            return name
    return str(recipe)


def job_device(spec: CellSpec):
    """The (device, dtype) a cell's model runs on, set up as a job starts with it: the spec checked,
    torch seeded, the peak-memory count restarted."""
    import torch

    spec.validate()
    device = pick_device(spec.device)
    torch.manual_seed(spec.seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        # cuDNN's SDPA backend plans every new shape on the host (about 5 ms a call); ragged
        # batches and vision windows make most calls new shapes (docs/DESIGN.md, "Speed").
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device, dtype_for(device)


def load_spec_model(spec: CellSpec, clock: PhaseClock):
    """The cell's checkpoint on its device, seeded, in eval mode: (model, device, dtype)."""
    device, dtype = job_device(spec)
    clock.enter("load", spec.checkpoint)
    return load_model(spec.checkpoint, device, vision_attention=spec.vision_attention, kernels=spec.kernels), device, dtype


def load_cell_model(spec: CellSpec, samples: list[dict], clock: PhaseClock):
    """The cell's model on its device and its samples as device batches: (model, batches, device, dtype, plan).

    ``plan`` says which batch size was used and why (fixed, or sized by memory).
    """
    model, device, dtype = load_spec_model(spec, clock)
    plan = batch_plan(spec, model, samples, device)
    clock.progress(plan["reason"])
    plan["resident_gib"] = round(_resident_bytes(model, device) / 2**30, 3)
    plan["largest_batch"] = largest_batch_shape(samples, plan["batch_size"])
    batches = device_batches(model, samples, plan["batch_size"], device, dtype)
    if get_scope(spec.scope).needs_images and "pixel_values" not in batches[0]:
        raise VlmsensError(f"scope {spec.scope} needs image+caption samples, but the prepared samples are text-only")
    return model, batches, device, dtype, plan


# Kept free of the memory budget: ModelOpt's quantizer state and kernels' workspaces.
MEMORY_MARGIN_GIB = 2.0
# The caching allocator reserves about 1.27× the activations it hands out at these batch shapes
# (H100, bench/RESULTS.md); the budget is for what is reserved, not only allocated.
ALLOCATOR_OVERHEAD = 1.27
CPU_AUTO_BATCH = 8
# An inference forward (validation's held-out batches) keeps no activation for a backward pass
# and no score hook state, so it holds several search batches; 4 keeps a wide margin (the
# validation's peak memory is in validation.json, and an out-of-memory retry halves it too).
INFERENCE_BATCH_FACTOR = 4


def device_memory_budget(spec: CellSpec, device: str) -> float | None:
    """The GPU memory (bytes) a job may reserve: ``gpu_memory_gib``, or the card less the margin; None off the GPU."""
    if not device.startswith("cuda"):
        return None
    if spec.gpu_memory_gib is not None:
        return spec.gpu_memory_gib * 2**30 - MEMORY_MARGIN_GIB * 2**30
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory - MEMORY_MARGIN_GIB * 2**30


def inference_batch_size(search_batch_size: int, n_samples: int, halvings: int = 0) -> int:
    """The batch size of inference-only passes over ``n_samples`` samples, from the search's batch
    size; each halving (an out-of-memory retry of the inference job) halves it."""
    return max(1, min(n_samples, search_batch_size * INFERENCE_BATCH_FACTOR // 2**halvings))


def batch_plan(spec: CellSpec, model, samples: list[dict], device: str) -> dict[str, Any]:
    """The cell's batch size: the configured one, or the largest that the memory budget holds."""
    halve = 2 ** spec.batch_halvings
    if spec.batch_size > 0:
        size = max(1, spec.batch_size // halve)
        return {"policy": "fixed", "batch_size": size, "reason": f"batch size {size} (configured {spec.batch_size}"
                + (f", halved {spec.batch_halvings}× after out-of-memory" if spec.batch_halvings else "") + ")"}
    if spec.gpu_memory_gib is None and not device.startswith("cuda"):
        size = max(1, CPU_AUTO_BATCH // halve)
        return {"policy": "auto", "batch_size": size, "reason": f"batch size {size} (auto on the CPU: no memory budget)"}
    resident = _resident_bytes(model, device)
    static = resident + cached_feature_bytes(model, samples, spec)
    if spec.gpu_memory_gib is not None:
        cap, source = spec.gpu_memory_gib * 2**30, f"autoquant.gpu_memory_gib = {spec.gpu_memory_gib:g}"
    else:
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        cap, source = resident + free, f"free memory of the card ({(resident + free) / 2**30:.1f} of {total / 2**30:.1f} GiB)"
    budget = (cap - static - MEMORY_MARGIN_GIB * 2**30) / ALLOCATOR_OVERHEAD
    size, need = plan_batch_size(samples, memory_model(spec), budget / halve)
    size = max(1, size)
    predicted = (static + need * ALLOCATOR_OVERHEAD) / 2**30
    return {"policy": "auto", "batch_size": size, "memory_cap_gib": round(cap / 2**30, 3),
            "predicted_peak_gib": round(predicted, 3), "halvings": spec.batch_halvings,
            "reason": f"batch size {size} (auto: predicted peak {predicted:.1f} GiB reserved within {source}, "
                      f"{MEMORY_MARGIN_GIB:g} GiB kept free" + (f", budget halved {spec.batch_halvings}× after out-of-memory" if spec.batch_halvings else "") + ")"}


def memory_model(spec: CellSpec):
    """The cell's search memory per token and patch: its family's, for its candidate formats and scope."""
    return spec.family.memory_model(spec.gradient_checkpointing, n_formats=len(spec.formats),
                                    searches_vision=get_scope(spec.scope).searches_vision)


def cached_feature_bytes(model, samples: list[dict], spec: CellSpec) -> float:
    """What an lm-only search's image features, made once per batch and kept for the whole search
    (:class:`~vlmsens.vision_reuse.VisionFeatures`), hold: merged patches × the tower's outputs
    (Qwen3-VL adds its deepstack features) in the model's dtype."""
    if get_scope(spec.scope).searches_vision:
        return 0.0
    vision = model.config.vision_config
    patches = sum(int(s["pixel_values"].shape[0]) for s in samples if "pixel_values" in s)
    outputs = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or [])
    element = next(model.parameters()).element_size()
    return patches / vision.spatial_merge_size**2 * vision.out_hidden_size * outputs * element


def _resident_bytes(model, device: str) -> float:
    """What the cell holds before any batch runs: the weights (allocated memory on a GPU)."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.memory_allocated(torch.device(device)))
    return float(sum(p.numel() * p.element_size() for p in model.parameters()))


def device_batches(model, samples: list[dict], batch_size: int, device: str, dtype) -> list[dict]:
    pad_id = model.config.text_config.pad_token_id
    batches = [_to_device(b, device, dtype) for b in make_batches(samples, batch_size, 0 if pad_id is None else pad_id)]
    for batch in batches:
        add_rope_positions(model, batch)
    return batches


def add_rope_positions(model, batch: dict) -> None:
    """Store the batch's multimodal RoPE positions in it, computed once.

    Without ``position_ids`` transformers recomputes them on every forward, in a Python loop over
    the samples that reads token types back from the GPU; a cell runs each batch through the model
    several times (calibration, scoring, recomputation), so they are computed here once instead.
    """
    import torch

    inner = getattr(model, "model", None)
    if "image_grid_thw" not in batch or "mm_token_type_ids" not in batch or not hasattr(inner, "get_rope_index"):
        return
    with torch.no_grad():
        positions, _ = inner.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                            image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    batch["position_ids"] = positions


class ScoreDiffRelease:
    """Free each module's quantization output differences once its score has taken them.

    ModelOpt's gradient score keeps, per searched module, ``Q(Y) - Y`` of every candidate format
    from the module's forward until its backward hook multiplies them with the output gradient,
    and then never frees them: every module's differences stay alive until the next batch's
    forward replaces them, and the last batch's after the search. At full size they are most of a
    search's memory (about 2 MB per text token for Qwen2.5-VL-3B, the sum of all text blocks'
    linear outputs). A second backward hook, registered after ModelOpt's so it runs after it,
    empties the module's store; with gradient checkpointing only the block being recomputed then
    holds differences, so the same memory holds several times larger batches. The scores are
    the same numbers (``tests/test_autoquant.py``).
    """

    def __init__(self) -> None:
        self.handles: dict[Any, Any] = {}

    @staticmethod
    def _release(module, grad_input, grad_output) -> None:
        module.output_diff_dict = {}

    def attach(self, model) -> int:
        """Hook every module ModelOpt set up for scoring (it keeps a backward hook handle on it)."""
        for module in model.modules():
            if hasattr(module, "_backward_hook_handle") and module not in self.handles:
                self.handles[module] = module.register_full_backward_hook(self._release)
        return len(self.handles)

    def detach(self) -> None:
        for module, handle in self.handles.items():
            handle.remove()
            module.__dict__.pop("output_diff_dict", None)
        self.handles.clear()


def search_constraints(spec: CellSpec) -> tuple[dict[str, Any], list[str] | None]:
    """The cell's ``auto_quantize`` constraints and disabled layers: lm-only keeps the vision tower
    out of the search and out of the bit budget."""
    constraints: dict[str, Any] = {"effective_bits": float(spec.effective_bits)}
    if get_scope(spec.scope).searches_vision:
        return constraints, None
    constraints["cost"] = {"excluded_module_name_patterns": list(spec.family.vision_patterns)}
    return constraints, list(spec.family.vision_patterns)


def search(model, spec: CellSpec, batches: list[dict], clock: PhaseClock, restore: dict[str, Any] | None = None):
    """``mtq.auto_quantize`` as a vlmsens cell runs it: returns (model, search_state, constraints, disabled).

    Calibration and scoring use every batch.

    ``restore``: a cell's saved search state (``autoquant_state.pt``). ModelOpt resumes from it as
    from its own checkpoint (``auto_quantize(checkpoint=...)``): each format's calibrated quantizers
    are restored and scoring is skipped, so nothing runs forward and ``batches`` may be empty. For
    the jobs that re-create a cell's quantized model (validate, ladder): the same quantizers as the
    cell's, without calibrating again.
    """
    import modelopt.torch.quantization as mtq
    import torch

    if restore is not None:
        return _restored_search(model, spec, restore)

    release = ScoreDiffRelease()
    # An lm-only search neither quantizes nor scores the vision tower: each batch's image features
    # are made once and fed to every pass (its forwards, recomputations and backward skip the tower).
    vision = VisionFeatures(model) if not get_scope(spec.scope).searches_vision else None

    def model_inputs(batch):
        return vision.inputs(id(batch), batch) if vision is not None else None

    def forward_step(model, batch):
        scoring = torch.is_inference_mode_enabled()
        clock.batch("score" if scoring else "calibrate")
        if not scoring:
            install_calibrators(model)  # before the quantizers of each format first collect
        logits, _ = caption_logits(model, batch, model_inputs(batch))
        return logits

    def forward_backward_step(model, batch):
        clock.batch("score")
        if not release.handles:
            release.attach(model)
        logits, targets = caption_logits(model, batch, model_inputs(batch))
        # Summed, not averaged: each caption token weighs the same whatever the batch composition.
        loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        loss.backward()

    constraints, disabled = search_constraints(spec)

    formats_cfg = [f.modelopt_config for f in spec.formats]
    n_steps = len(batches)
    # ModelOpt calibrates each format on every batch; the gradient method scores all formats in one
    # pass per batch (kl_div runs a pass per group and format: no total known in advance).
    method = spec.method
    clock.expected.update(calibrate=n_steps * len(formats_cfg), **({"score": n_steps} if method == "gradient" else {}))
    try:
        with gradient_checkpointing(model, spec.gradient_checkpointing):
            model, search_state = mtq.auto_quantize(
                model,
                constraints=constraints,
                quantization_formats=formats_cfg,
                data_loader=batches,
                forward_step=forward_step,
                forward_backward_step=forward_backward_step if method == "gradient" else None,
                disabled_layers=disabled,
                num_calib_steps=n_steps,
                num_score_steps=n_steps,
                method=method,
                verbose=False,
            )
    except torch.cuda.OutOfMemoryError as err:
        raise VlmsensError(
            f"CUDA out of memory at batch size {len(batches[0]['input_ids'])}; a retry with a smaller batch may succeed ({err})"
        ) from err
    finally:
        release.detach()
    return model, search_state, constraints, disabled


def save_search_state(search_state: dict[str, Any], path: str | os.PathLike) -> None:
    """A cell's ModelOpt search state, written as ModelOpt writes its search checkpoints, so that
    ``mtq.auto_quantize(..., checkpoint=path)`` resumes from it (and loads it with ``weights_only``)."""
    from modelopt.torch.utils.serialization import safe_save

    safe_save(search_state, path)


def load_search_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ModelOpt search state saved by a cell (a pickle: trusted, our own output; older cells
    wrote it without ModelOpt's sanitising, so it is not loaded with ``weights_only``)."""
    import modelopt.torch.quantization  # noqa: F401  (QuantRecipe objects inside the pickle)
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _restored_search(model, spec: CellSpec, state: dict[str, Any]):
    """search() from a cell's saved state: ModelOpt restores every format's calibration, skips scoring."""
    import tempfile

    import modelopt.torch.quantization as mtq

    calibrated = state.get("quantizer_states") or {}
    missing = [name for recipe, name in _recipe_name_map(spec.formats).items() if name != NO_QUANT and recipe not in calibrated]
    if not state.get("candidate_stats") or missing:
        raise VlmsensError(
            "the cell's search state holds no " + (f"calibration for {missing}" if missing else "scores")
            + " (written by an older vlmsens or an interrupted cell): rerun the cell")

    def no_forward(model, batch):
        raise VlmsensError("ModelOpt asked to calibrate or score again instead of restoring the cell's search state; "
                           "the state does not match this checkpoint or ModelOpt version: rerun the cell")

    constraints, disabled = search_constraints(spec)
    with tempfile.TemporaryDirectory(prefix="vlmsens-search-state-") as folder:
        # a copy: ModelOpt may write to its checkpoint, and the cell's file is a workflow output
        checkpoint = os.path.join(folder, "search_state.pth")
        save_search_state(state, checkpoint)
        try:
            model, search_state = mtq.auto_quantize(
                model,
                constraints=constraints,
                quantization_formats=[f.modelopt_config for f in spec.formats],
                data_loader=[],
                forward_step=no_forward,
                forward_backward_step=no_forward if spec.method == "gradient" else None,
                disabled_layers=disabled,
                num_calib_steps=0,
                num_score_steps=0,
                method=spec.method,
                checkpoint=checkpoint,
                verbose=False,
            )
        except ValueError as err:
            if "checkpoint" not in str(err).lower():
                raise
            # ModelOpt checks the state against this search (formats, groups, method, cost model)
            raise VlmsensError(f"the cell's search state does not fit this search ({err}); the checkpoint, the "
                               "formats or the ModelOpt version changed since the cell ran: rerun the cell") from err
    return model, search_state, constraints, disabled


def recipes_by_name(formats: list[FormatSpec]) -> dict[str, Any]:
    """Format name (and 'bf16') -> the QuantRecipe ModelOpt built for it."""
    return {name: recipe for recipe, name in _recipe_name_map(formats).items()}


def run_autoquant(
    spec: CellSpec,
    samples: list[dict],
    *,
    progress: Callable[[str], None] = log.info,
    state_path: str | None = None,
    read_s: float | None = None,
) -> dict[str, Any]:
    """Run AutoQuantize on one cell and return the manifest body (scores, selection, timings).

    ``read_s``: the time the caller spent reading ``samples`` from disk; the timings start with it
    (phase ``read``), so that they hold all of the cell's work and a job's wall less them is its start-up.
    """
    from modelopt.torch.opt.utils import named_hparams
    from modelopt.torch.quantization.algorithms import QuantRecipe, QuantRecipeHparam

    clock = PhaseClock(progress, times={"read": read_s} if read_s is not None else {})
    model, batches, device, dtype, plan = load_cell_model(spec, samples, clock)
    stats = batch_stats(batches)
    n_steps = len(batches)
    clock.enter("calibrate", f"{stats['samples']} samples in {n_steps} batches, {stats['tokens']} tokens")
    model, search_state, constraints, disabled = search(model, spec, batches, clock)
    clock.enter("solve")

    mapping = _recipe_name_map(spec.formats)
    best = search_state["best"]
    hparams = {name: hp for name, hp in named_hparams(model, unique=True) if isinstance(hp, QuantRecipeHparam)}
    no_quant = QuantRecipe(quant_cfg=None)
    groups = []
    excluded = []
    for name, stat in search_state["candidate_stats"].items():
        hparam = hparams[name]
        layer = name.removesuffix(".quant_recipe")
        modules = list(stat["module_names"])
        searched = [r for r in stat["formats"] if r != no_quant]
        if not searched:
            # outside the search and the budget; its BF16 weight cost (cost weight 1) sizes it in the JSON
            excluded.append({"layer": layer, "modules": modules, "tower": tower_of(layer, spec.family.vision_patterns),
                             "block": block_index(modules[0]),
                             "sublayer": sublayer_of(layer, modules, spec.family.sublayer_rules),
                             "weight_cost": float(hparam.get_cost(no_quant, cost_weight=1.0))})
            continue
        raw = {_name_of(r, mapping): float(hparam.get_score(r)) for r in searched}
        per_token = {k: v / max(stats["loss_tokens"], 1) for k, v in raw.items()}
        clipped = {_name_of(r, mapping): float(s) for r, s in zip(stat["formats"], stat["scores"], strict=True) if r != no_quant}
        costs = {_name_of(r, mapping): float(c) for r, c in zip(stat["formats"], stat["costs"], strict=True)}
        selected = _name_of(best["recipe"][name], mapping)
        groups.append(
            {
                "layer": layer,
                "modules": modules,
                "tower": tower_of(modules[0], spec.family.vision_patterns),
                "block": block_index(modules[0]),
                "sublayer": sublayer_of(layer, modules, spec.family.sublayer_rules),
                "scores_raw": raw,
                "scores_per_token": per_token,
                "scores_modelopt_clipped": clipped,
                "costs": costs,
                "uncompressed_cost": float(stat.get("uncompressed_cost", costs.get(NO_QUANT, 0.0))),
                "cost_weight": float(stat.get("cost_weight", 1.0)),
                "selected_format": selected,
            }
        )
    if state_path is not None:
        save_search_state(search_state, state_path)
        handoff.offer(model)  # for the cell's validation, where this process may run it next
    peak = _peak_memory(device)
    timings = clock.stop()
    return {
        "device": _device_info(device),
        "dtype": str(dtype).removeprefix("torch."),
        "vision_attention": model.config.vision_config._attn_implementation,
        "kernels": model.vlmsens_kernels,
        "batches": stats,
        "batch_plan": plan,
        "search": {
            "method": spec.method,
            "gradient_checkpointing": spec.gradient_checkpointing,
            "constraints": constraints,
            "disabled_layers": disabled or [],
            "num_calib_steps": n_steps,
            "num_score_steps": n_steps,
            "effective_bits_target": float(spec.effective_bits),
            "effective_bits_achieved": float(best["constraints"].get("effective_bits", math.nan)),
            "score": float(best["score"]),
            "is_satisfied": bool(best["is_satisfied"]),
            "state_keys": sorted(str(k) for k in search_state),
        },
        "groups": groups,
        "excluded_groups": excluded,
        "timings_s": timings,
        "peak_memory": peak,
    }


def _peak_memory(device: str) -> dict[str, float]:
    import resource

    out = {"host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.startswith("cuda"):
        import torch

        out["gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return out


def _device_info(device: str) -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {"device": device, "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(name=props.name, total_memory_gib=round(props.total_memory / 2**30, 2), cuda=torch.version.cuda,
                    uuid=f"GPU-{props.uuid}" if getattr(props, "uuid", None) else None,
                    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    else:
        info["name"] = cpu_name()
    return info
