"""Where a validation forward's time goes, on full-size Qwen-VL architectures (random weights).

A validation measures about 60 configurations, each a forward over the held-out samples. For each
family this script runs a short AutoQuantize cell (for the search state), rebuilds the held-out
model as rule ``validate`` does (:class:`vlmsens.validation.HeldOutModel`), and times forwards over
``--eval-samples`` synthetic held-out samples:

* ``text_bf16``: everything BF16, the vision features reused (what an lm-only configuration costs
  at least);
* ``vision_bf16``: everything BF16, the vision tower recomputed;
* ``text_quantized`` / ``vision_quantized`` / ``all_quantized``: every text group, every vision
  group, or every group quantized with the cell's format;

each the best of ``--repeats`` runs (CUDA synchronised), and the KL to BF16 each quantized
configuration measures. With ``--kernels eager --kernels liger`` the held-out model is built with
each choice of ``autoquant.kernels`` in turn (same cell, same samples): times, speed-ups and KLs
side by side. Then (unless ``--skip-patch-embed``) the patch embedding alone on one
held-out batch (``nn.Conv3d`` with stride = kernel, as transformers ships it, against cuDNN off and
against the same weights as one matrix product), the vision-recomputing configurations again with
cuDNN's convolutions off; the vision-recomputing forwards with the tower making its geometry on each
forward (as shipped) instead of once per batch (``vlmsens.vision_geometry``; unless ``--skip-geometry``);
and with ``--profile``, for four of the forwards, a torch.profiler kernel table, the GPU's busy time
against the span of its work, and the host calls that may wait on the GPU.

Usage (on a GPU machine; see bench/RESULTS.md):
    python bench/validation_forward_bench.py --workdir /tmp/vf --out $OUT/validation_forward
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


def _timed(fn, repeats: int) -> float:
    import torch

    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def patch_embed_times(model, pixel_values, repeats: int) -> dict[str, float]:
    """The patch embedding of one batch: as shipped, with cuDNN off, and as one matrix product."""
    import torch

    embed = model.model.visual.patch_embed if hasattr(model, "model") else model.visual.patch_embed
    conv = embed.proj
    weight = conv.weight.reshape(conv.out_channels, -1)

    def as_linear():
        x = pixel_values.view(-1, weight.shape[1]).to(weight.dtype)
        return torch.nn.functional.linear(x, weight, conv.bias)

    with torch.inference_mode():
        shipped = embed(pixel_values)
        linear = as_linear()
        times = {"conv3d_s": _timed(lambda: embed(pixel_values), repeats)}
        with torch.backends.cudnn.flags(enabled=False):
            times["conv3d_cudnn_off_s"] = _timed(lambda: embed(pixel_values), repeats)
        times["linear_s"] = _timed(as_linear, repeats)
        times["max_abs_difference_linear"] = float((shipped.float() - linear.float()).abs().max())
    times["patches"] = int(pixel_values.shape[0])
    return times


def run_family(args, family: str) -> dict:
    import gc

    import torch

    from vlmsens.autoquant import CellSpec, run_autoquant
    from vlmsens.families import get_family
    from vlmsens.formats import format_registry, resolve_format

    report: dict = {}
    checkpoint = build_checkpoint(family, args.size, args.workdir / f"{family}-{args.size}", args.device)
    formats = resolve_format(args.format, format_registry({}))
    spec = CellSpec(model=f"{family}-{args.size}", family=get_family(family), checkpoint=str(checkpoint),
                    format_name=args.format, formats=formats, scope="all-layers", size=str(args.cell_samples),
                    effective_bits=8.5, method="gradient", batch_size=0, gpu_memory_gib=args.gpu_memory_gib,
                    device=args.device, gradient_checkpointing=True)
    state_path = args.workdir / f"{family}-state.pt"
    result = run_autoquant(spec, synthetic_samples(family, args.size, args.cell_samples, "all-layers", seed=0),
                           progress=lambda line: print(f"[cell] {line}", flush=True), state_path=str(state_path))
    report["cell_phases_s"] = result["timings_s"]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    manifest = held_out_manifest(formats, result)
    held_out_samples = synthetic_samples(family, args.size, args.eval_samples, "all-layers", seed=1)
    for kernels in args.kernels:
        spec.kernels = kernels
        report[kernels] = held_out_forwards(args, spec, manifest, state_path, held_out_samples, result["groups"])
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if len(args.kernels) > 1:
        first, *others = args.kernels
        report["forward_speedup"] = {f"{first}/{other}": {name: report[first]["forward_s"][name] / report[other]["forward_s"][name]
                                                          for name in report[first]["forward_s"]} for other in others}
    else:
        report.update(report.pop(args.kernels[0]))
    return report


def held_out_forwards(args, spec, manifest, state_path, held_out_samples, groups) -> dict:
    """The held-out model as rule ``validate`` builds it with ``spec.kernels``: its forwards' times."""
    import torch

    from vlmsens.autoquant import PhaseClock, load_search_state
    from vlmsens.validation import HeldOutModel

    report: dict = {}
    clock = PhaseClock(lambda line: print(f"[held-out {spec.kernels}] {line}", flush=True))
    held_out = HeldOutModel(spec, manifest, load_search_state(state_path), held_out_samples, clock)
    report["kernels"] = held_out.kernels
    report["eval_batches"] = [int(b["input_ids"].shape[0]) for b in held_out.eval_batches]
    report["reference_s"] = _timed(lambda: held_out.set_reference({}), 1)
    evaluator = held_out.evaluator
    text = {g["layer"]: args.format for g in groups if g["tower"] != "vision"}
    vision = {g["layer"]: args.format for g in groups if g["tower"] == "vision"}

    def bf16_with_vision(recompute: bool):
        def run():
            held_out.switch.apply({})
            evaluator.vision_bf16, evaluator.text_start = not recompute, 0
            evaluator.measure()
        return run

    configurations = {
        "text_bf16": bf16_with_vision(False),
        "vision_bf16": bf16_with_vision(True),
        "text_quantized": lambda: held_out.measure(text),
        "vision_quantized": lambda: held_out.measure(vision),
        "all_quantized": lambda: held_out.measure({**text, **vision}),
    }
    report["forward_s"] = {name: _timed(run, args.repeats) for name, run in configurations.items()}
    report["kl"] = {name: held_out.measure(selection)["kl"] for name, selection in
                     (("text_quantized", text), ("vision_quantized", vision), ("all_quantized", {**text, **vision}))}
    report["groups"] = {"text": len(text), "vision": len(vision)}
    if not args.skip_patch_embed:
        with torch.backends.cudnn.flags(enabled=False):
            report["forward_cudnn_off_s"] = {name: _timed(configurations[name], args.repeats)
                                             for name in ("vision_bf16", "vision_quantized", "all_quantized")}
        first = held_out.eval_batches[0]
        held_out.switch.apply({})
        report["patch_embed_bf16"] = patch_embed_times(evaluator.model, first["pixel_values"], args.repeats)
        held_out.switch.apply(vision)
        report["patch_embed_quantized"] = patch_embed_times(evaluator.model, first["pixel_values"], args.repeats)

    if not args.skip_geometry:
        # the same forwards with the vision tower making its own geometry on every forward, as shipped
        geometry = evaluator.vision.geometry
        visual, geometry.visual = geometry.visual, None
        report["forward_geometry_per_forward_s"] = {name: _timed(configurations[name], args.repeats)
                                                    for name in ("vision_bf16", "vision_quantized", "all_quantized")}
        geometry.visual = visual
    if args.profile and torch.cuda.is_available():
        report["profile"] = {name: profile_forward(configurations[name], args.out / f"{spec.family.name}-{spec.kernels}-{name}")
                             for name in ("text_bf16", "text_quantized", "vision_bf16", "all_quantized")}
    return report


SYNCING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy")


def profile_forward(run, prefix: Path) -> dict:
    """One forward under torch.profiler: GPU busy time (kernels and copies, overlaps merged) against the
    span from its first to its last GPU activity, the host calls that may wait on the GPU, and the
    kernel table (written to ``prefix``.profile.txt)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, -1.0
    for start, stop in spans:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    window = (spans[-1][1] - spans[0][0]) if spans else 0.0
    host = {name: {"calls": 0, "host_us": 0.0} for name in SYNCING_CALLS}
    for e in prof.events():
        if e.device_type == DeviceType.CPU and e.name in host:
            host[e.name]["calls"] += 1
            host[e.name]["host_us"] += e.time_range.end - e.time_range.start
    table = prof.key_averages()
    prefix.with_suffix(".profile.txt").write_text(
        table.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=80) + "\n\n"
        + table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=80))
    return {"gpu_busy_s": busy / 1e6, "gpu_window_s": window / 1e6, "busy_fraction": busy / window if window else None,
            "kernels": len(spans), "host_calls": {k: v for k, v in host.items() if v["calls"]}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlmsens-validation-forward"))
    parser.add_argument("--out", type=Path, default=Path("validation_forward"))
    parser.add_argument("--family", action="append", default=[])
    parser.add_argument("--format", default="wint8_aint8")
    parser.add_argument("--cell-samples", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-memory-gib", type=float, default=24.0)
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: a CPU smoke run of this script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--kernels", action="append", choices=["liger", "eager"], default=[],
                        help="autoquant.kernels of the held-out model; twice: both, compared (default: liger)")
    parser.add_argument("--skip-patch-embed", action="store_true", help="skip the patch-embedding and cuDNN-off timings")
    parser.add_argument("--skip-geometry", action="store_true",
                        help="skip the vision-recomputing forwards with the tower making its own geometry each time")
    args = parser.parse_args(argv)
    args.kernels = args.kernels or ["liger"]
    import gc

    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.device.startswith("cuda"):
        report["extensions_s"] = prebuild_extensions("int8" if "int8" in args.format else "fp8")
    for family in args.family or ["qwen2_5_vl", "qwen3_vl"]:
        report[family] = run_family(args, family)
        gc.collect()  # the family's models go with run_family's frame
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        (args.out / "validation_forward.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({family: report[family]}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
