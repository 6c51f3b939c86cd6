"""AutoQuantize cells on tiny real-class checkpoints: planted sensitivity and cell semantics.

A text MLP is given an outlier input channel (INT8-fragile, function unchanged), a vision attention
projection likewise, and one text layer is made robust. The tests check that the cells rank them
where they must, that scopes mean what they say, and that the outputs carry what engineers read.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, MAX_PIXELS, MIN_PIXELS
from planting import plant_mlp_outlier, plant_robust, plant_vision_attn_outlier

from vlmsens.autoquant import CellSpec, run_autoquant
from vlmsens.batches import IGNORE_INDEX, PromptSettings, collate, encode_sample, encode_samples, make_batches
from vlmsens.calib import build_subset, read_calib_db
from vlmsens.cell import prepare_samples, rerender, run_cell
from vlmsens.families import get_family
from vlmsens.formats import format_registry, resolve_format
from vlmsens.models import load_processor

SETTINGS = PromptSettings("Describe this image in one sentence.", "Write a one-sentence caption for an everyday scene.", MIN_PIXELS, MAX_PIXELS)
PROMPTS = {
    "image_instruction": SETTINGS.image_instruction,
    "text_instruction": SETTINGS.text_instruction,
    "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS,
}
FRAGILE_TEXT = "model.language_model.layers.1.mlp.down_proj"
FRAGILE_VISION = "model.visual.blocks.1.attn.proj"
ROBUST_TEXT = "model.language_model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def subsets(demo_coco, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("subsets")
    dbs = {}
    for size, n in (("small", 8), ("large", 16)):
        build_subset(coco_root=demo_coco, split="train2017", size_name=size, num_samples=n, seed=0,
                     db_path=out / f"{size}.db", captions_path=out / f"{size}.txt")
        dbs[size] = out / f"{size}.db"
    return dbs


@pytest.fixture(scope="module")
def planted(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny checkpoints with a fragile text layer, a fragile vision layer, a robust layer."""
    import transformers

    out = {}
    for family, path in tiny_checkpoints.items():
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        plant_mlp_outlier(model, FRAGILE_TEXT.removesuffix(".down_proj"))
        plant_vision_attn_outlier(model, FRAGILE_VISION.removesuffix(".proj"))
        plant_robust(model, ROBUST_TEXT)
        target = tmp_path_factory.mktemp(f"planted_{family}")
        model.save_pretrained(target)
        load_processor(str(path)).save_pretrained(target)
        out[family] = target
    return out


def _cell(checkpoint, family, fmt, scope, samples, method="gradient", bits=8.5, state_path=None, formats=None):
    registry = format_registry(formats)
    spec = CellSpec(model=f"tiny_{family}", family=get_family(family), checkpoint=str(checkpoint), format_name=fmt,
                    formats=resolve_format(fmt, registry), scope=scope, size="small", effective_bits=bits,
                    method=method, batch_size=4, device="cpu")
    return run_autoquant(spec, samples, progress=lambda _: None, state_path=state_path)


_ENCODED: dict = {}


def _encoded(checkpoint, db, coco, scope):
    key = (str(checkpoint), str(db), scope)
    if key not in _ENCODED:
        samples, _ = read_calib_db(db)
        _ENCODED[key] = encode_samples(load_processor(str(checkpoint)), samples, coco, scope == "all-layers", SETTINGS)
    return _ENCODED[key]


def _ranking(result, fmt):
    groups = sorted(result["groups"], key=lambda g: -g["scores_per_token"][fmt])
    return [g["layer"] for g in groups]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", ["all-layers", "lm-only"])
def test_planted_text_layer_ranks_first_for_int8(planted, subsets, demo_coco, family, scope):
    samples = _encoded(planted[family], subsets["small"], demo_coco, scope)
    ranking = _ranking(_cell(planted[family], family, "wint8_aint8", scope, samples), "wint8_aint8")
    assert ranking[0] == FRAGILE_TEXT
    # The robust layer sits in the bottom quarter.
    assert ranking.index(ROBUST_TEXT) >= len(ranking) * 3 // 4


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_vision_layer_near_top_in_all_layers_and_absent_from_lm_only(planted, subsets, demo_coco, family):
    all_layers = _ranking(_cell(planted[family], family, "wint8_aint8", "all-layers",
                                _encoded(planted[family], subsets["small"], demo_coco, "all-layers")), "wint8_aint8")
    assert all_layers.index(FRAGILE_VISION) < 3
    lm_only = _cell(planted[family], family, "wint8_aint8", "lm-only", _encoded(planted[family], subsets["small"], demo_coco, "lm-only"))
    names = [g["layer"] for g in lm_only["groups"]]
    assert FRAGILE_VISION not in names
    assert not any(g["tower"] == "vision" for g in lm_only["groups"])
    assert FRAGILE_VISION in [g["layer"] for g in lm_only["excluded_groups"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_outlier_plant_is_int8_specific(planted, subsets, demo_coco, family):
    """FP8 keeps small channels next to an outlier, so the INT8 plant must not top the FP8 ranking."""
    samples = _encoded(planted[family], subsets["small"], demo_coco, "lm-only")
    ranking = _ranking(_cell(planted[family], family, "wfp8_afp8", "lm-only", samples), "wfp8_afp8")
    assert ranking[0] != FRAGILE_TEXT


@pytest.mark.parametrize("family", FAMILIES)
def test_every_vision_group_scores_nonzero_in_all_layers(tiny_checkpoints, subsets, demo_coco, family):
    samples = _encoded(tiny_checkpoints[family], subsets["small"], demo_coco, "all-layers")
    result = _cell(tiny_checkpoints[family], family, "wint8_aint8", "all-layers", samples)
    vision = [g for g in result["groups"] if g["tower"] == "vision"]
    assert len(vision) >= 8  # patch embed, 2 blocks x (qkv, proj, mlp...), merger(s)
    assert all(g["scores_raw"]["wint8_aint8"] > 0 for g in vision), [g["layer"] for g in vision if g["scores_raw"]["wint8_aint8"] <= 0]
    assert {g["tower"] for g in result["groups"]} == {"vision", "text", "head"}


def test_fp8_and_int8_raw_scores_differ_per_layer(tiny_checkpoints, subsets, demo_coco):
    family = "qwen2_5_vl"
    samples = _encoded(tiny_checkpoints[family], subsets["small"], demo_coco, "all-layers")
    result = _cell(tiny_checkpoints[family], family, "fp8_or_int8", "all-layers", samples,
                   formats={"fp8_or_int8": {"candidates": ["wfp8_afp8", "wint8_aint8"]}})
    for g in result["groups"]:
        raw = g["scores_raw"]
        assert set(raw) == {"wfp8_afp8", "wint8_aint8"}
        assert raw["wfp8_afp8"] != raw["wint8_aint8"], g["layer"]
        assert g["selected_format"] in {"wfp8_afp8", "wint8_aint8", "bf16"}
    # ModelOpt's clipped scores are monotone; ours are the raw values it clipped.
    assert any(g["scores_modelopt_clipped"] != g["scores_raw"] for g in result["groups"])
    check_raw_score_invariants(result)
    selected = {g["selected_format"] for g in result["groups"]}
    assert selected - {"bf16"}, "the solver selected no quantized format at all"


def test_calibration_sizes_give_different_scores(tiny_checkpoints, subsets, demo_coco):
    family = "qwen3_vl"
    small = _cell(tiny_checkpoints[family], family, "wint8_aint8", "all-layers", _encoded(tiny_checkpoints[family], subsets["small"], demo_coco, "all-layers"))
    large = _cell(tiny_checkpoints[family], family, "wint8_aint8", "all-layers", _encoded(tiny_checkpoints[family], subsets["large"], demo_coco, "all-layers"))
    assert small["batches"]["samples"] == 8 and large["batches"]["samples"] == 16
    assert large["search"]["num_score_steps"] == 2 * small["search"]["num_score_steps"]
    s = {g["layer"]: g["scores_per_token"]["wint8_aint8"] for g in small["groups"]}
    lg = {g["layer"]: g["scores_per_token"]["wint8_aint8"] for g in large["groups"]}
    assert s.keys() == lg.keys()
    assert sum(s[k] != lg[k] for k in s) == len(s)


def check_raw_score_invariants(result):
    """ModelOpt's clipped score is the running minimum of the raw scores in candidate order (BF16 last);
    the per-token score is the raw score over the caption tokens, exactly."""
    loss_tokens = result["batches"]["loss_tokens"]
    assert loss_tokens > 0
    for g in result["groups"]:
        raw, clipped = g["scores_raw"], g["scores_modelopt_clipped"]
        assert list(clipped) == list(raw)
        running = math.inf
        for fmt, score in raw.items():
            running = min(running, score)
            assert clipped[fmt] == running, (g["layer"], fmt)
        assert g["scores_per_token"] == {fmt: score / loss_tokens for fmt, score in raw.items()}


def _share_bits(result, group, fmt):
    """Effective bits one group adds when kept in BF16 instead of ``fmt``."""
    denominator = sum(g["uncompressed_cost"] for g in result["groups"])
    return 16.0 * (group["costs"]["bf16"] - group["costs"][fmt]) / denominator


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", ["all-layers", "lm-only"])
def test_achieved_bits_fill_the_target_with_the_most_sensitive_groups(planted, subsets, demo_coco, family, scope):
    """The solver spends the budget on scores: it reaches the target from below to within the share of
    the cheapest group it could still have kept in BF16, and keeps the planted group in BF16 when it fits.
    Quantizing everything (8 bits) meets every target here and fails both checks."""
    samples = _encoded(planted[family], subsets["small"], demo_coco, scope)
    for bits in (8.25, 9.0, 12.0):
        result = _cell(planted[family], family, "wint8_aint8", scope, samples, bits=bits)
        search = result["search"]
        check_raw_score_invariants(result)
        achieved = search["effective_bits_achieved"]
        assert search["is_satisfied"] and achieved <= bits + 1e-9
        denominator = sum(g["uncompressed_cost"] for g in result["groups"])
        assert achieved == pytest.approx(16.0 * sum(g["costs"][g["selected_format"]] for g in result["groups"]) / denominator)
        quantized = [g for g in result["groups"] if g["selected_format"] != "bf16"]
        cheapest = min(_share_bits(result, g, "wint8_aint8") for g in quantized)
        assert bits - achieved < cheapest, (bits, achieved, cheapest)
        fragile = next(g for g in result["groups"] if g["layer"] == FRAGILE_TEXT)
        if 8.0 + _share_bits(result, fragile, "wint8_aint8") <= bits:
            assert fragile["selected_format"] == "bf16", (bits, fragile["costs"])
    assert fragile["selected_format"] == "bf16"  # at 12 bits it fits


def test_lm_only_keeps_vision_out_of_the_budget(tiny_checkpoints, subsets, demo_coco):
    family = "qwen2_5_vl"
    result = _cell(tiny_checkpoints[family], family, "wint8_aint8", "lm-only", _encoded(tiny_checkpoints[family], subsets["small"], demo_coco, "lm-only"))
    assert result["search"]["disabled_layers"] == ["*visual*"]
    assert result["search"]["constraints"]["cost"] == {"excluded_module_name_patterns": ["*visual*"]}
    # Every group quantized at 8 bits: achieved bits are exactly 8 over the text tower alone,
    # which is only possible when the BF16 vision tower is outside the denominator.
    all8 = _cell(tiny_checkpoints[family], family, "wint8_aint8", "lm-only", _encoded(tiny_checkpoints[family], subsets["small"], demo_coco, "lm-only"), bits=8.0)
    assert all8["search"]["effective_bits_achieved"] == pytest.approx(8.0)
    assert all(g["selected_format"] == "wint8_aint8" for g in all8["groups"])


def test_kl_div_method_scores_the_planted_layer_first(planted, subsets, demo_coco, tmp_path):
    family = "qwen3_vl"
    state = tmp_path / "state.pt"
    samples = _encoded(planted[family], subsets["small"], demo_coco, "lm-only")
    result = _cell(planted[family], family, "wint8_aint8", "lm-only", samples, method="kl_div", state_path=str(state))
    assert result["search"]["method"] == "kl_div"
    assert torch.load(state, weights_only=False)["method"] == "kl_div"
    check_raw_score_invariants(result)
    ranking = _ranking(result, "wint8_aint8")
    assert ranking[0] == FRAGILE_TEXT
    assert ranking.index(ROBUST_TEXT) >= len(ranking) // 2
    kl = {g["layer"]: g["scores_raw"]["wint8_aint8"] for g in result["groups"]}
    assert all(math.isfinite(v) for v in kl.values())
    # Not the gradient method's numbers under another name.
    gradient = _cell(planted[family], family, "wint8_aint8", "lm-only", samples)
    assert kl != {g["layer"]: g["scores_raw"]["wint8_aint8"] for g in gradient["groups"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_the_caption_only(tiny_checkpoints, subsets, demo_coco, family):
    processor = load_processor(str(tiny_checkpoints[family]))
    samples, _ = read_calib_db(subsets["small"])
    for with_image in (True, False):
        enc = encode_sample(processor, samples[0], demo_coco, with_image, SETTINGS)
        kept = enc["labels"][enc["labels"] != IGNORE_INDEX]
        assert processor.tokenizer.decode(kept) == samples[0].caption
        assert ("pixel_values" in enc) == with_image
        if family == "qwen3_vl":
            assert enc["mm_token_type_ids"].shape == enc["input_ids"].shape
            assert int(enc["mm_token_type_ids"].sum()) > 0 if with_image else int(enc["mm_token_type_ids"].sum()) == 0


def test_batches_are_padded_to_their_own_longest_sample(tiny_checkpoints, subsets, demo_coco):
    samples = _encoded(tiny_checkpoints["qwen3_vl"], subsets["large"], demo_coco, "lm-only")
    batches = make_batches(samples, 4, pad_token_id=0)
    lengths = sorted(s["input_ids"].shape[0] for s in samples)
    assert [b["input_ids"].shape[1] for b in batches] == [lengths[i + 3] for i in range(0, len(lengths), 4)]
    assert max(b["input_ids"].shape[1] for b in batches) < 512
    one = collate(samples[:2], pad_token_id=0)
    assert one["labels"][one["attention_mask"] == 0].eq(IGNORE_INDEX).all()
    assert "mm_token_type_ids" in one


def test_cell_writes_outputs_and_rerenders_from_manifest_alone(tiny_checkpoints, subsets, demo_coco, tmp_path):
    family = "qwen2_5_vl"
    samples_path = tmp_path / "samples.pt"
    prepare_samples(checkpoint=str(tiny_checkpoints[family]), calib_db=str(subsets["small"]), coco_root=str(demo_coco),
                    scope="all-layers", inputs="image+caption", prompts=PROMPTS, out_path=str(samples_path), progress=lambda _: None)
    outputs = {k: str(tmp_path / "cell" / v) for k, v in (
        ("json", "per-layer-sensitivity.json"), ("markdown", "per-layer-sensitivity.md"),
        ("manifest", "quant_manifest.json"), ("state", "autoquant_state.pt"))}
    (tmp_path / "cell").mkdir()
    lines = []
    manifest = run_cell(model_name="tiny", model_cfg={"family": family}, checkpoint=str(tiny_checkpoints[family]),
                        format_name="wint8_aint8", formats_cfg={}, scope="all-layers", size="small",
                        autoquant_cfg={"method": "gradient", "effective_bits": {"wint8_aint8": 8.5}, "device": "cpu"},
                        batch_size=4, seed=0, samples_path=str(samples_path), calib_db=str(subsets["small"]),
                        outputs=outputs, progress=lines.append, job_started=time.time() - 5.0)
    for phase in ("load", "calibrate", "score", "solve"):
        assert any(line.startswith(f"{phase} done in") for line in lines), phase
    # Per-batch progress with an ETA: one format calibrates on every batch, then scores on every batch.
    n_batches = manifest["batches"]["batches"]
    assert n_batches >= 2
    for phase in ("calibrate", "score"):
        assert any(line.startswith(f"{phase}: batch {n_batches}/{n_batches}, {n_batches - 1} done in") and "ETA" in line
                   for line in lines), (phase, lines)
        assert any(line.startswith(f"{phase} done in") and f"({n_batches} batches," in line for line in lines), phase
    # Both are rounded to the millisecond on different clocks: equal up to that rounding when nothing ran in between.
    assert manifest["provenance"]["job_wall_s"] >= manifest["provenance"]["wall_time_s"] + 5.0 - 0.002
    assert any(line.startswith("write: done") for line in lines)
    payload = json.loads(Path(outputs["json"]).read_text())
    assert list(payload) == ["scheme", "model", "dataset", "quantization", "autoquant_state", "layer_sensitivity"]
    assert set(payload["autoquant_state"]) >= {"constraints", "score", "is_satisfied"}
    rows = payload["layer_sensitivity"]
    assert list(rows[0])[:4] == ["layer", "num_bits", "sensitivity", "size_cost"]
    assert all(not r["layer"].endswith(".quant_recipe") for r in rows)
    assert [r["sensitivity"] for r in rows] == sorted((r["sensitivity"] for r in rows), reverse=True)
    assert {r["num_bits"] for r in rows} <= {8.0, 16.0}
    assert all((r["num_bits"] == 16.0) == (r["selected_format"] == "bf16") for r in rows)
    md = Path(outputs["markdown"]).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Layer"))
    assert [c.strip() for c in header.split("|")[1:5]] == ["Layer", "Num Bits", "Sensitivity", "Size Cost"]
    for key in ("Effective bits target", "Effective bits achieved", "Constraint satisfied", "Samples used", "Tokens", "Wall time"):
        assert f"| {key}" in md, key
    prov = manifest["provenance"]
    assert {"packages", "git", "inputs_sha256", "wall_time_s"} <= set(prov)
    assert prov["packages"]["nvidia-modelopt"] == "0.47.0"
    # the samples read counts as the cell's work (a job's wall less it is start-up), before the load
    assert list(manifest["timings_s"]) == ["read", "load", "calibrate", "score", "solve"]
    from vlmsens.io import sha256_file  # checksums hashed on a thread beside the cell: the files' own

    assert prov["inputs_sha256"] == {"samples": sha256_file(samples_path), "calib_db": sha256_file(subsets["small"])}
    assert "host_rss_gib" in manifest["peak_memory"]

    # The report-only path: the manifest alone reproduces both files byte for byte.
    before = {k: Path(outputs[k]).read_bytes() for k in ("json", "markdown")}
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(outputs["manifest"], only / "quant_manifest.json")
    rerender(str(only / "quant_manifest.json"), str(only / "a.json"), str(only / "a.md"))
    assert (only / "a.json").read_bytes() == before["json"]
    assert (only / "a.md").read_bytes() == before["markdown"]


def test_results_are_deterministic(tiny_checkpoints, subsets, demo_coco):
    family = "qwen2_5_vl"
    samples = _encoded(tiny_checkpoints[family], subsets["small"], demo_coco, "all-layers")
    a = _cell(tiny_checkpoints[family], family, "wint8_aint8", "all-layers", samples)
    b = _cell(tiny_checkpoints[family], family, "wint8_aint8", "all-layers", samples)
    assert [g["scores_raw"] for g in a["groups"]] == [g["scores_raw"] for g in b["groups"]]
    assert [g["selected_format"] for g in a["groups"]] == [g["selected_format"] for g in b["groups"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_varlen_vision_attention_computes_the_same_function(tiny_checkpoints, subsets, demo_coco, family):
    """One SDPA call over padded windows equals transformers' per-window loop, forward and backward."""
    import transformers

    from vlmsens.attention import NAME, use_for_vision

    samples = _encoded(tiny_checkpoints[family], subsets["small"], demo_coco, "all-layers")
    batch = {k: v for k, v in make_batches(samples, 4, pad_token_id=0)[0].items() if k != "labels"}
    models = []
    for varlen in (False, True):
        model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[family], attn_implementation="sdpa", local_files_only=True)
        if varlen:
            assert use_for_vision(model) and model.config.vision_config._attn_implementation == NAME
        model.eval()
        out = model(**batch).logits
        out.float().square().mean().backward()
        models.append((model, out.detach()))
    (ref, ref_out), (new, new_out) = models
    assert torch.allclose(ref_out, new_out, atol=1e-5, rtol=1e-4)
    g_ref = ref.model.visual.blocks[0].attn.qkv.weight.grad
    g_new = new.model.visual.blocks[0].attn.qkv.weight.grad
    assert (g_ref - g_new).norm() / g_ref.norm() < 1e-4


def _reference_kernels(calls):
    """Eager stand-ins for the fused kernels, on CPU: the same math as transformers', each call counted."""
    from vlmsens.kernels import Kernels

    def rotate(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def rms_norm(x, weight, eps):
        calls["rms_norm"] += 1
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def silu_mul(gate, up):
        calls["silu_mul"] += 1
        return torch.nn.functional.silu(gate) * up

    def rope(q, k, cos, sin, unsqueeze_dim=1):
        calls["rope"] += 1
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    def rope_vision(q, k, cos, sin):
        calls["rope_vision"] += 1
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        return tuple((t.float() * cos + rotate(t.float()) * sin).to(t.dtype) for t in (q, k))

    return Kernels("reference", "cpu", rms_norm, silu_mul, rope, rope_vision)


def test_vision_rope_from_a_text_layout_rope_equals_transformers():
    """The vision tower's rotary embedding built from a text-layout one (as Liger's kernel is called)
    equals transformers' own, in bf16 as the GPU jobs run it: the layout glue is right."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, apply_rotary_pos_emb_vision

    from vlmsens.kernels import vision_rope

    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(37, 4, 16, generator=generator).to(torch.bfloat16) for _ in range(2))
    angles = torch.randn(37, 8, generator=generator)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    expected = apply_rotary_pos_emb_vision(q, k, cos, sin)
    got = vision_rope(apply_rotary_pos_emb)(q, k, cos, sin)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    assert not torch.equal(got[0], q)  # it rotated


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_kernels_replace_every_norm_mlp_and_rotary_call(tiny_checkpoints, subsets, demo_coco, family):
    """`kernels.fuse` routes each RMSNorm, SiLU-gated MLP and rotary embedding of both towers through the
    kernels, once per module and forward, with transformers' argument layout: stand-ins with the same
    math give the same logits. Models on another device type, or fused with `eager`, run as shipped."""
    from collections import Counter

    from vlmsens.errors import VlmsensError
    from vlmsens.kernels import fuse, restore
    from vlmsens.models import load_model

    samples = _encoded(tiny_checkpoints[family], subsets["small"], demo_coco, "all-layers")
    batch = {k: v for k, v in make_batches(samples, 4, pad_token_id=0)[0].items() if k != "labels"}
    model = load_model(str(tiny_checkpoints[family]), "cpu")
    assert model.vlmsens_kernels == {"kernels": "eager", "fused": {}}  # liger applies on CUDA only
    with torch.no_grad():
        shipped = model(**batch).logits
    text, vision = model.config.text_config, model.config.vision_config
    calls = Counter()
    try:
        counts = fuse(model, _reference_kernels(calls))
        with torch.no_grad():
            fused = model(**batch).logits
        one_forward = dict(calls)
        other = load_model(str(tiny_checkpoints[family]), "cpu", kernels="eager")
        before = sum(calls.values())
        with torch.no_grad():
            other(**batch)
        assert sum(calls.values()) - before == text.num_hidden_layers + vision.depth  # only the shared rotary functions
        restore("cpu")
        with torch.no_grad():
            other(**batch)
        assert sum(calls.values()) - before == text.num_hidden_layers + vision.depth
    finally:
        restore()
    torch.testing.assert_close(fused, shipped, atol=1e-5, rtol=1e-5)
    norms_per_text_layer = 4 if family == "qwen3_vl" else 2  # Qwen3 adds per-head q and k norms
    expected = {
        "rms_norm": norms_per_text_layer * text.num_hidden_layers + 1 + (2 * vision.depth + 1 if family == "qwen2_5_vl" else 0),
        "silu_mul": text.num_hidden_layers + (vision.depth if family == "qwen2_5_vl" else 0),
        "rope": text.num_hidden_layers,
        "rope_vision": vision.depth,
    }
    assert counts == expected
    assert one_forward == expected  # one call per fused module in one forward
    with pytest.raises(VlmsensError, match="autoquant.kernels"):  # before any weight is read
        load_model(str(tiny_checkpoints[family] / "absent"), "cpu", kernels="triton")


def test_fused_kernels_that_cannot_be_imported_end_in_one_clear_line(tiny_checkpoints, monkeypatch):
    """A CUDA job whose Liger Kernel (or Triton) is missing says which setting avoids it, before any work."""
    import vlmsens.kernels
    from vlmsens.errors import VlmsensError
    from vlmsens.models import load_model

    def missing():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(vlmsens.kernels, "liger", missing)
    model = load_model(str(tiny_checkpoints["qwen3_vl"]), "cpu", kernels="eager")
    with pytest.raises(VlmsensError, match=r"set autoquant.kernels: eager") as err:
        vlmsens.kernels.use(model, "liger", "cuda")
    assert "No module named 'triton'" in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_positions_computed_once_equal_the_models_own(tiny_checkpoints, subsets, demo_coco, family):
    """The batch's stored multimodal RoPE positions give the same logits as transformers' per-forward ones."""
    from vlmsens.autoquant import add_rope_positions
    from vlmsens.models import load_model

    samples = _encoded(tiny_checkpoints[family], subsets["small"], demo_coco, "all-layers")
    batch = {k: v for k, v in make_batches(samples, 4, pad_token_id=0)[0].items() if k != "labels"}
    model = load_model(str(tiny_checkpoints[family]), "cpu")
    with torch.no_grad():
        own = model(**batch).logits
        add_rope_positions(model, batch)
        assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
        # image tokens carry 2-D positions: the three RoPE axes differ somewhere
        assert not torch.equal(batch["position_ids"][1], batch["position_ids"][0])
        stored = model(**batch).logits
    assert torch.equal(own, stored)


def test_deferred_check_calibrators_keep_scores_and_selection(planted, subsets, demo_coco, monkeypatch):
    """The cell's sync-free calibrators are installed on every quantizer and change no number."""
    import vlmsens.autoquant
    import vlmsens.calibration

    family = "qwen3_vl"
    samples = _encoded(planted[family], subsets["small"], demo_coco, "all-layers")
    installed = []
    real_install = vlmsens.calibration.install
    monkeypatch.setattr(vlmsens.autoquant, "install_calibrators", lambda model: installed.append(real_install(model)))
    both = {"fp8_or_int8": {"candidates": ["wfp8_afp8", "wint8_aint8"]}}
    ours = _cell(planted[family], family, "fp8_or_int8", "all-layers", samples, formats=both)
    monkeypatch.setattr(vlmsens.autoquant, "install_calibrators", lambda model: 0)
    stock = _cell(planted[family], family, "fp8_or_int8", "all-layers", samples, formats=both)
    assert sum(installed) > 100  # input and weight quantizers of every format's search copies
    for a, b in zip(ours["groups"], stock["groups"], strict=True):
        assert a["layer"] == b["layer"] and a["scores_raw"] == b["scores_raw"] and a["selected_format"] == b["selected_format"]


def test_varlen_vision_attention_keeps_the_scores(planted, subsets, demo_coco):
    family = "qwen2_5_vl"  # windowed vision attention: many pieces per image
    samples = _encoded(planted[family], subsets["small"], demo_coco, "all-layers")
    results = {}
    for attention in ("sdpa", "varlen"):
        spec = CellSpec(model="tiny", family=get_family(family), checkpoint=str(planted[family]), format_name="wint8_aint8",
                        formats=resolve_format("wint8_aint8", format_registry({})), scope="all-layers", size="small",
                        effective_bits=8.5, batch_size=4, device="cpu", vision_attention=attention)
        results[attention] = run_autoquant(spec, samples, progress=lambda _: None)
    assert results["varlen"]["vision_attention"] != results["sdpa"]["vision_attention"]
    a = {g["layer"]: g["scores_raw"]["wint8_aint8"] for g in results["sdpa"]["groups"]}
    b = {g["layer"]: g["scores_raw"]["wint8_aint8"] for g in results["varlen"]["groups"]}
    assert a.keys() == b.keys()
    for layer in a:
        assert b[layer] == pytest.approx(a[layer], rel=1e-3, abs=1e-12), layer
    assert _ranking(results["sdpa"], "wint8_aint8")[:3] == _ranking(results["varlen"], "wint8_aint8")[:3]


def test_gradient_checkpointing_off_keeps_the_scores(planted, subsets, demo_coco):
    """Checkpointing only trades memory for a recomputed forward: the scores must not move."""
    family = "qwen3_vl"
    samples = _encoded(planted[family], subsets["small"], demo_coco, "all-layers")
    results = {}
    for enabled in (True, False):
        spec = CellSpec(model="tiny", family=get_family(family), checkpoint=str(planted[family]), format_name="wint8_aint8",
                        formats=resolve_format("wint8_aint8", format_registry({})), scope="all-layers", size="small",
                        effective_bits=8.5, batch_size=4, device="cpu", gradient_checkpointing=enabled)
        with pytest.warns() as caught:
            results[enabled] = run_autoquant(spec, samples, progress=lambda _: None)
        enabled_message = any("Enabling gradient checkpointing" in str(w.message) for w in caught)
        assert enabled_message == enabled
        assert results[enabled]["search"]["gradient_checkpointing"] is enabled
    a = {g["layer"]: g["scores_raw"]["wint8_aint8"] for g in results[True]["groups"]}
    b = {g["layer"]: g["scores_raw"]["wint8_aint8"] for g in results[False]["groups"]}
    assert a.keys() == b.keys() and len(a) > 10
    for layer in a:
        assert b[layer] == pytest.approx(a[layer], rel=1e-4, abs=1e-12), layer


def _held_differences(model) -> int:
    """Bytes of ModelOpt's per-module Q(Y) - Y stores still alive."""
    return sum(t.numel() * t.element_size() for m in model.modules()
               for per_recipe in getattr(m, "output_diff_dict", {}).values() for t in per_recipe.values())


def test_score_differences_are_freed_once_scored_and_keep_the_scores(planted, subsets, demo_coco, monkeypatch):
    """ModelOpt keeps every module's Q(Y) - Y until the next batch and after the search; the cell
    frees each once its backward hook used it. Same scores, bit for bit; nothing held between batches."""
    import vlmsens.autoquant

    family = "qwen2_5_vl"
    samples = _encoded(planted[family], subsets["small"], demo_coco, "all-layers")
    held: dict = {}
    real_load, real_batch = vlmsens.autoquant.load_cell_model, vlmsens.autoquant.PhaseClock.batch

    def load(spec, samples, clock):
        loaded = real_load(spec, samples, clock)
        held["model"] = loaded[0]
        return loaded

    def batch(clock, phase):
        if phase == "score":
            held["between_batches"].append(_held_differences(held["model"]))
        real_batch(clock, phase)

    monkeypatch.setattr(vlmsens.autoquant, "load_cell_model", load)
    monkeypatch.setattr(vlmsens.autoquant.PhaseClock, "batch", batch)
    runs = {}
    for mode in ("stock", "released"):
        if mode == "stock":
            monkeypatch.setattr(vlmsens.autoquant.ScoreDiffRelease, "attach", lambda self, model: 0)
        else:
            monkeypatch.undo()
            monkeypatch.setattr(vlmsens.autoquant, "load_cell_model", load)
            monkeypatch.setattr(vlmsens.autoquant.PhaseClock, "batch", batch)
        held["between_batches"] = []
        result = _cell(planted[family], family, "wint8_aint8", "all-layers", samples)
        runs[mode] = (result, held["between_batches"], _held_differences(held["model"]))
    stock, released = runs["stock"], runs["released"]
    assert len(stock[1]) == 2 and stock[1][0] == 0  # 8 samples, batch 4: two score batches
    assert stock[1][1] > 0 and stock[2] > 0  # the stock search holds them into the next batch and after
    assert released[1] == [0, 0] and released[2] == 0
    for a, b in zip(stock[0]["groups"], released[0]["groups"], strict=True):
        assert a["layer"] == b["layer"] and a["scores_raw"] == b["scores_raw"] and a["selected_format"] == b["selected_format"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_only_search_makes_image_features_once_per_batch_and_keeps_the_scores(planted, subsets, demo_coco, family,
                                                                                 monkeypatch):
    """lm-only neither quantizes nor scores the vision tower: it runs once per batch (not in every
    calibration, score and recomputation pass), and the text tower's scores are unchanged."""
    import vlmsens.autoquant
    from vlmsens.vision_reuse import VisionFeatures

    samples = _encoded(planted[family], subsets["small"], demo_coco, "all-layers")  # image+caption
    tower_calls: list[int] = []
    real_load = vlmsens.autoquant.load_cell_model

    def load(spec, samples, clock):
        loaded = real_load(spec, samples, clock)
        loaded[0].model.visual.register_forward_hook(lambda *_: tower_calls.__setitem__(-1, tower_calls[-1] + 1))
        return loaded

    class NoReuse(VisionFeatures):
        def __init__(self, model):
            super().__init__(model)
            self.supported = False

    monkeypatch.setattr(vlmsens.autoquant, "load_cell_model", load)
    results = {}
    for reuse in (False, True):
        if not reuse:
            monkeypatch.setattr(vlmsens.autoquant, "VisionFeatures", NoReuse)
        else:
            monkeypatch.setattr(vlmsens.autoquant, "VisionFeatures", VisionFeatures)
        tower_calls.append(0)
        results[reuse] = _cell(planted[family], family, "wint8_aint8", "lm-only", samples)
    n_batches = results[True]["batches"]["batches"]
    assert n_batches == 2 and tower_calls[1] == n_batches  # once per batch for the whole search
    assert tower_calls[0] == 2 * n_batches  # a calibration and a score forward per batch, the score one with backward and block recomputation
    a = {g["layer"]: g["scores_raw"]["wint8_aint8"] for g in results[False]["groups"]}
    b = {g["layer"]: g["scores_raw"]["wint8_aint8"] for g in results[True]["groups"]}
    assert a.keys() == b.keys() and len(a) > 5 and not any("visual" in layer for layer in a)
    for layer in a:
        assert b[layer] == pytest.approx(a[layer], rel=1e-5, abs=1e-12), layer
    assert [g["selected_format"] for g in results[False]["groups"]] == [g["selected_format"] for g in results[True]["groups"]]


def _amax(model) -> dict[str, torch.Tensor]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: m.amax.detach().clone() for name, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and getattr(m, "_amax", None) is not None}


@pytest.mark.parametrize("method", ["gradient", "kl_div"])
def test_restored_search_has_the_cells_amax_and_runs_no_forward(planted, subsets, demo_coco, method, tmp_path):
    """validate and ladder re-create the cell's quantized model from its saved search state: the same
    amax for every quantizer, with no forward at all (a kl_div cell's per-group passes included)."""
    from vlmsens.autoquant import PhaseClock, load_cell_model, load_search_state, load_spec_model, save_search_state, search
    from vlmsens.validation import RecipeSwitch

    family = "qwen2_5_vl"
    samples = _encoded(planted[family], subsets["small"], demo_coco, "all-layers")
    spec = CellSpec(model="tiny", family=get_family(family), checkpoint=str(planted[family]), format_name="wint8_aint8",
                    formats=resolve_format("wint8_aint8", format_registry({})), scope="all-layers", size="small",
                    effective_bits=8.5, method=method, batch_size=4, device="cpu")
    clock = PhaseClock(lambda _: None)
    amax, forwards = {}, {}
    for restored in (False, True):
        if restored:
            model, *_ = load_spec_model(spec, clock)
        else:
            model, calib, *_ = load_cell_model(spec, samples, clock)
        calls = []
        model.model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        if restored:
            model, state, *_ = search(model, spec, [], clock, restore=load_search_state(tmp_path / "state.pt"))
        else:
            model, state, *_ = search(model, spec, calib, clock)
            save_search_state(state, tmp_path / "state.pt")
        layers = [name.removesuffix(".quant_recipe") for name, stat in state["candidate_stats"].items() if len(stat["formats"]) > 1]
        RecipeSwitch(model, spec.formats, layers).apply(dict.fromkeys(layers, "wint8_aint8"))  # every group quantized
        amax[restored], forwards[restored] = _amax(model), len(calls)
    assert forwards[True] == 0
    assert forwards[False] >= 2 * len(calib)  # the cell calibrated and scored
    assert amax[True].keys() == amax[False].keys() and len(amax[True]) > 20
    for name, value in amax[False].items():
        assert torch.equal(value, amax[True][name]), name
