"""The BF16 vision tower's output per batch, computed once and reused while the tower stays BF16.

Validation measures dozens of configurations on the same held-out batches. Every configuration
that quantizes no vision group (all of them in an lm-only cell, most ablations of an all-layers
cell) feeds the text tower the same image features, so they are computed on the first such
forward and handed to the model through transformers' ``mm_encoder_outputs`` argument after that.
An lm-only search does the same: its vision tower is neither quantized nor scored, so each
batch's features are made once, without gradient, for every calibration and score pass.
The vision tower is about 40 % of a Qwen-VL forward on COCO-sized images (docs/DESIGN.md, "Speed").
Where the tower must run again (a configuration quantizes part of it), it runs with each batch's
geometry made once (``vlmsens.vision_geometry``), and its blocks before the first quantized one hand
back what they computed in the BF16 reference (:class:`VisionBlockReuse`, ``vlmsens.prefix_reuse``):
an ablated vision group in block b spares the b blocks before it.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

from .prefix_reuse import LayerPrefixReuse
from .vision_geometry import BatchGeometry, vision_tower

# The vision tower's modules that run after its blocks, on their outputs (Qwen2.5-VL's and Qwen3-VL's
# patch mergers, Qwen3-VL's deepstack mergers): quantizing them changes no block's output.
AFTER_BLOCKS = ("merger", "deepstack_merger_list")


class VisionBlockReuse(LayerPrefixReuse):
    """The vision tower's blocks as a :class:`LayerPrefixReuse` (the deepstack blocks tapped), and
    where a configuration's changes to them start."""

    def __init__(self, model, device_budget_bytes: float | None = None):
        import torch

        visual = vision_tower(model)
        blocks = getattr(visual, "blocks", None)
        self.name = next((name for name, module in model.named_modules() if module is visual), "") if visual is not None else ""
        super().__init__(blocks if isinstance(blocks, torch.nn.ModuleList) else None, device_budget_bytes,
                         taps=getattr(visual, "deepstack_visual_indexes", None) or ())

    def start_block(self, quantized_modules) -> int:
        """The first block whose output a configuration quantizing these modules (groups' names count too) changes.

        Modules outside the tower, and its mergers, change none (every block when only they are
        quantized); any other module of the tower outside its blocks (the patch embedding) changes all.
        """
        start = self.n_layers
        prefix = f"{self.name}."
        for name in quantized_modules:
            if not self.name or not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split(".")
            if parts[0] in AFTER_BLOCKS:
                continue
            if parts[0] != "blocks" or len(parts) < 2 or not parts[1].isdigit():
                return 0
            start = min(start, int(parts[1]))
        return start


class VisionFeatures:
    """Image features of each batch (by a key the caller keeps per batch), as the unquantized tower makes them.

    They are made without gradient (not in inference mode), so a search's backward pass may use
    them: the text tower's gradients stop at them.
    """

    def __init__(self, model, device_budget_bytes: float | None = None):
        inner = getattr(model, "model", None)
        self.inner = inner
        self.supported = (inner is not None and hasattr(inner, "get_image_features")
                          and "mm_encoder_outputs" in inspect.signature(inner.forward).parameters)
        self._features: dict[int, Any] = {}
        self.geometry = BatchGeometry(model)
        self.blocks = VisionBlockReuse(model, device_budget_bytes)
        self.record_blocks = False
        self.block_forwards = self.block_forwards_skipped = 0

    def inputs(self, index: Any, batch: dict, reuse: bool = True, *, start_block: int = 0) -> dict:
        """The model inputs of batch ``index`` with image features in place of its pixels: the cached
        BF16 ones, or (``reuse=False``) made now by the tower as it is (quantized groups included).

        While ``record_blocks`` is set, making a batch's BF16 features records every block's output
        too (:class:`VisionBlockReuse`). ``start_block``: the caller's promise that the configuration
        quantizes nothing in the tower before that block (:meth:`VisionBlockReuse.start_block`); a
        tower made now then skips the blocks before it where they were recorded. ``block_forwards``
        and ``block_forwards_skipped`` count, over the towers made now, their block forwards and those skipped.
        """
        import torch

        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not self.supported or "pixel_values" not in inputs:
            return inputs
        pixels = inputs.pop("pixel_values")
        if not reuse:
            with self.blocks.skipping(index, start_block) as skipped:
                features = self._made_now(index, pixels, inputs["image_grid_thw"])
            self.block_forwards += self.blocks.n_layers
            self.block_forwards_skipped += skipped
            inputs["mm_encoder_outputs"] = {"image": features}
            return inputs
        if index not in self._features:
            recording = self.blocks.recording(index) if self.record_blocks else contextlib.nullcontext()
            with torch.no_grad(), recording:
                self._features[index] = self._made_now(index, pixels, inputs["image_grid_thw"])
        inputs["mm_encoder_outputs"] = {"image": self._features[index]}
        return inputs

    def _made_now(self, index: Any, pixels, grid_thw):
        return self.inner.get_image_features(pixels, grid_thw, return_dict=True, **self.geometry.of(index, grid_thw))

    def __len__(self) -> int:
        return len(self._features)
