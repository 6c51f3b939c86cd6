"""Calibration samples as model inputs: chat-formatted, caption-only labels, dynamic padding.

One image+caption sample is a user turn (the image plus a short instruction) and an assistant
turn (the caption). Caption-only samples (``calibration.inputs: caption-only``) keep the same turns without the image.
Labels are -100 everywhere except on the caption's own tokens, so the loss, and the gradient
that AutoQuantize scores with, comes from the caption alone.

Samples are preprocessed once per (model, scope, size) and stored unpadded; a cell pads them into
batches at its own batch size, so a smaller batch on a retry needs no new preprocessing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .calib import CalibSample
from .errors import VlmsensError
from .families import MemoryModel, batch_shape
from .io import atomic_path

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptSettings:
    image_instruction: str
    text_instruction: str
    min_pixels: int
    max_pixels: int


def _messages(caption: str | None, with_image: bool, settings: PromptSettings) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if with_image:
        content.append({"type": "image"})
    content.append({"type": "text", "text": settings.image_instruction if with_image else settings.text_instruction})
    messages = [{"role": "user", "content": content}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return messages


def load_image(path: Path, processor, settings: PromptSettings):
    """The image as Qwen's inference code prepares it: ``qwen_vl_utils.fetch_image`` with the
    configured pixel bounds and the checkpoint's patch size (14 for Qwen2.5-VL, 16 for Qwen3-VL),
    i.e. RGB, resized so both sides are multiples of patch size × spatial merge."""
    from qwen_vl_utils import fetch_image

    element = {"image": str(path), "min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}
    try:
        return fetch_image(element, image_patch_size=processor.image_processor.patch_size)
    except Exception as err:
        raise VlmsensError(f"cannot read calibration image {path}: {err}") from None


def encode_sample(processor, sample: CalibSample, coco_root: Path | None, with_image: bool, settings: PromptSettings) -> dict:
    """Token ids, caption-only labels and (for image samples) pixel inputs of one sample."""
    import torch

    prompt = processor.apply_chat_template(_messages(None, with_image, settings), tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(_messages(sample.caption, with_image, settings), tokenize=False)
    if not full.startswith(prompt):
        raise VlmsensError(
            "the checkpoint's chat template does not render the assistant turn after the generation prompt; "
            "caption tokens cannot be located for label masking"
        )
    caption_start = full.index(sample.caption, len(prompt))
    caption_text = full[: caption_start + len(sample.caption)]
    kwargs: dict[str, Any] = {"return_tensors": "pt"}
    if with_image:
        # Resized by Qwen's own code, so the image tokens are those of Qwen's inference; the processor
        # then only normalises and patches it.
        kwargs.update(images=[load_image(Path(coco_root) / sample.image_relpath, processor, settings)], do_resize=False)
    enc_full = processor(text=[full], **kwargs)
    ids = enc_full["input_ids"][0]
    n_prompt = processor(text=[full[:caption_start]], **kwargs)["input_ids"].shape[1]
    caption_ids = processor(text=[caption_text], **kwargs)["input_ids"][0]
    n_caption_end = caption_ids.shape[0]
    if not torch.equal(caption_ids, ids[:n_caption_end]):
        raise VlmsensError("tokenisation of the caption depends on what follows it; cannot mask labels safely")
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[n_prompt:n_caption_end] = ids[n_prompt:n_caption_end]
    if int((labels != IGNORE_INDEX).sum()) == 0:
        raise VlmsensError(f"caption of image {sample.image_relpath} produced no tokens")
    encoded = {"input_ids": ids, "labels": labels}
    if "mm_token_type_ids" in enc_full:
        encoded["mm_token_type_ids"] = enc_full["mm_token_type_ids"][0]
    if with_image:
        encoded["pixel_values"] = enc_full["pixel_values"]
        encoded["image_grid_thw"] = enc_full["image_grid_thw"]
    return encoded


def encode_samples(processor, samples: list[CalibSample], coco_root, with_image: bool, settings: PromptSettings, progress=None) -> list[dict]:
    encoded = []
    for i, sample in enumerate(samples):
        encoded.append(encode_sample(processor, sample, coco_root, with_image, settings))
        if progress and ((i + 1) % max(1, len(samples) // 4) == 0 or i + 1 == len(samples)):
            progress(f"preprocessed {i + 1}/{len(samples)} samples")
    return encoded


def collate(samples: list[dict], pad_token_id: int) -> dict:
    """Right-pad one batch to its own longest sample (no fixed max length)."""
    import torch

    length = max(s["input_ids"].shape[0] for s in samples)
    n = len(samples)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    has_mm = "mm_token_type_ids" in samples[0]
    mm = torch.zeros((n, length), dtype=torch.long) if has_mm else None
    for i, s in enumerate(samples):
        k = s["input_ids"].shape[0]
        input_ids[i, :k] = s["input_ids"]
        labels[i, :k] = s["labels"]
        attention_mask[i, :k] = 1
        if has_mm:
            mm[i, :k] = s["mm_token_type_ids"]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if has_mm:
        batch["mm_token_type_ids"] = mm
    if "pixel_values" in samples[0]:
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples])
    return batch


def length_buckets(samples: list[dict], batch_size: int) -> list[list[dict]]:
    """The samples in batches of similar length (stable sort by length): how every cell batches them."""
    if batch_size <= 0:
        raise VlmsensError(f"batch size must be positive, got {batch_size}")
    ordered = sorted(samples, key=lambda s: s["input_ids"].shape[0])
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


def make_batches(samples: list[dict], batch_size: int, pad_token_id: int) -> list[dict]:
    """Batches of similar length, so padding stays small; deterministic."""
    return [collate(bucket, pad_token_id) for bucket in length_buckets(samples, batch_size)]


def largest_batch_shape(samples: list[dict], batch_size: int) -> dict[str, int]:
    """Padded tokens and patches of the batch with the most of both (what the memory model is fitted on)."""
    shapes = [batch_shape(bucket) for bucket in length_buckets(samples, batch_size)]
    return max(shapes, key=lambda d: (d["padded_tokens"] + d["patches"], d["patches"]))


def plan_batch_size(samples: list[dict], model: MemoryModel, budget_bytes: float, max_batch: int | None = None) -> tuple[int, float]:
    """The largest batch size whose every batch (as ``make_batches`` forms them) fits ``budget_bytes``
    of activation memory; returns it with the predicted bytes of its largest batch. At least 1."""
    if not samples:
        raise VlmsensError("no samples to plan batches for")

    def largest(batch: int) -> float:
        return max(model.batch_bytes(bucket) for bucket in length_buckets(samples, batch))

    best, best_bytes = 1, largest(1)
    for batch in range(2, min(len(samples), max_batch or len(samples)) + 1):
        need = largest(batch)
        if need <= budget_bytes:
            best, best_bytes = batch, need
    return best, best_bytes


def batch_stats(batches: list[dict]) -> dict[str, int | float]:
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(int(b["attention_mask"].numel()) for b in batches)
    return {
        "batches": len(batches),
        "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "tokens": tokens,
        "loss_tokens": sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
        "padding_fraction": round(1 - tokens / slots, 6) if slots else 0.0,
        "image_patches_per_sample_max": max(
            (int(b["image_grid_thw"].prod(-1).max()) if "image_grid_thw" in b else 0) for b in batches
        ),
    }


def save_samples(path: str | Path, samples: list[dict], meta: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save({"meta": meta, "samples": samples}, tmp)


def load_samples(path: str | Path) -> tuple[list[dict], dict]:
    import torch

    payload = torch.load(path, weights_only=True)
    return payload["samples"], payload["meta"]


def load_samples_meta(path: str | Path) -> dict:
    """A samples file's meta alone: its tensors are memory-mapped, never read (GBs at the large size)."""
    import torch

    return torch.load(path, weights_only=True, mmap=True)["meta"]
