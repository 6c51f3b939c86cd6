"""Named quantization formats: a ModelOpt base config plus optional overrides.

A format in the config is either a single format::

    wint8_aint8: {base: INT8_DEFAULT_CFG, weight: {granularity: per_channel},
                  activation: {mode: static_per_tensor}}

or a candidate set, so that one cell lets the solver choose between several formats::

    fp8_or_int8: {candidates: [wfp8_afp8, wint8_aint8]}

``weight.granularity`` is ``per_channel``, ``per_tensor`` or ``group`` (with ``group_size``);
``activation.mode`` is ``static_per_tensor``, ``dynamic_per_token`` or ``none`` (weight-only).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from .errors import VlmsensError

BUILTIN_FORMATS: dict[str, dict[str, Any]] = {
    "wfp8_afp8": {"base": "FP8_DEFAULT_CFG", "description": "FP8 E4M3 weights (per tensor) and activations (static per tensor)"},
    "wint8_aint8": {"base": "INT8_DEFAULT_CFG", "description": "INT8 weights (per channel) and activations (static per tensor), W8A8"},
    "wint8_afp16": {"base": "INT8_WEIGHT_ONLY_CFG", "description": "INT8 weight-only (per channel)"},
    "wfp8_afp16": {
        "base": "FP8_DEFAULT_CFG",
        "activation": {"mode": "none"},
        "description": "FP8 E4M3 weight-only (per tensor)",
    },
    "wint4_afp16": {"base": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "description": "INT4 weight-only, blockwise (group 128)"},
    "wfp4_afp16": {"base": "W4A16_NVFP4_CFG", "description": "NVFP4 weight-only (block 16, FP8 scales)"},
    "wfp4_afp4": {"base": "NVFP4_DEFAULT_CFG", "description": "NVFP4 weights and activations (block 16, FP8 scales)"},
}


@dataclass(frozen=True)
class FormatSpec:
    name: str
    modelopt_config: dict[str, Any]
    description: str
    base: str


def format_registry(config_formats: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Built-in formats, updated by the config's ``formats`` (which may add or redefine names)."""
    registry = copy.deepcopy(BUILTIN_FORMATS)
    for name, spec in (config_formats or {}).items():
        registry[name] = dict(spec)
    return registry


def _entry(quant_cfg: list[dict], pattern: str) -> dict | None:
    for entry in quant_cfg:
        if entry.get("quantizer_name") == pattern:
            return entry
    return None


def _apply_weight_override(quant_cfg: list[dict], override: dict[str, Any], name: str) -> None:
    entry = _entry(quant_cfg, "*weight_quantizer")
    if entry is None or "cfg" not in entry:
        raise VlmsensError(f"formats.{name}: its base config has no weight quantizer to override")
    cfg = dict(entry["cfg"])
    granularity = override.get("granularity")
    if granularity == "per_channel":
        cfg.pop("block_sizes", None)
        cfg["axis"] = 0
    elif granularity == "per_tensor":
        cfg.pop("block_sizes", None)
        cfg["axis"] = None
    elif granularity == "group":
        group_size = override.get("group_size")
        if not isinstance(group_size, int) or group_size <= 0:
            raise VlmsensError(f"formats.{name}.weight.group_size must be a positive integer for granularity 'group'")
        cfg.pop("axis", None)
        cfg["block_sizes"] = {-1: group_size, "type": "static"}
    elif granularity is not None:
        raise VlmsensError(
            f"formats.{name}.weight.granularity must be per_channel, per_tensor or group, got {granularity!r}"
        )
    entry["cfg"] = cfg


def _apply_activation_override(quant_cfg: list[dict], override: dict[str, Any], name: str) -> None:
    mode = override.get("mode")
    if mode is None:
        return
    entry = _entry(quant_cfg, "*input_quantizer")
    weight = _entry(quant_cfg, "*weight_quantizer") or {}
    num_bits = override.get("num_bits") or ((entry or {}).get("cfg") or {}).get("num_bits") or (weight.get("cfg") or {}).get("num_bits")
    if entry is None:
        entry = {"quantizer_name": "*input_quantizer"}
        quant_cfg.insert(2, entry)
    if mode == "none":
        entry.pop("cfg", None)
        entry["enable"] = False
    elif mode == "static_per_tensor":
        entry.pop("enable", None)
        entry["cfg"] = {"num_bits": num_bits, "axis": None}
    elif mode == "dynamic_per_token":
        entry.pop("enable", None)
        entry["cfg"] = {"num_bits": num_bits, "axis": None, "type": "dynamic", "block_sizes": {-1: None}}
    else:
        raise VlmsensError(
            f"formats.{name}.activation.mode must be static_per_tensor, dynamic_per_token or none, got {mode!r}"
        )


def resolve_single(name: str, registry: dict[str, dict[str, Any]]) -> FormatSpec:
    """The ModelOpt config of one single (non-candidate-set) format."""
    import modelopt.torch.quantization as mtq

    spec = registry.get(name)
    if spec is None:
        raise VlmsensError(f"unknown format {name!r}; known formats: {sorted(registry)} (config key 'formats')")
    if "candidates" in spec:
        raise VlmsensError(f"formats.{name} is a candidate set; it cannot be a candidate itself")
    base = spec.get("base")
    if not isinstance(base, str) or not hasattr(mtq, base) or not base.endswith("_CFG"):
        raise VlmsensError(f"formats.{name}.base {base!r} is not a ModelOpt config name (e.g. INT8_DEFAULT_CFG)")
    config = copy.deepcopy(getattr(mtq, base))
    quant_cfg = config["quant_cfg"]
    if "weight" in spec:
        _apply_weight_override(quant_cfg, spec["weight"], name)
    if "activation" in spec:
        _apply_activation_override(quant_cfg, spec["activation"], name)
    return FormatSpec(name=name, modelopt_config=config, description=spec.get("description", base), base=base)


def resolve_format(name: str, registry: dict[str, dict[str, Any]]) -> list[FormatSpec]:
    """The candidate formats of a cell's format slug (one entry unless it names a candidate set)."""
    spec = registry.get(name)
    if spec is None:
        raise VlmsensError(f"unknown format {name!r}; known formats: {sorted(registry)} (config key 'formats')")
    names = spec["candidates"] if "candidates" in spec else [name]
    if not names:
        raise VlmsensError(f"formats.{name}.candidates is empty")
    return [resolve_single(n, registry) for n in names]


def format_bits(spec: FormatSpec) -> float:
    """Effective bits ModelOpt charges for the format (its weight-cost model)."""
    from modelopt.torch.quantization.algorithms import QuantRecipe

    return QuantRecipe(spec.modelopt_config, name=spec.name).compression * 16


def ranking_format(manifest: dict[str, Any]) -> str:
    """The format whose scores rank a cell's groups, everywhere (tables, plots, recipes' notes, validation).

    A single format's own; for a candidate set the member with the fewest bits (the most aggressive
    choice, whose damage a ranking must predict), ties broken by the order the set lists them in.
    """
    formats = manifest["formats"]
    candidates = manifest["cell"]["candidates"]
    return min(candidates, key=lambda name: (float(formats[name]["bits"]), candidates.index(name)))
