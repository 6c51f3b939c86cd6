"""The two-GPU pairing benchmark's code on tiny models on the CPU, so it cannot rot (no timing checks).

Without a GPU the slot pool pins nothing; what this run checks is the harness itself: the config it
writes is valid, both Snakemake runs happen, ``--resources gpu=2`` lets the two cells overlap and
``gpu=1`` does not, and the report carries what bench/RESULTS.md is written from.
"""

from __future__ import annotations

import json

from conftest import load_bench


def _bench():
    return load_bench("gpu_pair_bench")


def test_pair_bench_runs_both_settings_on_tiny_models(tmp_path):
    bench = _bench()
    out = tmp_path / "out"
    assert bench.main(["--size", "tiny", "--device", "cpu", "--samples", "4", "--batch", "2", "--cores", "4",
                       "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads((out / "pair_report.json").read_text())
    assert list(report["runs"]) == ["gpu=1", "gpu=2"]
    for run in report["runs"].values():
        assert [j["cell"] for j in run["jobs"]] == ["wint8_aint8:all-layers", "wfp8_afp8:all-layers"]
        for job in run["jobs"]:
            assert job["slot_mode"] == "none" and job["gpu_slot"] is None  # no GPU here: nothing pinned
            assert set(job["timings_s"]) == {"read", "load", "calibrate", "score", "solve"}
            assert job["seconds"] > 0
    assert report["runs"]["gpu=1"]["overlap_s"] == 0.0
    assert report["runs"]["gpu=2"]["overlap_s"] > 0.0
    logs = (out / "cell_logs.txt").read_text()
    assert logs.count("===== --resources gpu=") == 4 and "GPU slot: no CUDA device visible" in logs


def test_cell_log_parsing_reads_the_slot_and_interval():
    bench = _bench()
    text = (
        "2026-11-25 10:00:00,000 INFO [autoquant m/f/s/z] GPU slot: took GPU 1 of 0,1 (CUDA_VISIBLE_DEVICES=1, lock /x)\n"
        "2026-11-25 10:00:30,500 INFO [autoquant m/f/s/z] write: done\n"
    )
    info = bench.parse_cell_log(text)
    assert (info["gpu_slot"], info["gpu_pool"], info["slot_mode"], info["seconds"]) == ("1", "0,1", "pool", 30.5)
    other = bench.parse_cell_log(text.replace("10:00:00,000", "10:00:20,000").replace("10:00:30,500", "10:01:00,000"))
    assert bench.overlap_seconds([info, other]) == 10.5
