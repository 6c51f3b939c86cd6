"""The BF16 vision tower's output per batch, computed once and reused while the tower stays BF16.

Validation measures dozens of configurations on the same held-out batches. Every configuration
that quantizes no vision group (all of them in an lm-only cell, most ablations of an all-layers
cell) feeds the text tower the same image features, so they are computed on the first such
forward and handed to the model through transformers' ``mm_encoder_outputs`` argument after that.
An lm-only search does the same: its vision tower is neither quantized nor scored, so each
batch's features are made once, without gradient, for every calibration and score pass.
The vision tower is about 40 % of a Qwen-VL forward on COCO-sized images (docs/DESIGN.md, "Speed").
Where the tower must run again (a configuration quantizes part of it), it runs with each batch's
geometry made once (``vlmsens.vision_geometry``).
"""

from __future__ import annotations

import inspect
from typing import Any

from .vision_geometry import BatchGeometry


class VisionFeatures:
    """Image features of each batch (by a key the caller keeps per batch), as the unquantized tower makes them.

    They are made without gradient (not in inference mode), so a search's backward pass may use
    them: the text tower's gradients stop at them.
    """

    def __init__(self, model):
        inner = getattr(model, "model", None)
        self.inner = inner
        self.supported = (inner is not None and hasattr(inner, "get_image_features")
                          and "mm_encoder_outputs" in inspect.signature(inner.forward).parameters)
        self._features: dict[int, Any] = {}
        self.geometry = BatchGeometry(model)

    def inputs(self, index: Any, batch: dict, reuse: bool = True) -> dict:
        """The model inputs of batch ``index`` with image features in place of its pixels: the cached
        BF16 ones, or (``reuse=False``) made now by the tower as it is (quantized groups included)."""
        import torch

        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not self.supported or "pixel_values" not in inputs:
            return inputs
        pixels = inputs.pop("pixel_values")
        if not reuse:
            inputs["mm_encoder_outputs"] = {"image": self._made_now(index, pixels, inputs["image_grid_thw"])}
            return inputs
        if index not in self._features:
            with torch.no_grad():
                self._features[index] = self._made_now(index, pixels, inputs["image_grid_thw"])
        inputs["mm_encoder_outputs"] = {"image": self._features[index]}
        return inputs

    def _made_now(self, index: Any, pixels, grid_thw):
        return self.inner.get_image_features(pixels, grid_thw, return_dict=True, **self.geometry.of(index, grid_thw))

    def __len__(self) -> int:
        return len(self._features)
