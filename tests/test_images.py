"""Images become model inputs the way Qwen's inference code makes them (qwen-vl-utils): for each
image, the image tokens of an encoded sample equal what Qwen's own utilities give for it."""

from __future__ import annotations

import pytest
from conftest import FAMILIES, MAX_PIXELS, MIN_PIXELS
from PIL import Image

from vlmsens.batches import PromptSettings, encode_sample, load_image
from vlmsens.calib import CalibSample
from vlmsens.errors import VlmsensError
from vlmsens.models import load_processor

SETTINGS = PromptSettings(image_instruction="Describe this image in one sentence.", text_instruction="Caption it.",
                          min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
# (width, height): the demo's own size, one far above max_pixels, one below min_pixels, a tall one.
SIZES = [(128, 96), (640, 480), (40, 30), (90, 400)]


def qwen_token_count(width: int, height: int, patch_size: int) -> int:
    """Image tokens of one image by Qwen's utilities alone: smart_resize, then one token per merged patch."""
    from qwen_vl_utils.vision_process import SPATIAL_MERGE_SIZE, smart_resize

    factor = patch_size * SPATIAL_MERGE_SIZE
    resized_height, resized_width = smart_resize(height, width, factor=factor, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return (resized_height // factor) * (resized_width // factor)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_per_image_equal_qwen_utilities(tiny_checkpoints, tmp_path, family):
    processor = load_processor(str(tiny_checkpoints[family]))
    patch = processor.image_processor.patch_size
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts = []
    for i, (width, height) in enumerate(SIZES):
        Image.new("RGB", (width, height), (40 * i, 90, 160)).save(tmp_path / f"{i}.png")
        sample = CalibSample(split="x", image_relpath=f"{i}.png", image_id=i, caption_id=i, caption="a blue square on grey")
        encoded = encode_sample(processor, sample, tmp_path, True, SETTINGS)
        tokens = int((encoded["input_ids"] == image_token).sum())
        merge = processor.image_processor.merge_size
        assert tokens == int(encoded["image_grid_thw"].prod()) // merge**2
        assert tokens == qwen_token_count(width, height, patch), (family, width, height)
        resized = load_image(tmp_path / f"{i}.png", processor, SETTINGS)
        assert MIN_PIXELS <= resized.width * resized.height <= MAX_PIXELS
        assert resized.width % (patch * merge) == 0 and resized.height % (patch * merge) == 0
        counts.append(tokens)
    assert len(set(counts)) > 1  # the bounds and aspect ratios give different counts, not one fixed size


def test_an_unreadable_image_is_named(tiny_checkpoints, tmp_path):
    processor = load_processor(str(tiny_checkpoints["qwen2_5_vl"]))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VlmsensError, match="cannot read calibration image .*broken.jpg"):
        load_image(tmp_path / "broken.jpg", processor, SETTINGS)
