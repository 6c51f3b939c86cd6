"""Keeps bench/coco_subset_bench.py working: its generator and one extraction at a tiny size (no timing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vlmsens.calib import load_annotations, read_calib_db

BENCH = Path(__file__).resolve().parents[1] / "bench" / "coco_subset_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("coco_subset_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_generator_and_one_extraction(bench, tmp_path: Path):
    coco = tmp_path / "coco"
    ann = bench.generate_coco(coco, n_images=300, n_captions=1503, seed=1)
    data = json.loads(ann.read_text())
    assert len(data["images"]) == 300 and len(data["annotations"]) == 1503
    assert len({img["id"] for img in data["images"]}) == 300
    assert len({a["id"] for a in data["annotations"]}) == 1503
    assert all(8 <= len(a["caption"].split()) <= 20 for a in data["annotations"])
    file_names, captions = load_annotations(ann)
    assert sorted(len(v) for v in captions.values())[-3:] == [6, 6, 6]  # 5 each, 3 images get a 6th

    relpaths = bench.selected_relpaths(coco, 16, seed=1)
    assert bench.write_jpegs(coco, relpaths, 32, 24, variants=2) > 0
    row = bench.run_extraction(coco, tmp_path / "out", "small", 16, seed=1)
    assert row["size"] == "small" and row["samples"] == 16
    assert row["wall_s"] > 0 and row["peak_rss_mib"] > 0
    samples, meta = read_calib_db(row["db_path"])
    assert [s.image_relpath for s in samples] == relpaths
    assert meta["size_name"] == "small"

    info = {
        "images": 300, "captions": 1503, "json_mib": 0.1, "generate_s": 0.1, "jpegs": 16, "jpeg_size": "32x24",
        "jpeg_kib": 1.0, "machine": bench.machine(), "date": "2000-01-01",
    }
    section = bench.render_section([row], info, "bench/coco_subset_bench.py --images 300")
    assert section.startswith(bench.SECTION) and "| small | 16 |" in section


def test_write_section_keeps_other_sections(bench, tmp_path: Path):
    results = tmp_path / "RESULTS.md"
    bench.write_section(results, bench.SECTION + "\n\nfirst\n")
    assert results.read_text().startswith(bench.RESULTS_HEADING + "\n")
    results.write_text(results.read_text() + "\n## Other bench\n\nkeep me\n")
    bench.write_section(results, bench.SECTION + "\n\nsecond\n")
    text = results.read_text()
    assert "second" in text and "first" not in text
    assert "## Other bench\n\nkeep me" in text
    assert text.count(bench.SECTION) == 1
