"""The real grid end to end on one GPU host, through Snakemake as a user runs it.

Inputs are what a user points the config at: full-size random-weight checkpoints of both models
(``vlmsens.demo.build_demo_checkpoint(size="full")``, the real architectures and vocabulary, drawn
on the GPU) and a COCO-2017-format tree of 640×480 JPEGs with enough images for the large subset
and the held-out set. The config is ``config/config.yaml`` with only ``models.*.checkpoint``,
``coco.root`` and ``outdir`` replaced (and ``validation.enabled`` as asked).

    python bench/grid_bench.py prepare --workdir /tmp/grid           # inputs and grid_config.yaml
    python bench/grid_bench.py run --workdir /tmp/grid --no-validation  # the 24 cells and reports
    python bench/grid_bench.py run --workdir /tmp/grid               # then the validations
    python bench/grid_bench.py summary --workdir /tmp/grid --out $OUT  # wall per rule, per cell

Each ``run`` is one ``snakemake --cores 4 --resources gpu=1`` call (the repository's Snakefile and
default profile); its wall time and command go to ``runs.json``. ``summary`` reads every job's
``benchmark:`` file and the cells' manifests. CPU smoke run: ``--size tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PIXELS = {"full": (50176, 200704), "tiny": (3136, 12544)}


def prepare(workdir: Path, size: str, device: str, validation: bool = True) -> Path:
    """Checkpoints, COCO tree and the grid config (built once; reused when present)."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    n_train = max(config["sizes"].values()) + 16
    n_val = config["coco"]["eval_images"] + 8
    width, height = (640, 480) if size == "full" else (128, 96)
    coco = workdir / "coco"
    checkpoints = {name: workdir / f"checkpoint-{name}" for name in config["grid"]["models"]}
    code = f"""
from pathlib import Path
from vlmsens.demo import build_demo_checkpoint, build_demo_coco
if not Path({str(coco)!r}).is_dir():
    build_demo_coco({str(coco)!r}, n_train={n_train}, n_val={n_val}, seed=0, width={width}, height={height})
for family, path in {[(config["models"][m]["family"], str(p)) for m, p in checkpoints.items()]!r}:
    if not Path(path).is_dir():
        build_demo_checkpoint(family, path, {str(coco)!r}, seed=0, vocab_size=512, min_pixels={PIXELS[size][0]},
                              max_pixels={PIXELS[size][1]}, size={size!r}, device={device!r})
"""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)  # its own process: no CUDA context kept here
    print(f"inputs ready in {time.perf_counter() - start:.1f} s", flush=True)
    for name, path in checkpoints.items():
        config["models"][name]["checkpoint"] = str(path)
    config["coco"]["root"] = str(coco)
    config["outdir"] = str(workdir / "results")
    config["validation"]["enabled"] = validation
    if size == "tiny":
        config["prompts"].update(min_pixels=PIXELS["tiny"][0], max_pixels=PIXELS["tiny"][1])
        config["autoquant"]["device"] = device
    path = workdir / "grid_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(workdir: Path, validation: bool, cores: int, extra: list[str]) -> dict:
    config_path = workdir / "grid_config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["validation"]["enabled"] = validation
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config_path), "--replace-workflow-config", "--cores", str(cores), *extra,
           "--resources", "gpu=1"]
    log_path = workdir / f"snakemake-{'with' if validation else 'no'}-validation.log"
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log_path, "w") as handle:
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=workdir).returncode
    record = {"command": " ".join(cmd), "validation": validation, "exit": code, "started": start,
              "wall_s": round(time.time() - start, 1), "log": str(log_path)}
    runs_path = workdir / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
    runs_path.write_text(json.dumps([*runs, record], indent=1))
    print(json.dumps(record), flush=True)
    return record


def summary(workdir: Path) -> dict:
    """Wall per rule from the benchmark files, the runs' walls, and each cell's in-process time."""
    results = workdir / "results"
    per_rule: dict[str, list[float]] = defaultdict(list)
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = tsv.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
        with open(tsv) as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                per_rule[rule].append(float(row["s"]))
    rules = {rule: {"jobs": len(s), "total_s": round(sum(s), 1), "mean_s": round(sum(s) / len(s), 1), "max_s": round(max(s), 1)}
             for rule, s in sorted(per_rule.items())}
    def job_wall(rule: str, cell: str) -> float | None:
        """The job's whole wall time (process start to end, as Snakemake's benchmark: measures it)."""
        path = results / "benchmarks" / rule / f"{cell}.tsv"
        if not path.exists():
            return None
        with open(path) as handle:
            return float(next(csv.DictReader(handle, delimiter="\t"))["s"])

    runs_path = workdir / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else []
    started = runs[-1]["started"] if runs else None
    cells, finished = [], []
    for manifest_path in sorted((results / "autoquant").rglob("quant_manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        cell = manifest["cell"]
        name = f"{cell['model']}/{cell['format']}/{cell['scope']}/{cell['size']}"
        timings = manifest.get("timings_s", {})
        in_process = sum(timings.values())
        wall = job_wall("autoquant", name)
        finished.append(manifest_path.stat().st_mtime)
        cells.append({
            "cell": name,
            "in_process_s": round(in_process, 1),
            "job_wall_s": wall,
            "startup_s": round(wall - in_process, 1) if wall is not None else None,
            "phases_s": timings,
            "batch": manifest.get("batch_plan", {}).get("batch_size"),
            "peak_gpu_gib": manifest.get("peak_memory", {}).get("gpu_allocated_gib"),
        })
    validations = []
    for path in sorted((results / "autoquant").rglob("validation.json")):
        doc = json.loads(path.read_text())
        name = str(path.parent.relative_to(results / "autoquant"))
        in_process = sum(doc.get("timings_s", {}).values())
        validations.append({"cell": name, "in_process_s": round(in_process, 1), "job_wall_s": job_wall("validate", name),
                            "configurations": doc.get("eval", {}).get("configurations_measured"),
                            "eval_batches": doc.get("eval", {}).get("batches"),
                            "model_source": doc.get("model_source"), "phases_s": doc.get("timings_s", {}),
                            "peak_gpu_gib": doc.get("peak_memory", {}).get("gpu_allocated_gib")})
    # The last cell's manifest marks the map's end (each validation runs right after its cell).
    timeline = {"cells_done_s": round(max(finished) - started, 1) if finished and started else None,
                "cells": len(cells), "validations": len(validations)}
    return {"runs": runs, "timeline": timeline, "rules": rules, "cells": cells, "validations": validations}


def render(report: dict) -> str:
    from tabulate import tabulate

    lines = [tabulate([[r["validation"], r["exit"], r["wall_s"]] for r in report["runs"]],
                      headers=["validation", "exit", "wall s"], tablefmt="github"), ""]
    lines.append(tabulate([[rule, v["jobs"], v["total_s"], v["mean_s"], v["max_s"]] for rule, v in report["rules"].items()],
                          headers=["rule", "jobs", "total s", "mean s", "max s"], tablefmt="github"))
    lines.append("")
    lines.append(f"timeline of the last run: {json.dumps(report['timeline'])}")
    lines.append("")
    lines.append(tabulate([[c["cell"], c["batch"], c["in_process_s"], c["job_wall_s"], c["startup_s"], c["peak_gpu_gib"]]
                           for c in report["cells"]],
                          headers=["cell", "batch", "in-process s", "job wall s", "wall − in-process s", "peak GiB"],
                          tablefmt="github"))
    if report["validations"]:
        lines.append("")
        lines.append(tabulate([[v["cell"], v["configurations"], v["eval_batches"], v.get("model_source"),
                                ", ".join(f"{k} {t:.1f}" for k, t in v.get("phases_s", {}).items()),
                                v["in_process_s"], v["job_wall_s"], v["peak_gpu_gib"]]
                               for v in report["validations"]],
                              headers=["validated cell", "configurations", "eval batches", "model", "phases s", "in-process s",
                                       "job wall s", "peak GiB"],
                              tablefmt="github"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run", "summary"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cores", type=int, default=4)
    parser.add_argument("--no-validation", action="store_true")
    parser.add_argument("--snakemake-arg", action="append", default=[], help="passed on to snakemake")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.step == "prepare":
        prepare(args.workdir, args.size, args.device, validation=not args.no_validation)
    elif args.step == "run":
        record = run(args.workdir, not args.no_validation, args.cores, args.snakemake_arg)
        return 0 if record["exit"] == 0 else 1
    else:
        report = summary(args.workdir)
        text = render(report)
        print(text)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "grid_summary.json").write_text(json.dumps(report, indent=1))
            (args.out / "grid_summary.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
