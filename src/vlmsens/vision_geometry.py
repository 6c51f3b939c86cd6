"""A batch's vision-tower geometry (patch positions, attention boundaries, window order), made once per batch.

On every forward, transformers derives these from ``image_grid_thw`` in Python loops over the
images, with host synchronisations (``.tolist()``, ``.item()``) between GPU work: the GPU idles while
the host walks the batch's images. ``transformers.vision_utils`` exists so that they can be
precomputed: each of its ``get_*`` functions returns the value given as a keyword argument instead
of computing it. Validation measures some 60 configurations on the same held-out batches, so each
batch's geometry is made here once, by those same functions, and handed to the vision tower with
every forward after that.

Families whose vision tower this does not know (or a transformers without ``vision_utils``) get
``None``: the tower computes its geometry itself, as shipped.
"""

from __future__ import annotations

from typing import Any


def _vision_utils():
    try:
        from transformers import vision_utils
    except ImportError:
        return None
    return vision_utils


def _reads_precomputed(visual) -> bool:
    """Whether this vision tower's forward takes its geometry from keyword arguments (transformers ≥ 5.2x)."""
    import inspect

    try:
        source = inspect.getsource(type(visual).forward)
    except (OSError, TypeError):
        return False
    return "get_vision_position_ids" in source and "kwargs=kwargs" in source


def geometry(visual, grid_thw) -> dict[str, Any] | None:
    """The keyword arguments that carry ``grid_thw``'s geometry into ``visual``'s forward, or None.

    The same ``transformers.vision_utils`` calls, with the same arguments, as the tower's forward makes.
    """
    import torch
    from transformers.utils.generic import get_max_seqlen

    utils = _vision_utils()
    if utils is None or grid_thw is None or not _reads_precomputed(visual):
        return None
    config = visual.config
    with torch.no_grad():  # constants, usable in gradient passes too (not inference tensors)
        out: dict[str, Any] = {"position_ids": utils.get_vision_position_ids(grid_thw, visual.spatial_merge_size)}
        cu_seqlens = utils.get_vision_cu_seqlens(grid_thw)
        out["cu_seqlens"] = cu_seqlens
        out["max_seqlen"] = get_max_seqlen(cu_seqlens, config)
        if hasattr(visual, "window_size"):  # Qwen2.5-VL: windowed attention in most blocks
            window_index, cu_window_seqlens = utils.get_vision_window_index(
                grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size)
            out.update(window_index=window_index.to(grid_thw.device), cu_window_seqlens=cu_window_seqlens,
                       max_window_seqlen=get_max_seqlen(cu_window_seqlens, config))
        if hasattr(visual, "num_grid_per_side"):  # Qwen3-VL: interpolated learned position embeddings
            indices, weights = utils.get_vision_interpolation_indices_and_weights(
                grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=config.spatial_merge_size)
            out.update(interp_indices=indices, interp_weights=weights)
    return {k: v for k, v in out.items() if v is not None}


def vision_tower(model):
    """The model's vision tower (``model.model.visual`` in both families), or None."""
    return getattr(getattr(model, "model", None), "visual", None)


class BatchGeometry:
    """Each batch's geometry (by a key the caller keeps per batch), made on its first use."""

    def __init__(self, model):
        self.visual = vision_tower(model)
        self._made: dict[Any, dict[str, Any] | None] = {}

    def of(self, key: Any, grid_thw) -> dict[str, Any]:
        """Keyword arguments for the vision tower (empty where it makes its own geometry)."""
        if self.visual is None:
            return {}
        if key not in self._made:
            self._made[key] = geometry(self.visual, grid_thw)
        return dict(self._made[key] or {})
