"""The embedded demo: a small COCO-format tree and tiny Qwen-VL checkpoints built locally.

Nothing here downloads. The checkpoints use the real transformers classes (scaled-down configs,
seeded random weights), a byte-level BPE tokenizer trained on the demo captions with the Qwen
special tokens and chat template, and the real Qwen image/video processors; they are written with
``save_pretrained`` so that they load back through AutoProcessor / AutoModelForImageTextToText
exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from .errors import VlmsensError
from .families import QWEN_SPECIAL_TOKENS, get_family
from .io import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

# A compact Qwen2.5-VL-style chat template: system turn, image placeholders, im_start/im_end.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def _draw_scene(rng: random.Random, width: int, height: int):
    """One image with 1-3 shapes of one kind and colour on a plain background, and its captions."""
    from PIL import Image, ImageDraw

    shape = rng.choice(SHAPES)
    colour = rng.choice([c for c in COLOURS if c != "white"])
    background = rng.choice([c for c in COLOURS if c != colour])
    count = rng.randint(1, 3)
    image = Image.new("RGB", (width, height), COLOURS[background])
    draw = ImageDraw.Draw(image)
    cell = width // count
    for i in range(count):
        size = rng.randint(min(cell, height) // 3, min(cell, height) // 2)
        cx = cell * i + cell // 2
        cy = height // 2 + rng.randint(-height // 8, height // 8)
        box = (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=COLOURS[colour])
    noun = shape if count == 1 else shape + "s"
    article = "A" if count == 1 else COUNT_WORDS[count].capitalize()
    captions = [
        f"{article} {colour} {noun} on a {background} background.",
        f"A {background} picture with {COUNT_WORDS[count]} {colour} {noun}.",
        f"{COUNT_WORDS[count].capitalize()} {colour} {noun} drawn on a plain {background} surface.",
    ]
    return image, captions


def build_demo_coco(root: str | Path, n_train: int, n_val: int, seed: int, width: int = 128, height: int = 96) -> None:
    """Write a COCO-2017-format tree: annotations/captions_{train,val}2017.json plus JPEGs."""
    root = Path(root)
    rng = random.Random(seed)
    with atomic_dir(root) as tmp:
        (tmp / "annotations").mkdir(parents=True)
        caption_id = 1
        for split, n_images, first_id in (("train2017", n_train, 1000), ("val2017", n_val, 900000)):
            (tmp / split).mkdir()
            images, annotations = [], []
            for i in range(n_images):
                image_id = first_id + i
                image, captions = _draw_scene(rng, width, height)
                file_name = f"{image_id:012d}.jpg"
                image.save(tmp / split / file_name, quality=90)
                images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
                # COCO lists several captions per image; keep a varying number of them.
                for caption in captions[: rng.randint(2, len(captions))]:
                    annotations.append({"id": caption_id, "image_id": image_id, "caption": caption})
                    caption_id += 1
            payload = {
                "info": {"description": "vlmsens demo captions (generated shapes)", "version": "1.0"},
                "licenses": [],
                "images": images,
                "annotations": annotations,
            }
            (tmp / "annotations" / f"captions_{split}.json").write_text(json.dumps(payload))
    log.info("demo COCO tree written to %s (%d train, %d val images)", root, n_train, n_val)


def demo_caption_corpus(coco_root: str | Path) -> list[str]:
    """All captions of the demo tree, in file order (tokenizer training text)."""
    texts: list[str] = []
    for split in ("train2017", "val2017"):
        data = json.loads((Path(coco_root) / "annotations" / f"captions_{split}.json").read_text())
        texts.extend(a["caption"] for a in data["annotations"])
    return texts


def train_demo_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with the Qwen special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_demo_checkpoint(
    family_name: str,
    out_dir: str | Path,
    coco_root: str | Path,
    seed: int,
    vocab_size: int,
    min_pixels: int,
    max_pixels: int,
    size: str = "tiny",
    device: str = "cpu",
) -> None:
    """Build and save a random-weight checkpoint of ``family_name`` that loads like a real one.

    ``size="tiny"`` is the CPU demo. ``size="full"`` is the real architecture (docs/DESIGN.md,
    "Architectures", with its real vocabulary size) in bf16, for GPU runs of the whole workflow
    without downloaded weights; its tokenizer is still the small demo one, whose ids all lie inside
    the real vocabulary.
    ``device="cuda"`` draws the weights on the GPU (seconds instead of minutes for ``full``; the
    draws differ from the CPU ones, and DEMO_CHECKPOINT.json records where they were made).
    """
    import torch
    import transformers

    family = get_family(family_name)
    tokenizer = train_demo_tokenizer(
        demo_caption_corpus(coco_root) + list(_PROMPT_TEXTS), vocab_size=vocab_size
    )
    token_ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    if size not in ("tiny", "full"):
        raise VlmsensError(f"demo checkpoint size must be 'tiny' or 'full', got {size!r}")
    config = family.build_config(size, token_ids=token_ids, vocab_size=len(tokenizer) if size == "tiny" else None)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.bos_token_id = None
    torch.manual_seed(seed)
    # fp32 on the CPU: its bf16 random draws are several times slower.
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(
            config, dtype=torch.float32 if device == "cpu" else torch.bfloat16
        )
    _fan_in_init(model, seed)
    if size == "full":
        model.to(torch.bfloat16)
    model.eval()

    processor = _build_processor(family, tokenizer, min_pixels, max_pixels)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_text(
            tmp / "DEMO_CHECKPOINT.json",
            json.dumps({"family": family_name, "size": size, "seed": seed, "drawn_on": device,
                        "note": "random weights, built locally"}, indent=2),
        )
    log.info("%s %s checkpoint written to %s", size, family_name, out_dir)


def _fan_in_init(model, seed: int) -> None:
    """Re-draw every Linear weight (but the tied lm_head) with std 1/sqrt(fan_in).

    transformers' default init (std 0.02) makes the blocks of a tiny random model almost
    pass-through, so every block scores about zero and no ranking means anything. With a fan-in
    scale each block's output matters, as in a trained network.
    """
    import math

    import torch

    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    lm_head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not lm_head:
                module.weight.normal_(0.0, 1.0 / math.sqrt(module.weight.shape[1]), generator=generator)
                if module.bias is not None:
                    module.bias.zero_()


# Instructions that calibration samples use; included in the demo tokenizer's training text.
_PROMPT_TEXTS = (
    "You are a helpful assistant.",
    "Describe this image in one sentence.",
    "Write a one-sentence caption for an everyday scene.",
    "system user assistant",
)


def _build_processor(family, tokenizer, min_pixels: int, max_pixels: int):
    import transformers

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    patch = family.image_factor // 2
    image_processor = getattr(transformers, family.image_processor_class)(
        size=size, patch_size=patch, temporal_patch_size=2, merge_size=2
    )
    video_processor = getattr(transformers, family.video_processor_class)(
        size=size, patch_size=patch, temporal_patch_size=2, merge_size=2
    )
    return getattr(transformers, family.processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
