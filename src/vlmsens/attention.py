"""One attention call per layer for the Qwen-VL vision towers (windowed / per-image attention).

With ``sdpa``, transformers' Qwen-VL vision attention splits the packed patch sequence at every
window or image boundary and calls attention once per piece: for a batch of four COCO images that
is thousands of tiny kernels per forward, and a cell becomes CPU-bound. When the implementation's
name contains "flash", the same module passes the boundaries (``cu_seqlens``) to a single call
instead. This registers such an implementation, built on PyTorch's own SDPA: the pieces are
gathered into a padded batch (windows are at most 64 patches, so padding is small), attended
with a key-padding mask in one call, and scattered back. It computes the same function as the
per-piece loop (checked in tests) on CPU and GPU, without any extra package.

On CUDA, where PyTorch ships ``torch.nn.attention.varlen.varlen_attn`` (Flash Attention over
packed sequences), the pieces are attended in place instead: no gather, no padding, no mask. The
longest piece comes from transformers (``max_length_q``, computed once per forward), so no layer
waits on the GPU to read it.
"""

from __future__ import annotations

import torch

NAME = "vlmsens_flash_varlen_sdpa"


def _flash_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # PyTorch without it: the padded SDPA path serves
        return None
    return varlen_attn


def _layout(cu_seqlens: torch.Tensor, total: int, max_len: int | None = None):
    """(positions [N, L], valid [N, L]) that gather a packed sequence into N padded pieces."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    max_len = int(lengths.max()) if max_len is None else int(max_len)
    offsets = torch.arange(max_len, device=cu_seqlens.device)
    valid = offsets[None, :] < lengths[:, None]
    positions = (cu_seqlens[:-1, None] + offsets[None, :]).clamp(max=total - 1)
    return positions, valid


def varlen_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
):
    """Attention over the pieces of a packed sequence ``[1, heads, total, dim]`` in one SDPA call."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        # Not a packed vision call: behave like transformers' sdpa.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        raise ValueError("varlen SDPA needs identical query and key boundaries")
    total = query.shape[2]
    varlen_attn = _flash_varlen() if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) else None
    if varlen_attn is not None and max_length_q is not None and not (dropout and module.training):
        cu = cu_seq_lens_q.to(torch.int32)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [total, H, D]
        out = varlen_attn(q, k, v, cu, cu, int(max_length_q), int(max_length_q), scale=scaling)
        return out.unsqueeze(0), None
    positions, valid = _layout(cu_seq_lens_q.to(torch.long), total, max_length_q)

    def pieces(t: torch.Tensor) -> torch.Tensor:  # [1, H, S, D] -> [N, H, L, D]
        return t[0][:, positions].permute(1, 0, 2, 3)

    key_mask = valid[:, None, None, :]  # [N, 1, 1, L]: True where the key exists
    out = torch.nn.functional.scaled_dot_product_attention(
        pieces(query), pieces(key), pieces(value), attn_mask=key_mask, dropout_p=dropout if module.training else 0.0, scale=scaling
    )
    out = out.permute(0, 2, 1, 3)[valid]  # [total, H, D], pieces in order
    return out.unsqueeze(0), None


def register() -> str:
    """Register the implementation with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_sdpa_forward)
    return NAME


def use_for_vision(model) -> bool:
    """Switch a loaded Qwen-VL model's vision tower to varlen SDPA; False when it has none.

    Set on the vision config after loading: transformers' loader treats any name containing
    "flash" as a flash-attn kernel to import, which this is not.
    """
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None or vision_config._attn_implementation != "sdpa":
        return False
    vision_config._attn_implementation = register()
    return True
