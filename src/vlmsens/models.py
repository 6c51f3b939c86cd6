"""Loading checkpoints the way their users do: AutoProcessor + AutoModelForImageTextToText."""

from __future__ import annotations

import logging

from .errors import VlmsensError
from .kernels import check_choice as check_kernels
from .kernels import use as use_kernels
from .preflight import resolve_checkpoint

log = logging.getLogger(__name__)


def _source(checkpoint: str) -> tuple[str, bool]:
    """(folder or id, local_files_only): the preflight's resolution, so a job never downloads unasked.

    A local folder or a cached hub snapshot loads from disk; an uncached id loads from the hub only
    when HF_HUB_OFFLINE=0 allows downloads (vlmsens.preflight), and fails at once otherwise.
    """

    folder = resolve_checkpoint(checkpoint, "models.<name>.checkpoint")
    return (str(folder), True) if folder is not None else (checkpoint, False)


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise VlmsensError(f"device {requested!r} requested but CUDA is not available")
    return requested


def dtype_for(device: str):
    """bf16 on GPU, fp32 on CPU (bf16 matmuls on CPU are slow and fake-quant kernels expect fp32 there)."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_processor(checkpoint: str):
    import transformers

    source, local_only = _source(checkpoint)
    return transformers.AutoProcessor.from_pretrained(source, local_files_only=local_only, trust_remote_code=False)


def load_model(checkpoint: str, device: str, attn_implementation: str | None = "sdpa", vision_attention: str = "varlen",
               kernels: str = "liger"):
    """The checkpoint's model in eval mode; ``vision_attention='varlen'`` runs each vision layer's
    windows in one SDPA call (see vlmsens.attention) instead of one call per window, and
    ``kernels='liger'`` fuses the norms, SwiGLU and rotary embeddings on CUDA (vlmsens.kernels;
    ``model.vlmsens_kernels`` says what was fused)."""
    import torch
    import transformers

    check_kernels(kernels)
    source, local_only = _source(checkpoint)
    kwargs = dict(local_files_only=local_only, trust_remote_code=False, dtype=dtype_for(device))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device.startswith("cuda"):
        # safetensors shards are materialised straight on the GPU
        kwargs["device_map"] = {"": torch.device(device)}
    model = transformers.AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    if not device.startswith("cuda"):
        model.to(device)
    if vision_attention == "varlen" and attn_implementation == "sdpa":
        from .attention import use_for_vision

        use_for_vision(model)
    elif vision_attention not in ("varlen", "sdpa"):
        raise VlmsensError(f"vision attention must be 'varlen' or 'sdpa', got {vision_attention!r}")
    model.vlmsens_kernels = use_kernels(model, kernels, device)
    model.eval()
    return model
