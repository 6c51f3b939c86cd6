"""Two AutoQuantize cells through Snakemake: one GPU at a time (gpu=1) against two at once (gpu=2).

Checks the one-cell-per-GPU pinning of ``vlmsens.gpupool`` on a multi-GPU host with the real
workflow: the same config, rules and scripts a user runs, on a full-size random-weight checkpoint
(``vlmsens.demo.build_demo_checkpoint(size="full")``, drawn on the GPU) and a generated COCO-format
tree of 640×480 images, both given to the workflow as a user's paths (``checkpoint:``, ``coco.root``).

Steps (each a plain ``snakemake`` call with the repository's Snakefile and default profile):

1. prepare: the inputs, then the subset and encoded samples through Snakemake; the ModelOpt CUDA
   extensions are built into the workflow's shared cache at the same time (on a GPU host);
2. ``--resources gpu=1``: the two cells, timed;
3. the two cells' outputs are deleted, then ``--resources gpu=2``: the same two cells, timed.

While 2 and 3 run, ``nvidia-smi`` samples each device's memory and utilisation. Each cell's log
names the GPU slot it took (``GPU slot: took GPU …``) and the manifest records the device's UUID;
from the logs' timestamps the report derives each job's interval, the overlap of the pair and the
devices used.

Usage (GPU host; see bench/RESULTS.md):
    python bench/gpu_pair_bench.py --workdir /tmp/pair --out $OUT
CPU smoke run (tiny models, no GPU; concurrency through Snakemake only):
    python bench/gpu_pair_bench.py --size tiny --device cpu --samples 4 --workdir /tmp/pair-cpu --out /tmp/pair-out
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench_model"
TINY_PIXELS = (3136, 12544)
SIZE = "pair"
LOG_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) ")
SLOT_TAKEN = re.compile(r"GPU slot: took GPU (\S+) of (\S+)")
SLOT_NONE = re.compile(r"GPU slot: (no CUDA device visible|SLURM job)")


def write_config(workdir: Path, *, family: str, size: str, cells: list[tuple[str, str]], samples: int, batch: int,
                 device: str, checkpoint: Path, coco_root: Path, gradient_checkpointing: bool = True) -> Path:
    """The workflow config of the pair: one model, the cells' formats and scopes, one calibration size."""
    config = {
        "outdir": str(workdir / "results"),
        "seed": 0,
        "models": {MODEL: {"family": family, "checkpoint": str(checkpoint)}},
        "grid": {
            "models": [MODEL],
            "formats": sorted({fmt for fmt, _ in cells}),
            "scopes": sorted({scope for _, scope in cells}),
            "sizes": [SIZE],
        },
        "sizes": {SIZE: samples},
        "coco": {"root": str(coco_root), "eval_images": 4},
        "autoquant": {"batch_size": batch, "device": device, "gradient_checkpointing": gradient_checkpointing},
    }
    if size == "tiny":
        config["prompts"] = {"min_pixels": TINY_PIXELS[0], "max_pixels": TINY_PIXELS[1]}
    path = workdir / "pair_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build_inputs(workdir: Path, *, family: str, size: str, samples: int, on_gpu: bool) -> tuple[Path, Path]:
    """A COCO-format tree (640×480 images for full size) and a random-weight checkpoint, as a user's inputs.

    Built in a child process, so that this process never holds a CUDA context during the timed runs.
    """
    coco, checkpoint = workdir / "coco", workdir / f"checkpoint-{family}-{size}"
    width, height = (128, 96) if size == "tiny" else (640, 480)
    pixels = TINY_PIXELS if size == "tiny" else (50176, 200704)
    code = f"""
from pathlib import Path
from vlmsens.demo import build_demo_checkpoint, build_demo_coco
if not Path({str(coco)!r}).is_dir():
    build_demo_coco({str(coco)!r}, n_train={max(samples + 8, 16)}, n_val=8, seed=0, width={width}, height={height})
if not Path({str(checkpoint)!r}).is_dir():
    build_demo_checkpoint({family!r}, {str(checkpoint)!r}, {str(coco)!r}, seed=0, vocab_size=512, min_pixels={pixels[0]},
                          max_pixels={pixels[1]}, size={size!r}, device={"cuda" if on_gpu else "cpu"!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return coco, checkpoint


def cell_dir(workdir: Path, fmt: str, scope: str) -> Path:
    return workdir / "results" / "autoquant" / MODEL / fmt / scope / SIZE


def cell_log(workdir: Path, fmt: str, scope: str) -> Path:
    return workdir / "results" / "logs" / "autoquant" / MODEL / fmt / scope / f"{SIZE}.log"


def snakemake(workdir: Path, config: Path, targets: list[str], extra: list[str], log_path: Path) -> float:
    """One ``snakemake`` call with the repository's Snakefile (and its default profile); returns seconds."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config), "--replace-workflow-config", *targets, *extra]  # targets first: --resources takes a list
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=workdir)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed ({proc.returncode}); see {log_path}:\n" + log_path.read_text()[-4000:])
    return wall


def parse_cell_log(text: str) -> dict:
    """Interval, GPU slot and phase lines of one autoquant job's log."""
    times = [dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for line in text.splitlines() if (m := LOG_TIME.match(line))]
    if not times:
        raise ValueError("no timestamped line in the log")
    taken = SLOT_TAKEN.search(text)
    info = {
        "start": times[0].isoformat(timespec="milliseconds"),
        "end": times[-1].isoformat(timespec="milliseconds"),
        "seconds": round((times[-1] - times[0]).total_seconds(), 3),
        "gpu_slot": taken.group(1) if taken else None,
        "gpu_pool": taken.group(2) if taken else None,
        "slot_mode": "pool" if taken else ("none" if SLOT_NONE.search(text) else "unknown"),
        "slot_lines": [line for line in text.splitlines() if "GPU slot:" in line],
    }
    return info


def overlap_seconds(jobs: list[dict]) -> float:
    """Seconds during which every job of ``jobs`` ran (intersection of their intervals)."""
    starts = [dt.datetime.fromisoformat(j["start"]) for j in jobs]
    ends = [dt.datetime.fromisoformat(j["end"]) for j in jobs]
    return round(max(0.0, (min(ends) - max(starts)).total_seconds()), 3)


class SmiSampler:
    """``nvidia-smi`` every 500 ms to a CSV while a phase runs (nothing without nvidia-smi)."""

    def __init__(self, path: Path):
        self.path = path
        self.proc = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.handle = open(self.path, "w")
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,index,uuid,memory.used,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "500"], stdout=self.handle, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.handle.close()

    def summary(self) -> dict:
        """Per device: peak memory used (MiB), and seconds with utilisation above 0."""
        if self.proc is None or not self.path.is_file():
            return {}
        out: dict[str, dict] = {}
        for row in csv.reader(self.path.read_text().splitlines()):
            if len(row) < 5:
                continue
            index, uuid, mem, util = (v.strip() for v in row[1:5])
            entry = out.setdefault(index, {"uuid": uuid, "peak_memory_used_mib": 0, "busy_samples": 0, "samples": 0})
            entry["peak_memory_used_mib"] = max(entry["peak_memory_used_mib"], int(float(mem)))
            entry["samples"] += 1
            entry["busy_samples"] += int(float(util) > 0)
        for entry in out.values():
            entry["busy_seconds"] = entry.pop("busy_samples") * 0.5
        return out


def run_pair(args) -> dict:
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cell_logs.txt").unlink(missing_ok=True)
    cells = [tuple(c.split(":")) for c in args.cell]
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and shutil.which("nvidia-smi") is not None)
    results = workdir / "results"
    report: dict = {"cells": [f"{fmt}:{scope}" for fmt, scope in cells], "family": args.family, "size": args.size,
                    "samples": args.samples, "batch": args.batch, "runs": {}}

    build = None
    if on_gpu:
        # The workflow's own extension cache (rule autoquant's params.extensions_cache), filled once,
        # while the inputs are built.
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(results / ".cache" / "torch_extensions")}
        code = "import sys; sys.path.insert(0, sys.argv[1]); from gpu_cell_bench import prebuild_extensions; print(prebuild_extensions())"
        build = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent)], env=env, stdout=subprocess.PIPE, text=True)
    start = time.perf_counter()
    coco, checkpoint = build_inputs(workdir, family=args.family, size=args.size, samples=args.samples, on_gpu=on_gpu)
    report["inputs_s"] = round(time.perf_counter() - start, 1)
    config = write_config(workdir, family=args.family, size=args.size, cells=cells, samples=args.samples,
                          batch=args.batch, device=args.device, checkpoint=checkpoint, coco_root=coco,
                          gradient_checkpointing=args.gradient_checkpointing == "on")
    samples = sorted({str(results / "samples" / MODEL / scope / SIZE / "samples.pt") for _, scope in cells})
    manifests = [str(cell_dir(workdir, fmt, scope) / "quant_manifest.json") for fmt, scope in cells]
    report["prepare_s"] = round(snakemake(workdir, config, samples, ["--cores", str(args.cores)], args.out / "snakemake_prepare.log"), 1)
    if build is not None:
        stdout, _ = build.communicate()
        if build.returncode != 0:
            raise SystemExit("building ModelOpt's CUDA extensions failed")
        report["extension_build_s"] = round(float(stdout.strip().splitlines()[-1]), 1)
    print(f"inputs {report['inputs_s']} s, prepare {report['prepare_s']} s, extension build {report.get('extension_build_s')} s", flush=True)

    for gpus in args.gpus:
        for fmt, scope in cells:
            shutil.rmtree(cell_dir(workdir, fmt, scope), ignore_errors=True)
        with SmiSampler(args.out / f"nvidia_smi_gpu{gpus}.csv") as smi:
            wall = snakemake(workdir, config, manifests, ["--cores", str(args.cores), "--resources", f"gpu={gpus}"],
                             args.out / f"snakemake_gpu{gpus}.log")
        jobs = []
        for fmt, scope in cells:
            log_text = cell_log(workdir, fmt, scope).read_text()
            with open(args.out / "cell_logs.txt", "a") as combined:
                combined.write(f"===== --resources gpu={gpus}: {cell_log(workdir, fmt, scope)}\n{log_text}\n")
            manifest = json.loads((cell_dir(workdir, fmt, scope) / "quant_manifest.json").read_text())
            jobs.append({"cell": f"{fmt}:{scope}", **parse_cell_log(log_text), "device": manifest["device"],
                         "peak_memory": manifest["peak_memory"], "timings_s": manifest["timings_s"]})
        run = {"wall_s": round(wall, 2), "jobs": jobs, "overlap_s": overlap_seconds(jobs),
               "distinct_devices": len({j["device"].get("uuid") or j["gpu_slot"] for j in jobs}), "nvidia_smi": smi.summary()}
        report["runs"][f"gpu={gpus}"] = run
        print(f"gpu={gpus}: wall {wall:.1f} s, overlap {run['overlap_s']:.1f} s, devices "
              + ", ".join(f"{j['cell']}→{j['gpu_slot']} ({j['device'].get('uuid')})" for j in jobs), flush=True)
    (args.out / "pair_report.json").write_text(json.dumps(report, indent=1))
    print(render_table(report))
    return report


def render_table(report: dict) -> str:
    from tabulate import tabulate

    rows = []
    for name, run in report["runs"].items():
        for job in run["jobs"]:
            rows.append([name, f"{run['wall_s']:.1f}", job["cell"], job["gpu_slot"], job["device"].get("uuid"), job["start"][11:],
                         job["end"][11:], f"{job['seconds']:.1f}", job["peak_memory"].get("gpu_allocated_gib"), f"{run['overlap_s']:.1f}"])
    return tabulate(rows, headers=["run", "pair wall s", "cell", "GPU slot", "device UUID", "start", "end", "job s",
                                   "peak GiB", "overlap s"], tablefmt="github")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlmsens-pair"))
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"])
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cores", type=int, default=8)
    parser.add_argument("--cell", action="append", default=None, help="format:scope (give two)")
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                        help="autoquant.gradient_checkpointing of the cells' config")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="the --resources gpu=N values to run, in order")
    args = parser.parse_args(argv)
    args.cell = args.cell or ["wint8_aint8:all-layers", "wfp8_afp8:all-layers"]
    run_pair(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
