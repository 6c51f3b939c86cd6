"""Qwen-VL model families: what differs between them, in one place.

Adding a family is one more ``Family`` entry in ``FAMILIES`` (and its name in the schema's enum,
which a test keeps equal to this registry): its transformers config and processor classes, how
its module names map to towers and sublayers, the full-size architecture (for benchmarks) and a
scaled-down one (for the demo and tests).
Everything else (loading, batching, scoring, reports) is family-agnostic.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

# Special tokens of the real Qwen-VL tokenizers (ids in docs/DESIGN.md, "Architectures"); tiny demo
# tokenizers get the same tokens with their own ids.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

VISION_PATTERNS = ("*visual*",)
NO_CHECKPOINTING_MEMORY_FACTOR = 2.4
# ModelOpt's score keeps Q(Y) - Y of each searched linear layer, per candidate format, in the
# model's dtype (bf16) until that layer's backward.
DIFFERENCE_BYTES = 2


@dataclass(frozen=True)
class MemoryModel:
    """Peak GPU bytes of a cell's search phase: weights plus a cost per padded token and per image patch.

    The score phase's peak grows linearly with a batch's padded tokens and its patches
    (docs/DESIGN.md, "Batches sized by memory"; measured in bench/RESULTS.md).
    """

    bytes_per_token: float
    bytes_per_patch: float

    def batch_bytes(self, samples: list[dict]) -> float:
        shape = batch_shape(samples)
        return shape["padded_tokens"] * self.bytes_per_token + shape["patches"] * self.bytes_per_patch


def batch_shape(samples: list[dict]) -> dict[str, int]:
    """What a batch of these samples costs in memory: its padded tokens and its image patches."""
    return {"padded_tokens": len(samples) * max(int(s["input_ids"].shape[0]) for s in samples),
            "patches": sum(int(s["pixel_values"].shape[0]) for s in samples if "pixel_values" in s)}


# Sublayer type of a group from its module names, first match wins (the Qwen-VL naming).
QWEN_SUBLAYER_RULES = (
    (r"deepstack_merger_list\.\d+\.linear_fc1$", "deepstack_fc1"),
    (r"deepstack_merger_list\.\d+\.linear_fc2$", "deepstack_fc2"),
    (r"merger\.(mlp\.0|linear_fc1)$", "merger_fc1"),
    (r"merger\.(mlp\.2|linear_fc2)$", "merger_fc2"),
    (r"patch_embed\.proj$", "patch_embed"),
    (r"attn\.qkv$", "qkv"),
    (r"attn\.proj$", "proj"),
    (r"mlp\.linear_fc1$", "fc1"),
    (r"mlp\.linear_fc2$", "fc2"),
    (r"\.(q_proj|k_proj|v_proj)$", "qkv"),
    (r"\.o_proj$", "o"),
    (r"\.(gate_proj|up_proj)$", "gate_up"),
    (r"\.down_proj$", "down"),
    (r"lm_head$", "lm_head"),
)


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    # Multiple of the image side in pixels that the processor resizes to (patch × spatial merge).
    image_factor: int
    # Qwen3-VL in transformers 5 needs mm_token_type_ids next to input_ids.
    needs_mm_token_type_ids: bool
    full_text: dict[str, Any]
    full_vision: dict[str, Any]
    tiny_text: dict[str, Any]
    tiny_vision: dict[str, Any]
    # transformers classes save_pretrained / AutoProcessor use for the demo checkpoints' processor.
    processor_class: str
    video_processor_class: str
    image_processor_class: str = "Qwen2VLImageProcessorFast"
    # Activation memory of an AutoQuantize search on the full-size model (bf16, gradient method,
    # gradient checkpointing on) per padded text token and per image patch of a batch, besides the
    # score's quantization differences (:meth:`memory_model` adds those): the peaks measured with
    # bench/gpu_cell_bench.py (bench/RESULTS.md, "Memory model") less every block's differences,
    # which the search then held. Used to size batches.
    activation_bytes_per_token: float = 0.0
    activation_bytes_per_patch: float = 0.0
    # Qwen2.5-VL's vision MLP is gated (gate, up, down); Qwen3-VL's has two layers (fc1, fc2).
    vision_mlp_gated: bool = True
    vision_patterns: tuple[str, ...] = VISION_PATTERNS
    sublayer_rules: tuple[tuple[str, str], ...] = QWEN_SUBLAYER_RULES
    tie_word_embeddings: bool = True
    extra_config: dict[str, Any] = field(default_factory=dict)

    def block_outputs(self) -> tuple[int, int]:
        """Outputs of one full-size text block's linear layers per token, and of one vision block's per patch."""
        text, vision = self.full_text, self.full_vision
        head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
        qkv = head_dim * (text["num_attention_heads"] + 2 * text["num_key_value_heads"])
        per_token = qkv + 2 * text["hidden_size"] + 2 * text["intermediate_size"]  # q k v, o and down, gate and up
        mlp = (2 if self.vision_mlp_gated else 1) * vision["intermediate_size"] + vision["hidden_size"]
        per_patch = 4 * vision["hidden_size"] + mlp  # qkv and proj, then the MLP
        return per_token, per_patch

    def memory_model(self, gradient_checkpointing: bool = True, n_formats: int = 1, searches_vision: bool = True):
        """The search's memory per padded token and per patch.

        With checkpointing, a block's quantization differences live only while the block is
        recomputed in the backward pass (the cell frees each once scored), so one block's
        differences per candidate format add to the activations. Without it every block's
        activations and differences stay alive until the backward pass: measured about 2.4× the
        checkpointed peak when every block's differences were held (batch 8).
        """
        per_token, per_patch = self.block_outputs()
        token_diff = DIFFERENCE_BYTES * n_formats * per_token
        patch_diff = DIFFERENCE_BYTES * n_formats * per_patch if searches_vision else 0.0
        if gradient_checkpointing:
            return MemoryModel(self.activation_bytes_per_token + token_diff, self.activation_bytes_per_patch + patch_diff)
        layers, depth = self.full_text["num_hidden_layers"], self.full_vision["depth"]
        return MemoryModel(NO_CHECKPOINTING_MEMORY_FACTOR * (self.activation_bytes_per_token + layers * token_diff),
                           NO_CHECKPOINTING_MEMORY_FACTOR * (self.activation_bytes_per_patch + depth * patch_diff))

    def build_config(self, size: str, token_ids: dict[str, int] | None = None, vocab_size: int | None = None):
        """A transformers config of this family at ``size`` ('full' or 'tiny')."""
        import transformers

        config_cls = getattr(transformers, self.config_class)
        text = dict(self.full_text if size == "full" else self.tiny_text)
        vision = dict(self.full_vision if size == "full" else self.tiny_vision)
        if vocab_size is not None:
            text["vocab_size"] = vocab_size
        ids = token_ids or {}
        config = config_cls(
            text_config=text,
            vision_config=vision,
            tie_word_embeddings=self.tie_word_embeddings,
            **{k: v for k, v in ids.items()},
            **self.extra_config,
        )
        # Sub-configs mirror the tie flag; transformers reads it from the text config.
        config.text_config.tie_word_embeddings = self.tie_word_embeddings
        return config


FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family(
        name="qwen2_5_vl",
        config_class="Qwen2_5_VLConfig",
        image_factor=28,
        needs_mm_token_type_ids=False,
        processor_class="Qwen2_5_VLProcessor",
        video_processor_class="Qwen2VLVideoProcessor",
        # measured 2.47 MB per token and 0.95 MB per patch with all 36 text and 32 vision blocks'
        # differences held (2 B × 28,672 and 2 B × 13,240 outputs per block)
        activation_bytes_per_token=0.41e6,
        activation_bytes_per_patch=0.10e6,
        full_text=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        ),
        full_vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            patch_size=14,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            out_hidden_size=2048,
        ),
        tiny_text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        ),
        tiny_vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[1],
            out_hidden_size=64,
        ),
    ),
    "qwen3_vl": Family(
        name="qwen3_vl",
        config_class="Qwen3VLConfig",
        image_factor=32,
        needs_mm_token_type_ids=True,
        processor_class="Qwen3VLProcessor",
        video_processor_class="Qwen3VLVideoProcessor",
        # measured 2.67 MB per token and 0.54 MB per patch with all 36 text and 24 vision blocks'
        # differences held (2 B × 30,720 and 2 B × 9,216 outputs per block)
        activation_bytes_per_token=0.46e6,
        activation_bytes_per_patch=0.10e6,
        vision_mlp_gated=False,
        full_text=dict(
            vocab_size=151936,
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),
        full_vision=dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            patch_size=16,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
            out_hidden_size=2560,
        ),
        tiny_text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        ),
        tiny_vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
            out_hidden_size=64,
        ),
    ),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known families: {sorted(FAMILIES)}") from None


_BLOCK_RE = re.compile(r"\.(?:layers|blocks|deepstack_merger_list)\.(\d+)(?:\.|$)")


TOWERS = ("vision", "text", "head")  # what tower_of answers, in report order


def tower_of(module_name: str, vision_patterns: tuple[str, ...] = VISION_PATTERNS) -> str:
    """'vision', 'head' or 'text' for a module path."""
    if any(fnmatch.fnmatch(module_name, p) for p in vision_patterns):
        return "vision"
    if module_name.split(".")[-1] == "lm_head" or module_name == "lm_head":
        return "head"
    return "text"


def block_index(module_name: str) -> int | None:
    match = _BLOCK_RE.search(module_name)
    return int(match.group(1)) if match else None


def sublayer_of(group_name: str, module_names: list[str], rules: tuple[tuple[str, str], ...] = QWEN_SUBLAYER_RULES) -> str:
    """Sublayer type of a group (qkv, o, gate_up, down, fc1, merger_fc1, ...) by the family's ``rules``."""
    for name in [group_name, *module_names]:
        for pattern, label in rules:
            if re.search(pattern, name):
                return label
    return group_name.rsplit(".", 1)[-1]
