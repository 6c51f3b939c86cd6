"""Planted sensitivity: make chosen layers fragile or robust without changing the model's function.

A fragile layer gets one huge input channel (an outlier), made by scaling one channel up in the
producer and the matching input column down in the consumer, so the float model computes the same
function. Under INT8 per-tensor activation quantization the outlier sets the scale and every other
channel of that input collapses to a few levels: the consumer becomes the most INT8-sensitive
layer. FP8's exponent keeps the small channels, so the plant is INT8-specific by construction.

A robust layer has its weight scaled down (its output barely matters), so its quantization error
and gradient score shrink.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Plant:
    kind: str  # "text_mlp_outlier", "vision_attn_outlier" or "robust"
    layer: str  # the module that becomes fragile (or robust)


def _get(model, name: str):
    return model.get_submodule(name)


def _move_scale(producer, row: int, consumer, column: int, scale: float) -> None:
    """Producer output ``row`` × scale, consumer input ``column`` ÷ scale (a linear path in between)."""
    producer.weight[row] *= scale
    if producer.bias is not None:
        producer.bias[row] *= scale
    consumer.weight[:, column] /= scale


@torch.no_grad()
def plant_mlp_outlier(model, mlp_path: str, channel: int = 0, scale: float = 1000.0) -> Plant:
    """SwiGLU MLP (gate/up/down): up row ``channel`` × scale, down column ``channel`` ÷ scale.

    ``act(gate) * up`` is linear in ``up``, so the MLP output is unchanged while ``down_proj``'s
    input channel ``channel`` becomes ``scale`` times larger than the rest.
    """
    _move_scale(_get(model, f"{mlp_path}.up_proj"), channel, _get(model, f"{mlp_path}.down_proj"), channel, scale)
    return Plant("text_mlp_outlier", f"{mlp_path}.down_proj")


@torch.no_grad()
def plant_vision_attn_outlier(model, attn_path: str, channel: int = 0, scale: float = 1000.0) -> Plant:
    """Vision attention with fused qkv: V channel × scale, proj input column ÷ scale.

    The attention output is linear in V, so ``proj``'s input channel ``channel`` carries the
    outlier and the block computes the same function.
    """
    proj = _get(model, f"{attn_path}.proj")
    v_row = 2 * proj.weight.shape[1] + channel  # qkv rows are [q; k; v]
    _move_scale(_get(model, f"{attn_path}.qkv"), v_row, proj, channel, scale)
    return Plant("vision_attn_outlier", f"{attn_path}.proj")


@torch.no_grad()
def plant_robust(model, linear_path: str, factor: float = 1e-3) -> Plant:
    """Shrink a layer's weight so that its output (and any error on it) barely matters."""
    layer = _get(model, linear_path)
    layer.weight *= factor
    if layer.bias is not None:
        layer.bias *= factor
    return Plant("robust", linear_path)
