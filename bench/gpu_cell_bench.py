"""AutoQuantize cells on full-size Qwen-VL architectures (random weights) against the careful baseline.

Each cell runs in a fresh process (like one Snakemake job). Three implementations:

* ``ours``: vlmsens' cell (``run_autoquant``): caption-only loss with lm_head on caption positions,
  length-bucketed batches with dynamic padding, all samples for calibration and scoring.
* ``baseline``: the careful plain-ModelOpt script every speed ratio is measured against
  (docs/DESIGN.md, "Speed baseline"): ``mtq.auto_quantize`` on the same samples, batched, padding
  per batch only, ``labels=input_ids``, transformers as shipped, the same warm extension cache.
* ``fwdbwd``: one plain bf16 forward+backward of the same samples through our model path, no
  quantizers: what the cell's compute would cost without ModelOpt's per-module work.

The ModelOpt CUDA extensions are built once into a shared cache before the timed cells.
Inputs are synthetic image+caption samples of COCO-like size: 640×480 images resized by the
Qwen rule within [min_pixels, max_pixels], captions of 8-20 words (random token ids).

Usage (on a GPU machine; see bench/RESULTS.md for the exact commands):
    python bench/gpu_cell_bench.py --workdir /tmp/vb --out $OUT \\
        --cell baseline:qwen2_5_vl:wint8_aint8:all-layers:128:4 --cell ours:qwen2_5_vl:wint8_aint8:all-layers:128:auto
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

IMAGE_SIZE = (480, 640)  # height, width of a typical COCO image


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def synthetic_samples(family_name: str, size: str, n: int, scope: str, seed: int = 0,
                      min_pixels: int = 50176, max_pixels: int = 200704, inputs: str = "image+caption") -> list[dict]:
    """Samples shaped like vlmsens.batches.encode_sample output, with random ids and pixels (images for
    both scopes unless ``inputs`` is 'caption-only', which keeps lm-only samples text-only)."""
    import torch

    from vlmsens.batches import IGNORE_INDEX
    from vlmsens.families import get_family

    family = get_family(family_name)
    config = family.build_config(size)
    vocab = config.text_config.vocab_size
    vision = config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if size == "tiny":
        # tiny checkpoints use ids inside their own small vocabulary
        ids = {"im_start": 1, "im_end": 2, "vision_start": 9, "vision_end": 10, "image_pad": 12}
        min_pixels, max_pixels = min(min_pixels, 56 * 56), min(max_pixels, 112 * 112)
        config.image_token_id, config.vision_start_token_id, config.vision_end_token_id = 12, 9, 10
    else:
        ids = {"im_start": 151644, "im_end": 151645, "vision_start": 151652, "vision_end": 151653, "image_pad": 151655}
    generator = torch.Generator().manual_seed(seed)
    text_hi = 500 if size == "tiny" else min(vocab, 151000) - 20

    def words(k: int) -> list[int]:
        return (torch.randint(20, text_hi, (k,), generator=generator)).tolist()

    samples = []
    for _ in range(n):
        n_caption = int(torch.randint(8, 21, (1,), generator=generator)) * 13 // 10  # ~1.3 tokens per word
        prompt = [ids["im_start"], *words(5), ids["im_end"], *words(1), ids["im_start"], *words(2)]
        pixel_values = grid = None
        if scope == "all-layers" or inputs == "image+caption":  # calibration.inputs, as the pipeline reads it
            h, w = _smart_resize(*IMAGE_SIZE, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
            gh, gw = h // patch, w // patch
            n_image = gh * gw // (merge * merge)
            prompt += [ids["vision_start"], *([ids["image_pad"]] * n_image), ids["vision_end"]]
            pixel_values = torch.randn((gh * gw, 3 * temporal * patch * patch), generator=generator)
            grid = torch.tensor([[1, gh, gw]])
        prompt += [*words(7), ids["im_end"], *words(1), ids["im_start"], *words(2)]
        caption = words(n_caption)
        input_ids = torch.tensor(prompt + caption + [ids["im_end"], *words(1)])
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[len(prompt): len(prompt) + n_caption] = input_ids[len(prompt): len(prompt) + n_caption]
        sample = {"input_ids": input_ids, "labels": labels}
        # Both processors return token types (1 = image); the models build multimodal RoPE from them.
        sample["mm_token_type_ids"] = (input_ids == ids["image_pad"]).long()
        if pixel_values is not None:
            sample["pixel_values"] = pixel_values
            sample["image_grid_thw"] = grid
        samples.append(sample)
    return samples


def build_checkpoint(family_name: str, size: str, out: Path, device: str) -> Path:
    """A random-weight checkpoint of the real architecture, saved like a downloaded one."""
    import torch
    import transformers

    from vlmsens.families import get_family

    if (out / "config.json").is_file():
        return out
    family = get_family(family_name)
    config = family.build_config(size)
    if size == "tiny":
        config.image_token_id, config.vision_start_token_id, config.vision_end_token_id = 12, 9, 10
        config.text_config.vocab_size = 512
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    del model
    return out


def param_counts(checkpoint: Path) -> dict[str, int]:
    """Parameters of the text path (incl. lm_head) and of the vision tower, from the safetensors headers."""
    from safetensors import safe_open

    counts = {"text": 0, "vision": 0}
    tied = json.loads((checkpoint / "config.json").read_text()).get("tie_word_embeddings", False)
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                numel = 1
                for dim in handle.get_slice(name).get_shape():
                    numel *= dim
                if "visual" in name:
                    counts["vision"] += numel
                elif "embed_tokens" in name and not tied:
                    continue  # a lookup, not a matmul
                else:
                    counts["text"] += numel
    return counts


def floor_flops(params: dict[str, int], samples: list[dict], n_formats: int) -> float:
    """(6 + 2F)·P·T with P·T split into text params × tokens and vision params × patches."""
    tokens = sum(int(s["input_ids"].shape[0]) for s in samples)
    patches = sum(int(s["pixel_values"].shape[0]) for s in samples if "pixel_values" in s)
    return (6 + 2 * n_formats) * (params["text"] * tokens + params["vision"] * patches)


def run_ours(args, samples: list[dict]) -> dict:

    from vlmsens.autoquant import CellSpec, run_autoquant
    from vlmsens.families import get_family
    from vlmsens.formats import format_registry, resolve_format

    formats = resolve_format(args.format, format_registry({"wfp8_or_wint8": {"candidates": ["wfp8_afp8", "wint8_aint8"]}}))
    spec = CellSpec(model=f"{args.family}-{args.size}", family=get_family(args.family), checkpoint=args.checkpoint,
                    format_name=args.format, formats=formats, scope=args.scope, size=str(args.samples),
                    effective_bits=8.5 if "4" not in args.format else 4.8, method="gradient",
                    batch_size=0 if args.batch == "auto" else int(args.batch), gpu_memory_gib=args.gpu_memory_gib,
                    device=args.device, gradient_checkpointing=args.gradient_checkpointing == "on", kernels=args.kernels)
    state_path = Path(tempfile.mkdtemp(prefix="vlmsens-bench-state-")) / "autoquant_state.pt"
    start = time.perf_counter()
    result = run_autoquant(spec, samples, progress=lambda line: print(f"[ours] {line}", flush=True), state_path=str(state_path))
    wall = time.perf_counter() - start
    groups = sorted(result["groups"], key=lambda g: -g["scores_per_token"][formats[0].name])
    validation = run_validation_after(args, spec, formats, result, state_path) if args.validate else None
    return {
        "validation": validation,
        "wall_s": wall,
        "batch_plan": result["batch_plan"],
        "phases_s": result["timings_s"],
        "peak_memory": result["peak_memory"],
        "tokens": result["batches"]["tokens"],
        "loss_tokens": result["batches"]["loss_tokens"],
        "padding_fraction": result["batches"]["padding_fraction"],
        "groups": len(result["groups"]),
        "excluded_groups": len(result["excluded_groups"]),
        "bits_achieved": result["search"]["effective_bits_achieved"],
        "vision_groups_nonzero": all(g["scores_raw"][formats[0].name] > 0 for g in result["groups"] if g["tower"] == "vision"),
        "top5": [g["layer"] for g in groups[:5]],
        "n_formats": len(formats),
        "device": result["device"],
        "torch_dtype": result["dtype"],
        "scores": {g["layer"]: g["scores_per_token"][formats[0].name] for g in result["groups"]},
        "selection": {g["layer"]: g["selected_format"] for g in result["groups"]},
        "gradient_checkpointing": result["search"]["gradient_checkpointing"],
        "kernels": result["kernels"],
    }


def held_out_manifest(formats, result: dict) -> dict:
    """What validate and ladder read of a cell's manifest, from a ``run_autoquant`` result."""
    from vlmsens.formats import format_bits

    return {"cell": {"candidates": [f.name for f in formats]}, "formats": {f.name: {"bits": format_bits(f)} for f in formats},
            "search": result["search"], "groups": result["groups"],
            "config": {"batch_size_used": result["batch_plan"]["batch_size"]}}


def run_validation_after(args, spec, formats, result: dict, state_path: Path) -> dict:
    """vlmsens.validation on the cell just run, with synthetic held-out samples (another seed)."""
    import gc

    import torch

    from vlmsens.autoquant import load_search_state
    from vlmsens.config import ValidationSettings
    from vlmsens.validation import run_validation

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    manifest = held_out_manifest(formats, result)
    held_out = synthetic_samples(args.family, args.size, args.eval_samples, args.scope, seed=1)
    start = time.perf_counter()
    body = run_validation(spec, manifest, load_search_state(state_path), held_out, ValidationSettings.from_config({}, seed=0),
                          progress=lambda line: print(f"[validate] {line}", flush=True))
    return {"wall_s": time.perf_counter() - start, "phases_s": body["timings_s"], "peak_memory": body["peak_memory"],
            "eval_samples": args.eval_samples, "configurations_measured": body["eval"]["configurations_measured"],
            "verdict": body["verdict"]}


def careful_batches(samples: list[dict], batch: int, pad_id: int, device: str, dtype) -> list[dict]:
    """Batches as a careful script builds them: samples in the given order, right-padded to the
    longest of each batch (never to a fixed length), ``labels=input_ids`` with padding ignored."""
    import torch

    out = []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        length = max(int(s["input_ids"].shape[0]) for s in chunk)
        input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        mm = torch.zeros((len(chunk), length), dtype=torch.long) if "mm_token_type_ids" in chunk[0] else None
        for i, s in enumerate(chunk):
            n = int(s["input_ids"].shape[0])
            input_ids[i, :n], mask[i, :n] = s["input_ids"], 1
            if mm is not None:
                mm[i, :n] = s["mm_token_type_ids"]
        labels = input_ids.masked_fill(mask == 0, -100)
        b = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if mm is not None:
            b["mm_token_type_ids"] = mm
        if "pixel_values" in chunk[0]:
            b["pixel_values"] = torch.cat([s["pixel_values"] for s in chunk]).to(dtype)
            b["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in chunk])
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def run_baseline(args, samples: list[dict]) -> dict:
    """The careful plain-ModelOpt script (docs/DESIGN.md, "Speed baseline"): ``mtq.auto_quantize`` on
    the same samples, batched (``--batch``), padding per batch only, ``labels=input_ids``,
    transformers as shipped (its own SDPA vision attention), the shared warm extension cache."""
    import modelopt.torch.quantization as mtq
    import torch

    from vlmsens.formats import format_registry, resolve_format
    from vlmsens.models import dtype_for, load_model

    device = args.device
    phases = {}
    t0 = time.perf_counter()
    model = load_model(args.checkpoint, device, vision_attention="sdpa", kernels="eager")  # transformers as shipped
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    phases["load"] = time.perf_counter() - t0
    pad_id = model.config.text_config.pad_token_id or 0
    data = careful_batches(samples, int(args.batch), pad_id, device, dtype_for(device))
    formats = [f.modelopt_config for f in resolve_format(args.format, format_registry({"wfp8_or_wint8": {"candidates": ["wfp8_afp8", "wint8_aint8"]}}))]
    t1 = time.perf_counter()
    model, state = mtq.auto_quantize(
        model,
        constraints={"effective_bits": 8.5 if "4" not in args.format else 4.8},
        quantization_formats=formats,
        data_loader=data,
        forward_step=lambda m, b: m(**b),
        loss_func=lambda out, b: out.loss,
        num_calib_steps=len(data),
        num_score_steps=len(data),
        verbose=False,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    phases["auto_quantize"] = time.perf_counter() - t1
    peak = {}
    if device.startswith("cuda"):
        peak = {"gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    stats = state["candidate_stats"]
    scores = {}
    for name, stat in stats.items():
        layer = name.removesuffix(".quant_recipe")
        searched = [s for f, s in zip(stat["formats"], stat["scores"], strict=True) if str(f).split("(")[0] != "NONE"]
        if searched:
            scores[layer] = float(searched[0])
    return {
        "wall_s": time.perf_counter() - t0,
        "phases_s": phases,
        "peak_memory": peak,
        "tokens": sum(int(b["attention_mask"].numel()) for b in data),
        "groups": len(stats),
        "bits_achieved": state["best"]["constraints"].get("effective_bits"),
        "n_formats": len(formats),
        "scores": scores,
    }


def run_fwdbwd(args, samples: list[dict]) -> dict:
    """One plain bf16 forward+backward of the same samples through our model path (the cell's
    loading, attention and batches, caption-token loss), no quantizers: the reference for the
    cell's overhead over plain training-style compute."""
    import torch

    from vlmsens.autoquant import caption_logits, device_batches
    from vlmsens.models import dtype_for, load_model

    device = args.device
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # the cell's attention settings
    model = load_model(args.checkpoint, device, kernels=args.kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    phases = {"load": time.perf_counter() - t0}
    batches = device_batches(model, samples, int(args.batch), device, dtype_for(device))
    t1 = time.perf_counter()
    for batch in batches:
        logits, targets = caption_logits(model, batch)
        torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    phases["forward_backward"] = time.perf_counter() - t1
    peak = {"gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)} if device.startswith("cuda") else {}
    return {"wall_s": time.perf_counter() - t0, "phases_s": phases, "peak_memory": peak, "n_formats": 0,
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches), "scores": {}, "kernels": model.vlmsens_kernels}


def summarise_collapsed(path: Path, top: int = 45) -> str:
    """Self and inclusive sample counts per Python frame of a py-spy ``--format raw`` profile."""
    from collections import Counter

    own, inclusive, total = Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "", "self:"]
    lines += [f"{100 * n / total:6.2f}% {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * n / total:6.2f}% {frame}" for frame, n in inclusive.most_common(2 * top)]
    return "\n".join(lines) + "\n"


def run_one(args) -> None:
    runner = {"ours": run_ours, "baseline": run_baseline, "fwdbwd": run_fwdbwd}[args.impl]
    samples = synthetic_samples(args.family, args.size, args.samples, args.scope)
    # Every implementation starts timing with the same warm imports a job of the worker has
    # (vlmsens.worker.preload): one-time library set-up is start-up, not per-cell work.
    from vlmsens.worker import preload

    preload_s = preload()
    if args.cudnn_sdpa == "on":
        import torch

        # A/B of the cell's choice: keep cuDNN's SDPA backend although the cell switches it off.
        torch.backends.cuda.enable_cudnn_sdp = lambda enabled: None
    if args.sync_debug:
        import warnings
        from collections import Counter

        import torch

        # Every host read of a GPU value raises a warning at its Python call site: count them by site.
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runner(args, samples)
        torch.cuda.set_sync_debug_mode(0)
        sites = Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
        result["host_syncs"] = {"total": sum(sites.values()), "sites": dict(sites.most_common(40))}
    elif args.profile:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities, with_stack=True) as prof:
            result = runner(args, samples)
        averages = prof.key_averages()
        sort_key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        by_stack = prof.key_averages(group_by_stack_n=7)
        syncs = [e for e in by_stack if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaMemcpyAsync",
                                                   "aten::item", "aten::nonzero", "cudaDeviceSynchronize")]
        syncs.sort(key=lambda e: -e.count)
        stack_lines = [f"{e.count:7d} x {e.key}  self CPU {e.self_cpu_time_total / 1e3:.1f} ms\n    " + "\n    ".join(e.stack)
                       for e in syncs[:40]]
        Path(args.result).with_suffix(".profile.txt").write_text(
            averages.table(sort_by=sort_key, row_limit=40) + "\n\n" + averages.table(sort_by="cpu_time_total", row_limit=40)
            + "\n\nhost syncs and copies by call site:\n" + "\n".join(stack_lines)
        )
    else:
        result = runner(args, samples)
    params = param_counts(Path(args.checkpoint))
    flops = floor_flops(params, samples, result["n_formats"])
    busy = sum(v for k, v in result["phases_s"].items() if k != "load")
    result.update(
        impl=args.impl, family=args.family, format=args.format, scope=args.scope, samples=args.samples, batch=args.batch,
        params=params, floor_flops=flops, effective_tflops=flops / busy / 1e12 if busy else None,
        real_tokens=sum(int(s["input_ids"].shape[0]) for s in samples), preload_s=preload_s,
    )
    result["tokens_per_s"] = result["real_tokens"] / busy if busy else None
    Path(args.result).write_text(json.dumps(result, indent=1))


def prebuild_extensions(kinds: str = "int8,fp8") -> float:
    """Build (or load from the cache) ModelOpt's CUDA extensions, and compile the Triton kernels each
    format's fake quantization uses on a small bf16 layer; returns seconds spent. Both are one-time
    costs of a host (cached on disk), paid here so that no timed cell pays them."""
    start = time.perf_counter()
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.quantization import extensions

    configs = []
    if "int8" in kinds:
        extensions.get_cuda_ext(raise_if_failed=True)
        configs.append(mtq.INT8_DEFAULT_CFG)
    if "fp8" in kinds:
        extensions.get_cuda_ext_fp8(raise_if_failed=True)
        configs.append(mtq.FP8_DEFAULT_CFG)
    if torch.cuda.is_available():
        for config in configs:
            layer = torch.nn.Sequential(torch.nn.Linear(256, 256)).to("cuda", torch.bfloat16)
            x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            mtq.quantize(layer, config, forward_loop=lambda m, x=x: m(x))
            layer(x).float().sum().backward()
        torch.cuda.synchronize()
    return time.perf_counter() - start


def extension_kinds(cells: list[str]) -> str:
    """The extensions the requested cells' formats use (INT8 and/or FP8 fake quantization)."""
    formats = [spec.split(":")[2] for spec in cells]
    kinds = {"int8" for f in formats if "int" in f} | {"fp8" for f in formats if "fp8" in f or "fp4" in f}
    return ",".join(sorted(kinds)) or "int8,fp8"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vlmsens-bench")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", default="4", help="samples per batch, or auto (ours: sized by memory)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="ours with batch auto: the memory cap (default: the card's free memory)")
    parser.add_argument("--cell", action="append", default=[], help="impl:family:format:scope:samples[:batch[:kernels]]")
    parser.add_argument("--kernels", choices=["liger", "eager"], default="liger",
                        help="ours and fwdbwd: autoquant.kernels (the baseline runs transformers as shipped)")
    # internal: one cell in this process
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl"), parser.add_argument("--family"), parser.add_argument("--format")
    parser.add_argument("--scope"), parser.add_argument("--samples", type=int), parser.add_argument("--checkpoint")
    parser.add_argument("--result")
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                        help="ours: recompute activations in the score phase's backward (ModelOpt's default) or not")
    parser.add_argument("--validate", action="store_true",
                        help="ours: run vlmsens.validation on the cell afterwards (default settings), timed separately")
    parser.add_argument("--eval-samples", type=int, default=32, help="held-out samples of --validate")
    parser.add_argument("--profile", action="store_true", help="run the cells under torch.profiler (slower; op table next to each result)")
    parser.add_argument("--sync-debug", action="store_true", help="count host syncs by Python call site (torch's sync debug mode)")
    parser.add_argument("--py-spy", action="store_true", help="sample each cell process with py-spy (Python frames, self and inclusive)")
    parser.add_argument("--cudnn-sdpa", choices=["on", "off"], default="off",
                        help="ours: keep cuDNN's SDPA backend on (A/B of the cell's default, off)")
    args = parser.parse_args(argv)
    if args.one:
        run_one(args)
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    warm_cache = args.workdir / "torch_extensions"
    report = {"cells": [], "extension_build_s": None}
    if args.device.startswith("cuda"):
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(warm_cache)}
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from gpu_cell_bench import prebuild_extensions; "
                "print(prebuild_extensions(sys.argv[2]))")
        out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), extension_kinds(args.cell)], env=env,
                             capture_output=True, text=True, check=True)
        report["extension_build_s"] = float(out.stdout.strip().splitlines()[-1])
        print(f"extension build (shared cache, paid once): {report['extension_build_s']:.1f} s", flush=True)
    for spec in args.cell:
        impl, family, fmt, scope, n, *rest = spec.split(":")
        batch = rest[0] if rest else args.batch
        kernels = rest[1] if len(rest) > 1 else args.kernels
        checkpoint = build_checkpoint(family, args.size, args.workdir / f"{family}-{args.size}", args.device)
        result_file = args.out / f"{impl}-{family}-{fmt}-{scope}-{n}-b{batch}{'' if impl == 'baseline' else '-' + kernels}.json"
        # every implementation with the allocator setting a cell's job runs with (vlmsens.gpupool)
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(warm_cache), "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        cmd = [sys.executable, __file__, "--one", "--impl", impl, "--family", family, "--format", fmt, "--scope", scope,
               "--samples", n, "--checkpoint", str(checkpoint), "--result", str(result_file), "--size", args.size,
               "--device", args.device, "--batch", str(batch), "--gradient-checkpointing", args.gradient_checkpointing,
               *(["--gpu-memory-gib", str(args.gpu_memory_gib)] if args.gpu_memory_gib else []),
               "--eval-samples", str(args.eval_samples)] + (["--validate"] if args.validate and impl == "ours" else [])
        cmd += ["--profile"] if args.profile else []
        cmd += ["--sync-debug"] if args.sync_debug else []
        cmd += ["--cudnn-sdpa", args.cudnn_sdpa, "--kernels", kernels]
        if args.py_spy:
            cmd = ["py-spy", "record", "--rate", "200", "--format", "raw", "--output", str(result_file.with_suffix(".pyspy.txt")), "--", *cmd]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
        process_wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-6000:], flush=True)
            report["cells"].append({"cell": spec, "error": proc.stderr[-2000:]})
            continue
        result = json.loads(result_file.read_text())
        result["process_wall_s"] = process_wall
        if args.py_spy and result_file.with_suffix(".pyspy.txt").is_file():
            summary = summarise_collapsed(result_file.with_suffix(".pyspy.txt"))
            result_file.with_suffix(".pyspy-summary.txt").write_text(summary)
        result_file.write_text(json.dumps(result, indent=1))
        report["cells"].append({"cell": spec, **{k: v for k, v in result.items() if k != "scores"}})
        if result.get("validation"):
            v = result["validation"]
            print(f"{spec}: validation {v['wall_s']:.1f} s ({v['configurations_measured']} configurations on "
                  f"{v['eval_samples']} held-out samples), phases " + ", ".join(f"{k} {t:.1f}" for k, t in v["phases_s"].items())
                  + f", peak {v['peak_memory']}; {v['verdict']}", flush=True)
        print(f"{spec}: process {process_wall:.1f} s, in-process {result['wall_s']:.1f} s, phases "
              + ", ".join(f"{k} {v:.1f}" for k, v in result["phases_s"].items())
              + f", peak {result['peak_memory']}, eff. {result['effective_tflops'] or 0:.1f} TFLOP/s", flush=True)
        (args.out / "bench_report.json").write_text(json.dumps(report, indent=1))
    print(render_table(report))
    return 0


def render_table(report: dict) -> str:
    from tabulate import tabulate

    rows = []
    for c in report["cells"]:
        if "error" in c:
            rows.append([c["cell"], "ERROR", "", "", "", "", ""])
            continue
        rows.append([
            c["cell"], f"{c['process_wall_s']:.1f}", f"{c['wall_s']:.1f}",
            " ".join(f"{k}={v:.1f}" for k, v in c["phases_s"].items()),
            c["peak_memory"].get("gpu_allocated_gib", c["peak_memory"].get("host_rss_gib")),
            f"{c['tokens_per_s']:.0f}" if c.get("tokens_per_s") else "",
            f"{c['effective_tflops']:.2f}" if c.get("effective_tflops") else "",
        ])
    return tabulate(rows, headers=["cell", "process s", "in-process s", "phases s", "peak GiB", "real tok/s", "floor TFLOP/s"], tablefmt="github")


if __name__ == "__main__":
    raise SystemExit(main())
