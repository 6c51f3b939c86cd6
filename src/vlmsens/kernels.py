"""Fused kernels for the Qwen-VL towers' elementwise work (Liger Kernel's Triton kernels), on CUDA.

transformers runs a Qwen-VL layer's elementwise work in eager PyTorch, one kernel per operation:
RMSNorm upcasts to fp32, squares, averages, scales and casts back; the rotary embeddings (the
vision tower's in fp32) rotate halves, multiply and add; SwiGLU applies SiLU, then multiplies.
On COCO-sized images (about 1,000 patches and 300 tokens a sample) these passes over the
activations take as much GPU time as the layers' matrix products (docs/DESIGN.md, "Speed").
Liger Kernel, the library the Hugging Face community trains these models with, fuses each into
one Triton kernel with the same math (RMSNorm in fp32 cast back before the weight, as Llama and
Qwen do); `fuse` points a loaded model at them:

* every ``*RMSNorm`` module (text and vision norms, the merger's, Qwen3's per-head q/k norms);
* every gated MLP whose activation is SiLU (``gate_proj``/``up_proj``/``down_proj``): SiLU and
  the product fused, the three projections untouched (ModelOpt quantizes and scores them);
* the family's ``apply_rotary_pos_emb`` and ``apply_rotary_pos_emb_vision``, which transformers'
  attention modules call by module-level name, so they are replaced in the modeling module, for
  tensors on the kernels' device only (a CPU model in the same process keeps transformers' code).

LayerNorm (Qwen3-VL's vision tower) is already one kernel in PyTorch. The kernels are chosen per
model by ``autoquant.kernels`` and recorded in the manifest; on CPU every model runs as shipped.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

from .errors import VlmsensError

CHOICES = ("liger", "eager")


@dataclass(frozen=True)
class Kernels:
    """The fused operations, each with transformers' signature and math, for tensors on ``device_type``."""

    name: str
    device_type: str
    rms_norm: Callable  # (hidden, weight, eps) -> weight * normalised hidden, in hidden's dtype
    silu_mul: Callable  # (gate, up) -> silu(gate) * up
    rope: Callable  # (q, k, cos, sin, unsqueeze_dim=1) -> (q, k), as transformers' apply_rotary_pos_emb
    rope_vision: Callable  # (q, k, cos, sin) -> (q, k), as apply_rotary_pos_emb_vision


def liger() -> Kernels:
    """Liger Kernel's fused RMSNorm, SiLU-and-multiply and rotary embeddings (CUDA, Triton)."""
    from liger_kernel.transformers.functional import liger_rms_norm, liger_rope, liger_swiglu

    def rms_norm(hidden, weight, eps):
        return liger_rms_norm(hidden, weight, eps, casting_mode="llama", in_place=False)

    def rope(q, k, cos, sin, unsqueeze_dim=1):
        return liger_rope(q, k, cos, sin, None, unsqueeze_dim)

    return Kernels("liger", "cuda", rms_norm, liger_swiglu, rope, vision_rope(rope))


def vision_rope(rope: Callable) -> Callable:
    """``apply_rotary_pos_emb_vision`` from a rotary function with the text layout of ``apply_rotary_pos_emb``.

    The vision tower's q and k are ``[patches, heads, dim]`` with cos and sin ``[patches, dim]``;
    they are rotated as one batch of ``[1, heads, patches, dim]``, in fp32 as transformers does it
    (Liger's own Qwen3-VL wrapper does the same, through its backend dispatch).
    """
    import torch

    def apply(q, k, cos, sin):
        q32, k32 = (t.to(torch.float32).unsqueeze(0).transpose(1, 2) for t in (q, k))
        q_out, k_out = rope(q32, k32, cos.to(torch.float32)[None], sin.to(torch.float32)[None])
        return q_out.transpose(1, 2).squeeze(0).to(q.dtype), k_out.transpose(1, 2).squeeze(0).to(k.dtype)

    return apply


# The modeling modules' own functions, kept before the first replacement so the dispatchers can
# fall back to them (and `restore` can put them back).
_SHIPPED: dict[tuple[str, str], Callable] = {}
_ACTIVE: dict[str, Kernels] = {}
ROPE_FUNCTIONS = {"apply_rotary_pos_emb": "rope", "apply_rotary_pos_emb_vision": "rope_vision"}


def _dispatcher(module_name: str, function: str) -> Callable:
    shipped = _SHIPPED[(module_name, function)]
    operation = ROPE_FUNCTIONS[function]

    def apply(q, k, cos, sin, *args, **kwargs):
        kernels = _ACTIVE.get(q.device.type)
        if kernels is None:
            return shipped(q, k, cos, sin, *args, **kwargs)
        return getattr(kernels, operation)(q, k, cos, sin, *args, **kwargs)

    apply.vlmsens_fused = True
    apply.__wrapped__ = shipped
    return apply


def _rms_norm_forward(kernels: Kernels):
    def forward(self, hidden_states):
        return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return forward


def _silu_mul_forward(kernels: Kernels):
    def forward(self, x):
        return self.down_proj(kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))
    return forward


def _is_rms_norm(module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight")


def _is_silu_gated_mlp(module) -> bool:
    act = type(getattr(module, "act_fn", None)).__name__
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) and act in ("SiLU", "SiLUActivation")


def fuse(model, kernels: Kernels) -> dict[str, int]:
    """Point ``model``'s norms, gated MLPs and rotary embeddings at ``kernels``; returns what was replaced.

    The module instances are changed (their forward), not their classes; the rotary functions are
    replaced in the model's modeling module by dispatchers that use ``kernels`` for tensors on its
    device type and transformers' own function otherwise.
    """
    counts = {"rms_norm": 0, "silu_mul": 0, "rope": 0, "rope_vision": 0}
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward(kernels), module)
            counts["rms_norm"] += 1
        elif _is_silu_gated_mlp(module):
            module.forward = types.MethodType(_silu_mul_forward(kernels), module)
            counts["silu_mul"] += 1
    modeling = sys.modules[type(model).__module__]
    for function, operation in ROPE_FUNCTIONS.items():
        current = getattr(modeling, function, None)
        if current is None:
            continue
        if not getattr(current, "vlmsens_fused", False):
            _SHIPPED[(modeling.__name__, function)] = current
            setattr(modeling, function, _dispatcher(modeling.__name__, function))
        counts[operation] = sum(type(m).__module__ == modeling.__name__ and "Attention" in type(m).__name__
                                and _calls(m, function) for m in model.modules())
    _ACTIVE[kernels.device_type] = kernels
    return counts


def _calls(module, function: str) -> bool:
    """Whether ``module``'s forward calls ``function`` by name (transformers' attention modules do)."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)  # under transformers' decorators
    return code is not None and function in code.co_names


def restore(device_type: str | None = None) -> None:
    """Stop using fused kernels for ``device_type`` (all when None); models built later run as shipped.

    Modules already fused keep their kernels; the rotary dispatchers fall back to transformers' code.
    """
    if device_type is None:
        _ACTIVE.clear()
        for (module_name, function), shipped in _SHIPPED.items():
            setattr(sys.modules[module_name], function, shipped)
        _SHIPPED.clear()
    else:
        _ACTIVE.pop(device_type, None)


def check_choice(choice: str) -> None:
    """``autoquant.kernels`` is one of CHOICES (checked before a model is loaded)."""
    if choice not in CHOICES:
        raise VlmsensError(f"autoquant.kernels must be one of {CHOICES}, got {choice!r}")


def use(model, choice: str, device: str) -> dict[str, object]:
    """Apply ``autoquant.kernels``'s choice (see ``check_choice``) to a loaded model on ``device``;
    the manifest's record of it."""
    if choice == "eager" or not device.startswith("cuda"):
        return {"kernels": "eager", "fused": {}}
    try:
        kernels = liger()
    except ImportError as err:
        raise VlmsensError(f"autoquant.kernels is 'liger' but Liger Kernel cannot be imported ({err}): install the project's "
                           "dependencies (liger-kernel, triton), or set autoquant.kernels: eager") from err
    return {"kernels": kernels.name, "fused": fuse(model, kernels)}
