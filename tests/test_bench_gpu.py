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
                       "--baseline-warm-extensions", "--validate", "--eval-samples", "4",
                       "--cell", "ours:qwen2_5_vl:wint8_aint8:all-layers:4",
                       "--cell", "baseline:qwen3_vl:wint8_aint8:all-layers:4"]) == 0
    report = json.loads((out / "bench_report.json").read_text())
    assert [c["cell"] for c in report["cells"]] == ["ours:qwen2_5_vl:wint8_aint8:all-layers:4", "baseline:qwen3_vl:wint8_aint8:all-layers:4"]
    ours, baseline = report["cells"]
    assert "error" not in ours and "error" not in baseline
    assert set(ours["phases_s"]) == {"load", "calibrate", "score", "solve"}
    assert ours["vision_groups_nonzero"] and ours["padding_fraction"] < 0.5
    assert baseline["tokens"] == 4 * bench.PAD_TO
    assert ours["floor_flops"] > 0 and baseline["floor_flops"] > 0
    validation = ours["validation"]
    assert validation["eval_samples"] == 4
    n_groups = int(check_verdict_line(validation["verdict"])["n"])
    # Default settings: 3 k × (top, bottom, 5 random) + up to 24 ablations + recipe, uniform, 5 random recipes.
    assert validation["configurations_measured"] == 3 * 7 + min(24, n_groups) + 7
    assert {"calibrate", "reference", "top-k", "ablations", "end-to-end"} <= set(validation["phases_s"])
    assert baseline.get("validation") is None


def test_extension_kinds_follow_the_formats():
    bench = _bench()
    assert bench.extension_kinds(["ours:qwen2_5_vl:wint8_aint8:all-layers:4"]) == "int8"
    assert bench.extension_kinds(["ours:qwen2_5_vl:wfp8_afp8:all-layers:4", "baseline:qwen3_vl:wint8_aint8:lm-only:4"]) == "fp8,int8"


def test_synthetic_samples_label_only_the_caption():
    bench = _bench()
    for family in ("qwen2_5_vl", "qwen3_vl"):
        for sample in bench.synthetic_samples(family, "tiny", 3, "all-layers"):
            labelled = (sample["labels"] != -100).sum().item()
            assert 10 <= labelled <= 26
            assert sample["image_grid_thw"].prod().item() == sample["pixel_values"].shape[0]
