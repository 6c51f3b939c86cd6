"""GPU cost of one rule-ladder job on a full-size Qwen-VL architecture (random weights).

Runs a short AutoQuantize cell for the scores and calibration (``--cell-samples``; the ladder's cost
does not depend on them), then :func:`vlmsens.ladder.run_ladder` as rule ``ladder`` runs it: the
cell's model rebuilt with the cell's calibration restored from its search state, one BF16 reference, and every rung's optimal, nested and random recipes measured on
``--eval-samples`` synthetic held-out samples (the real config's ``coco.eval_images``: 100), with
the default ``ship_this.ladder`` settings. Prints and writes the phases, the number of measured
configurations, the peak memory and the ladder's KL curve.

Usage (on a GPU machine; see bench/RESULTS.md):
    python bench/ladder_bench.py --workdir /tmp/lb --out $OUT/ladder.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from gpu_cell_bench import build_checkpoint, held_out_manifest, prebuild_extensions, synthetic_samples  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlmsens-ladder-bench"))
    parser.add_argument("--out", type=Path, default=Path("ladder_bench.json"))
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument("--format", default="wint8_aint8")
    parser.add_argument("--scope", default="all-layers")
    parser.add_argument("--cell-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: a CPU smoke run of this script")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)

    from vlmsens.autoquant import CellSpec, load_search_state, run_autoquant
    from vlmsens.config import LadderSettings
    from vlmsens.families import get_family
    from vlmsens.formats import format_registry, resolve_format
    from vlmsens.ladder import run_ladder

    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.device.startswith("cuda"):
        report["extensions_s"] = prebuild_extensions("int8" if "int8" in args.format else "fp8")
    start = time.perf_counter()
    checkpoint = build_checkpoint(args.family, args.size, args.workdir / f"{args.family}-{args.size}", args.device)
    report["checkpoint_s"] = time.perf_counter() - start

    formats = resolve_format(args.format, format_registry({}))
    spec = CellSpec(model=f"{args.family}-{args.size}", family=get_family(args.family), checkpoint=str(checkpoint),
                    format_name=args.format, formats=formats, scope=args.scope, size=str(args.cell_samples),
                    effective_bits=8.5, method="gradient", batch_size=args.batch, gpu_memory_gib=None, device=args.device,
                    gradient_checkpointing=True)
    cell_samples = synthetic_samples(args.family, args.size, args.cell_samples, args.scope, seed=0)
    start = time.perf_counter()
    state_path = args.workdir / "autoquant_state.pt"
    result = run_autoquant(spec, cell_samples, progress=lambda line: print(f"[cell] {line}", flush=True),
                           state_path=str(state_path))
    report["cell_s"] = time.perf_counter() - start

    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    manifest = held_out_manifest(formats, result)
    held_out = synthetic_samples(args.family, args.size, args.eval_samples, args.scope, seed=1)
    settings = LadderSettings.from_config({}, seed=0)
    start = time.perf_counter()
    body = run_ladder(spec, manifest, load_search_state(state_path), held_out, settings, progress=lambda line: print(f"[ladder] {line}", flush=True))
    report["ladder"] = {
        "wall_s": time.perf_counter() - start, "phases_s": body["timings_s"], "peak_memory": body["peak_memory"],
        "configurations_measured": body["eval"]["configurations_measured"], "groups": body["n_groups"],
        "cell_samples": args.cell_samples, "eval_samples": args.eval_samples, "device": body["device"],
        "nested_is_nested": body["nested_is_nested"], "uniform_kl": body["uniform"]["kl"],
        "rungs": [{"budget_bits": r["budget_bits"], "optimal_bits": r["optimal"]["bits"], "optimal_kl": r["optimal"]["kl"],
                   "nested_bits": r["nested"]["bits"], "nested_kl": r["nested"]["kl"], "random_kl": r["random"]["mean"]["kl"]}
                  for r in body["rungs"]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
