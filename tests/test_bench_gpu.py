"""The GPU cell benchmark's code on tiny models on the CPU, so it cannot rot (no timing checks)."""

from __future__ import annotations

import json

from conftest import load_bench
from invariants import check_verdict_line


def _bench():
    return load_bench("gpu_cell_bench")


def test_bench_runs_ours_and_the_baseline_on_tiny_models(tmp_path):
    bench = _bench()
    out = tmp_path / "out"
    assert bench.main(["--size", "tiny", "--device", "cpu", "--workdir", str(tmp_path / "work"), "--out", str(out),
                       "--validate", "--eval-samples", "4",
                       "--cell", "ours:qwen2_5_vl:wint8_aint8:all-layers:4",
                       "--cell", "baseline:qwen3_vl:wint8_aint8:all-layers:4:2",
                       "--cell", "fwdbwd:qwen3_vl:wint8_aint8:all-layers:4:2"]) == 0
    report = json.loads((out / "bench_report.json").read_text())
    assert [c["cell"] for c in report["cells"]] == ["ours:qwen2_5_vl:wint8_aint8:all-layers:4", "baseline:qwen3_vl:wint8_aint8:all-layers:4:2",
                                                    "fwdbwd:qwen3_vl:wint8_aint8:all-layers:4:2"]
    ours, baseline, fwdbwd = report["cells"]
    assert "error" not in ours and "error" not in baseline and "error" not in fwdbwd
    assert set(ours["phases_s"]) == {"load", "calibrate", "score", "solve"}
    assert ours["vision_groups_nonzero"] and ours["padding_fraction"] < 0.5
    # the careful baseline pads each batch of 2 to its own longest sample, never to a fixed length
    assert baseline["real_tokens"] <= baseline["tokens"] < 1.5 * baseline["real_tokens"]
    assert set(fwdbwd["phases_s"]) == {"load", "forward_backward"} and fwdbwd["tokens"] == fwdbwd["real_tokens"]
    assert ours["floor_flops"] > 0 and baseline["floor_flops"] > 0
    validation = ours["validation"]
    assert validation["eval_samples"] == 4
    n_groups = int(check_verdict_line(validation["verdict"])["n"])
    # Default settings: 3 k × (top, bottom, largest, smallest, 5 random) + up to 24 ablations
    # + recipe, uniform, size-only, 5 random recipes.
    assert validation["configurations_measured"] == 3 * 9 + min(24, n_groups) + 8
    assert {"restore", "reference", "top-k", "ablations", "end-to-end"} <= set(validation["phases_s"])
    assert baseline.get("validation") is None


def test_extension_kinds_follow_the_formats():
    bench = _bench()
    assert bench.extension_kinds(["ours:qwen2_5_vl:wint8_aint8:all-layers:4"]) == "int8"
    assert bench.extension_kinds(["ours:qwen2_5_vl:wfp8_afp8:all-layers:4", "baseline:qwen3_vl:wint8_aint8:lm-only:4"]) == "fp8,int8"


def test_careful_batches_pad_per_batch_and_ignore_padding_in_labels():
    import torch

    bench = _bench()
    samples = bench.synthetic_samples("qwen2_5_vl", "tiny", 5, "all-layers")
    batches = bench.careful_batches(samples, 2, pad_id=0, device="cpu", dtype=torch.float32)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    for start, b in zip((0, 2, 4), batches, strict=True):
        lengths = [int(s["input_ids"].shape[0]) for s in samples[start:start + 2]]
        assert b["input_ids"].shape[1] == max(lengths)
        assert torch.equal(b["labels"] == -100, b["attention_mask"] == 0)


def test_synthetic_samples_label_only_the_caption():
    bench = _bench()
    for family in ("qwen2_5_vl", "qwen3_vl"):
        for sample in bench.synthetic_samples(family, "tiny", 3, "all-layers"):
            labelled = (sample["labels"] != -100).sum().item()
            assert 10 <= labelled <= 26
            assert sample["image_grid_thw"].prod().item() == sample["pixel_values"].shape[0]
