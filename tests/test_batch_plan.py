"""Batches sized by memory: the largest batch whose predicted peak fits the card, halved on retries."""

from __future__ import annotations

import pytest
import torch

from vlmsens.autoquant import ALLOCATOR_OVERHEAD, MEMORY_MARGIN_GIB, CellSpec, batch_plan
from vlmsens.autoquant import memory_model as memory_model_of
from vlmsens.batches import plan_batch_size
from vlmsens.families import MemoryModel, get_family
from vlmsens.formats import format_registry, resolve_format

GIB = 2**30


def _samples(n: int, tokens=(260, 320), patches: int = 988) -> list[dict]:
    """Shapes of full-size COCO samples (only shapes matter to the memory model)."""
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.zeros(int(torch.randint(*tokens, (1,), generator=g)), dtype=torch.long),
             "pixel_values": torch.empty((patches, 0))} for _ in range(n)]


def _largest_batch_bytes(samples, model, batch):
    ordered = sorted(samples, key=lambda s: s["input_ids"].shape[0])
    return max(model.batch_bytes(ordered[i:i + batch]) for i in range(0, len(ordered), batch))


@pytest.mark.parametrize("card_gib", [32e9 / GIB, 80.0, 141.0])  # an RTX 5090 (32 GB), an H100, an H200
def test_the_largest_batch_that_fits_the_card(card_gib):
    family = get_family("qwen2_5_vl")
    model = family.memory_model()
    samples = _samples(128)
    weights = 7.0 * GIB
    budget = card_gib * GIB - weights - MEMORY_MARGIN_GIB * GIB
    size, need = plan_batch_size(samples, model, budget)
    assert need == _largest_batch_bytes(samples, model, size) <= budget
    assert all(_largest_batch_bytes(samples, model, b) > budget for b in range(size + 1, 129))
    assert weights + need + MEMORY_MARGIN_GIB * GIB <= card_gib * GIB


def test_bigger_cards_get_bigger_batches_and_text_only_batches_more_samples():
    model = get_family("qwen3_vl").memory_model()
    images = _samples(256)
    text = [{"input_ids": s["input_ids"][:40]} for s in images]
    sizes = [plan_batch_size(images, model, gib * GIB)[0] for gib in (8, 20, 60)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert plan_batch_size(text, model, 8 * GIB)[0] > sizes[0]


def test_a_batch_never_fitting_still_runs_one_sample():
    model, samples = MemoryModel(1e9, 1e9), _samples(4)
    size, need = plan_batch_size(samples, model, 1.0)
    assert size == 1 and need == max(model.batch_bytes([s]) for s in samples)


def test_without_checkpointing_the_model_predicts_more_memory():
    family = get_family("qwen2_5_vl")
    assert family.memory_model(False).bytes_per_patch > family.memory_model(True).bytes_per_patch


def _spec(**kw) -> CellSpec:
    return CellSpec(model="m", family=get_family("qwen2_5_vl"), checkpoint="-", format_name="wint8_aint8",
                    formats=resolve_format("wint8_aint8", format_registry({})), scope="all-layers", size="small",
                    effective_bits=8.5, device="cpu", **kw)


def test_cell_batch_plan_with_a_fake_memory_cap_and_retries():
    """On the CPU a configured gpu_memory_gib stands in for a card: the plan follows the memory model."""
    net = torch.nn.Linear(1024, 1024)  # 4 MiB of fp32 weights stand for the resident model
    samples = _samples(64)
    static = sum(p.numel() * p.element_size() for p in net.parameters())
    cap_gib = 12.0
    first = batch_plan(_spec(batch_size=0, gpu_memory_gib=cap_gib), net, samples, "cpu")
    budget = (cap_gib * GIB - static - MEMORY_MARGIN_GIB * GIB) / ALLOCATOR_OVERHEAD
    expected, _ = plan_batch_size(samples, get_family("qwen2_5_vl").memory_model(), budget)
    assert first["policy"] == "auto" and first["batch_size"] == expected > 1
    assert first["predicted_peak_gib"] <= cap_gib - MEMORY_MARGIN_GIB
    retried = batch_plan(_spec(batch_size=0, gpu_memory_gib=cap_gib, batch_halvings=1), net, samples, "cpu")
    assert retried["batch_size"] < first["batch_size"] and retried["halvings"] == 1


def test_fixed_batch_sizes_halve_per_retry_and_auto_on_a_cpu_is_eight():
    net = torch.nn.Linear(4, 4)
    assert batch_plan(_spec(batch_size=6), net, _samples(8), "cpu")["batch_size"] == 6
    assert batch_plan(_spec(batch_size=6, batch_halvings=1), net, _samples(8), "cpu")["batch_size"] == 3
    assert batch_plan(_spec(batch_size=0), net, _samples(8), "cpu")["batch_size"] == 8


def test_inference_batches_hold_four_search_batches_within_the_sample_count():
    from vlmsens.autoquant import INFERENCE_BATCH_FACTOR, inference_batch_size

    assert INFERENCE_BATCH_FACTOR == 4
    assert inference_batch_size(10, 100) == 40
    assert inference_batch_size(37, 100) == 100  # never more than the samples
    assert inference_batch_size(1, 0) == 1
    assert inference_batch_size(10, 100, halvings=1) == 20  # an out-of-memory retry halves it
    assert inference_batch_size(1, 100, halvings=3) == 1


def test_memory_model_adds_one_blocks_differences_per_candidate_format():
    """A searched block's Q(Y) - Y per format (2 bytes per output) is what the score adds per token and patch."""
    family = get_family("qwen2_5_vl")
    assert family.block_outputs() == (2560 + 2 * 2048 + 2 * 11008, 4 * 1280 + 2 * 3420 + 1280)
    assert get_family("qwen3_vl").block_outputs() == (128 * (32 + 16) + 2 * 2560 + 2 * 9728, 4 * 1024 + 4096 + 1024)
    one, two = family.memory_model(n_formats=1), family.memory_model(n_formats=2)
    assert two.bytes_per_token - one.bytes_per_token == 2 * 28672
    assert two.bytes_per_patch - one.bytes_per_patch == 2 * 13240
    lm_only = family.memory_model(searches_vision=False)
    assert lm_only.bytes_per_token == one.bytes_per_token and lm_only.bytes_per_patch == family.activation_bytes_per_patch
    # without checkpointing every block's differences are held until the backward: the measured totals × 2.4
    assert family.memory_model(False).bytes_per_token == pytest.approx(2.4 * (0.41e6 + 36 * 2 * 28672))


def test_a_two_format_cell_plans_a_smaller_batch():
    net = torch.nn.Linear(1024, 1024)
    both = format_registry({"fp8_or_int8": {"candidates": ["wfp8_afp8", "wint8_aint8"]}})
    one = batch_plan(_spec(batch_size=0, gpu_memory_gib=12.0), net, _samples(64), "cpu")
    two_spec = CellSpec(model="m", family=get_family("qwen2_5_vl"), checkpoint="-", format_name="fp8_or_int8",
                        formats=resolve_format("fp8_or_int8", both), scope="all-layers", size="small",
                        effective_bits=8.5, device="cpu", batch_size=0, gpu_memory_gib=12.0)
    two = batch_plan(two_spec, net, _samples(64), "cpu")
    assert len(two_spec.formats) == 2 and two["batch_size"] < one["batch_size"]


@pytest.mark.parametrize("family_name, outputs", [("qwen2_5_vl", 1), ("qwen3_vl", 2)])  # tiny Qwen3-VL: one deepstack level
def test_lm_only_plans_keep_room_for_the_cached_image_features(family_name, outputs):
    import transformers

    from vlmsens.autoquant import cached_feature_bytes

    family = get_family(family_name)
    config = family.build_config("tiny")
    model = transformers.AutoModelForImageTextToText.from_config(config)
    samples = _samples(16, patches=64)
    lm_only = CellSpec(model="m", family=family, checkpoint="-", format_name="wint8_aint8",
                       formats=resolve_format("wint8_aint8", format_registry({})), scope="lm-only", size="small",
                       effective_bits=8.5, device="cpu", batch_size=0, gpu_memory_gib=4.0)
    vision = config.vision_config
    expected = 16 * 64 / vision.spatial_merge_size**2 * vision.out_hidden_size * outputs * 4  # fp32 on the CPU
    assert cached_feature_bytes(model, samples, lm_only) == expected > 0
    all_layers = CellSpec(**{**lm_only.__dict__, "scope": "all-layers"})
    assert cached_feature_bytes(model, samples, all_layers) == 0.0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = batch_plan(lm_only, model, samples, "cpu")
    _, need = plan_batch_size(samples, memory_model_of(lm_only), (4.0 * GIB - weights - expected - MEMORY_MARGIN_GIB * GIB) / ALLOCATOR_OVERHEAD)
    assert plan["predicted_peak_gib"] == round((weights + expected + need * ALLOCATOR_OVERHEAD) / GIB, 3)
