"""Reading an exported checkpoint back as a runtime would: quantized weights times their scales,
activations quantized with the stored input scales.

ModelOpt writes a mixed-precision Hugging Face checkpoint (``modelopt.torch.export``) for vLLM and
TensorRT-LLM; transformers has no loader for its ``quant_method: modelopt`` and skips it, and no
GPU-free runtime serves it. To check an export on any machine, this module builds the model from
the exported folder with transformers and then, from the exported tensors alone, gives every layer
that carries a ``weight_scale`` its dequantized weight and, where it carries an ``input_scale``,
a static per-tensor quantization of its input. Nothing of the quantized model in memory is reused,
so a wrong scale, a layer quantized that the recipe keeps in BF16 or a lost tensor shows up as
damage when the reloaded model is compared with ModelOpt's fake-quantized one.

Weights: FP8 E4M3 (per-tensor scale) and INT8 (per-channel scale); activations: FP8 E4M3 or INT8,
static per tensor, or none (weight-only). These are what ModelOpt exports the built-in 8-bit
formats as (``fp8``, ``int8_sq``, ``int8_wo``); anything else in a folder is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import VlmsensError
from .models import load_model

# ModelOpt's per-layer formats this reader reproduces (modelopt.torch.export.model_config).
READABLE_ALGOS = ("fp8", "int8_sq", "int8_wo")
LAYER_TENSORS = ("weight", "bias", "weight_scale", "input_scale")
FP8_MAX = 448.0
INT8_MAX = 127.0


def exported_tensors(folder: str | Path) -> dict[str, Any]:
    """Every tensor of the folder's safetensors files, by name."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise VlmsensError(f"{folder} holds no .safetensors file: not an exported checkpoint")
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def quantized_layers(tensors: dict[str, Any]) -> list[str]:
    """Names (as exported) of the layers that carry a weight scale, sorted."""
    return sorted(name.removesuffix(".weight_scale") for name in tensors if name.endswith(".weight_scale"))


def layer_format(tensors: dict[str, Any], layer: str) -> str:
    """'fp8', 'int8_sq' or 'int8_wo' from the exported tensors of one layer; anything else is refused."""
    import torch

    extra = sorted(name for name in tensors if name.startswith(f"{layer}.") and name.removeprefix(f"{layer}.") not in LAYER_TENSORS)
    if extra:
        raise VlmsensError(f"exported layer {layer} carries {extra[0]}: a format the export check cannot read "
                           f"(it reads {', '.join(READABLE_ALGOS)})")
    weight = tensors[f"{layer}.weight"]
    has_input = f"{layer}.input_scale" in tensors
    if weight.dtype == torch.float8_e4m3fn:
        return "fp8"
    if weight.dtype == torch.int8:
        return "int8_sq" if has_input else "int8_wo"
    raise VlmsensError(f"exported layer {layer} stores its weight as {weight.dtype}: the export check reads "
                       f"{', '.join(READABLE_ALGOS)} only")


def _fake_quantize_input(scale, kind: str):
    import torch

    def hook(module, args):
        x = args[0]
        s = scale.to(x.device, x.dtype)
        if kind == "fp8":
            q = (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)
        else:
            q = torch.round(x / s).clamp(-INT8_MAX - 1, INT8_MAX)
        return (q * s, *args[1:])

    return hook


def _quietly_loaded(folder: Path, device: str, kernels: str):
    """transformers skips ModelOpt's quantization_config and lists every scale as an unexpected key;
    the scales are read here, so that table is noise in the job's log."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load_model(str(folder), device, kernels=kernels)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_exported(folder: str | Path, device: str, kernels: str = "liger"):
    """The exported checkpoint as a model that computes as its runtime would (see the module doc).

    ``kernels`` as in ``vlmsens.models.load_model`` (the export check uses the cell's, so both models
    compute alike). Returns (model, layer formats by exported name). Parameters are set from the folder's tensors
    by the names ModelOpt wrote them under (its reverse of transformers' load-time renaming).
    """
    import torch
    from modelopt.torch.export.quant_aware_conversion import build_reverse_name_mapper

    folder = Path(folder)
    quant = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    if quant.get("quant_method") != "modelopt":
        raise VlmsensError(f"{folder}/config.json has no ModelOpt quantization_config: not a ModelOpt export")
    tensors = exported_tensors(folder)
    layers = quantized_layers(tensors)
    formats = {layer: layer_format(tensors, layer) for layer in layers}
    model = _quietly_loaded(folder, device, kernels)
    mapper = build_reverse_name_mapper(model) or (lambda name: name)
    found: set[str] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            exported = mapper(name) if name else name
            if not isinstance(module, torch.nn.Linear) or exported not in formats:
                continue
            found.add(exported)
            weight = tensors[f"{exported}.weight"].to(torch.float32)
            scale = tensors[f"{exported}.weight_scale"].to(torch.float32)
            if scale.ndim == 1:
                scale = scale[:, None]
            dtype = module.weight.dtype
            # A new Parameter: a quantized lm_head no longer shares the (BF16) embedding's tensor.
            module.weight = torch.nn.Parameter((weight * scale).to(device, dtype), requires_grad=False)
            if f"{exported}.bias" in tensors:
                module.bias = torch.nn.Parameter(tensors[f"{exported}.bias"].to(device, dtype), requires_grad=False)
            if f"{exported}.input_scale" in tensors:
                kind = "fp8" if formats[exported] == "fp8" else "int8"
                module.register_forward_pre_hook(_fake_quantize_input(tensors[f"{exported}.input_scale"].float(), kind))
        missing = sorted(set(formats) - found)
        if missing:
            raise VlmsensError(f"{len(missing)} quantized layer(s) of {folder} match no Linear of the reloaded model "
                               f"(first: {missing[0]})")
        for name, param in model.named_parameters():
            exported = mapper(name)
            owner = exported.rsplit(".", 1)[0]
            if owner in formats or exported not in tensors:
                continue
            param.data = tensors[exported].to(device, param.dtype)
    return model, formats
