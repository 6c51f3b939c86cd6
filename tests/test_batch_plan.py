"""Batches sized by memory: the largest batch whose predicted peak fits the card, halved on retries."""

from __future__ import annotations

import pytest
import torch

from vlmsens.autoquant import ALLOCATOR_OVERHEAD, MEMORY_MARGIN_GIB, CellSpec, batch_plan
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
    assert inference_batch_size({"batch_size": 10}, 100) == 40
    assert inference_batch_size({"batch_size": 37}, 100) == 100  # never more than the samples
    assert inference_batch_size({"batch_size": 1}, 0) == 1
