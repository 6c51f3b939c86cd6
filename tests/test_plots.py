"""Plots at the size a user sees them: manifests shaped like Qwen2.5-VL-3B (276 groups) and
Qwen3-VL-4B (250 groups) cells, with the real module names (tests/fullsize.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fullsize import GROUPS, MODELS, model_manifests
from PIL import Image

from vlmsens.config import ship_this_settings
from vlmsens.reports import heatmap, sensitivity_plot
from vlmsens.reports.frames import layers_frame
from vlmsens.reports.network import network_layout
from vlmsens.reports.registry import Job

SIZES = ["small", "large"]
FORMATS = ["wfp8_afp8", "wint8_aint8"]


@pytest.fixture(scope="module", params=sorted(MODELS))
def full_model(request, tmp_path_factory):
    """(family, model name, layers frame, manifest paths) of a full-size model over 2 formats × 2 scopes × 2 sizes."""
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    manifests = model_manifests(family, SIZES, FORMATS)
    paths = []
    for i, m in enumerate(manifests):
        path = folder / f"cell{i}.json"
        path.write_text(json.dumps(m))
        paths.append(str(path))
    return family, MODELS[family], layers_frame(manifests), paths


def test_full_size_layout_places_each_group_once_by_tower_and_block(full_model):
    family, _, layers, _ = full_model
    all_layers = layers[layers["scope"] == "all-layers"]
    assert all_layers.groupby(["format", "size"])["layer"].nunique().eq(GROUPS[family]).all()
    layout = network_layout(layers)
    positions = layout.positions.set_index("layer")
    assert len(positions) == GROUPS[family] and positions["x"].is_unique
    labels = [label for _, label in layout.ticks]
    depth = 32 if family == "qwen2_5_vl" else 24
    for label in ("v0", f"v{depth - 1}", "t0", "t35", "lm_head", "merger", "patch"):
        assert label in labels, (label, labels)
    if family == "qwen3_vl":
        assert {"ds0", "ds1", "ds2"} <= set(labels)
    # Towers in network order, blocks ascending within each; sublayers of a block next to each other.
    vision, text, head = layout.spans["vision"], layout.spans["text"], layout.spans["head"]
    assert vision[1] < text[0] and text[1] < head[0]
    x = positions["x"]
    assert x["model.language_model.layers.0.mlp.down_proj"] < x["model.language_model.layers.1.self_attn.q_proj"]
    assert abs(x["model.language_model.layers.7.self_attn.o_proj"] - x["model.language_model.layers.7.mlp.down_proj"]) < 0.5
    assert x["model.visual.patch_embed.proj"] < x["model.visual.blocks.0.attn.qkv"] < vision[1]


def test_full_size_sensitivity_plot_same_x_across_scopes_and_hover(full_model, tmp_path):
    family, model, layers, paths = full_model
    job = Job(paths, {"png": str(tmp_path / "s.png"), "html": str(tmp_path / "s.html")}, {"model": model},
              {"size_order": SIZES, "format_order": FORMATS})
    sensitivity_plot.write(job)
    with Image.open(tmp_path / "s.png") as image:
        width, height = image.size
    assert width >= 1500 and height >= 4 * 250  # wide enough for 70+ slots, a readable panel per format × scope
    page = (tmp_path / "s.html").read_text()
    assert "<script src=" not in page and "plotly" in page.lower()  # self-contained: plotly.js inlined

    figure = sensitivity_plot.interactive_figure(layers, model, SIZES, FORMATS)
    titles = [a.text for a in figure.layout.annotations]
    assert titles == [f"{f} · {s}" for f in FORMATS for s in ("lm-only", "all-layers")]
    by_panel: dict[str, dict[str, float]] = {}
    for trace in figure.data:
        panel, size = trace.hovertemplate.split("<br>")[-1].split("<extra>")[0].rsplit(" · ", 1)
        if size != "large":
            assert trace.visible == "legendonly"
            continue
        names = [c[0] for c in trace.customdata]
        by_panel.setdefault(panel, {}).update(zip(names, trace.x, strict=True))
        assert all(len(c) == 4 and isinstance(c[2], str) for c in trace.customdata)  # name, rank, selected, score
    n_text = GROUPS[family] - (131 if family == "qwen2_5_vl" else 105)
    for fmt in FORMATS:
        lm_only, all_layers = by_panel[f"{fmt} · lm-only"], by_panel[f"{fmt} · all-layers"]
        assert len(lm_only) == n_text and len(all_layers) == GROUPS[family]
        assert all(all_layers[name] == x for name, x in lm_only.items())  # the same group at the same place


def test_full_size_heatmaps_share_rows_columns_and_one_colour_scale(full_model, tmp_path):
    family, model, layers, paths = full_model
    job = Job(paths, {"png": str(tmp_path / "h.png"), "html": str(tmp_path / "h.html"), "csv": str(tmp_path / "h.csv")},
              {"model": model}, {"size_order": SIZES, "format_order": FORMATS})
    heatmap.write(job)
    figure = heatmap.interactive_figure(layers, model, SIZES, FORMATS)
    traces = list(figure.data)
    assert len(traces) == 8 and {t.coloraxis for t in traces} == {"coloraxis"}
    lo, hi = heatmap.color_range(layers)
    assert (figure.layout.coloraxis.cmin, figure.layout.coloraxis.cmax) == (lo, hi)
    finite = np.concatenate([np.asarray(t.z, dtype=float).ravel() for t in traces])
    finite = finite[np.isfinite(finite)]
    assert finite.min() == pytest.approx(lo) and finite.max() == pytest.approx(hi)
    rows = {tuple(t.y) for t in traces}
    columns = {tuple(t.x) for t in traces}
    assert len(rows) == 1 and len(columns) == 1  # every panel has the model's rows and columns
    n_rows = 12 if family == "qwen2_5_vl" else 14  # vision sublayers + 4 text + lm_head
    assert len(next(iter(rows))) == n_rows
    assert next(iter(columns)) == tuple([str(b) for b in range(36)] + [heatmap.NO_BLOCK])
    # Each searched group's hover names it with its score, rank and selected format.
    hover = "\n".join(str(c) for t in traces for c in np.asarray(t.customdata).ravel())
    assert "layers.35.mlp.down_proj</b> score" in hover and "rank" in hover and "selected" in hover
    long = heatmap.heatmap_long(layers, SIZES, FORMATS)
    assert long.groupby(["format", "scope", "size"])["score"].count().max() <= GROUPS[family]
    with Image.open(tmp_path / "h.png") as image:
        assert image.size[1] > 8 * 150  # a readable panel per cell


def _job(analysis, paths, folder, model):
    outputs = {o.key: str(folder / o.path.format(model=model, format="f", scope="s", size="z")) for o in analysis.outputs}
    for path in outputs.values():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Job(paths, outputs, {"model": model} if analysis.level == "model" else {},
               {"size_order": SIZES, "format_order": FORMATS, "ship_this": ship_this_settings({})}, named={"manifests": paths})


def test_every_manifest_analysis_writes_readable_outputs_at_full_size(full_model, tmp_path):
    """Every analysis that reads manifests, run on one full-size model: each PNG is drawn at a size a
    screen can show, each page names the model's groups."""
    from vlmsens.reports.registry import analyses

    family, model, _, paths = full_model
    ran = []
    for name, analysis in analyses().items():
        if analysis.kinds_read not in (("manifests",), ("manifests", "validations")) or analysis.level == "cell":
            continue
        job = _job(analysis, paths, tmp_path / name, model)
        analysis.write(job)
        ran.append(name)
        for key, path in job.outputs.items():
            assert Path(path).stat().st_size > 0, (name, key)
            if path.endswith(".png"):
                with Image.open(path) as image:
                    width, height = image.size
                assert 400 < width <= 4000 and 200 < height <= 6000, (name, key, image.size)
    assert {"sensitivity_plot", "heatmap", "format_comparison", "scope_comparison", "towers", "rank_stability",
            "report", "front_page", "ship_this"} <= set(ran)


def test_cell_table_lists_every_group_of_a_full_size_cell(full_model):
    from vlmsens.reports.cell_table import cell_table, cell_table_doc

    family, _, _, paths = full_model
    manifest = json.loads(Path(paths[-1]).read_text())  # all-layers
    table = cell_table(manifest)
    assert len(table) == GROUPS[family] and list(table["rank"]) == list(range(1, GROUPS[family] + 1))
    assert table["score / token"].is_monotonic_decreasing
    page = cell_table_doc(manifest).to_html()
    assert page.count("<tr>") == GROUPS[family] + 1 and 'class="table-scroll"' in page


def test_front_page_says_what_was_run_and_the_verdicts():
    from vlmsens.reports.front_page import front_page

    manifests = model_manifests("qwen3_vl", SIZES, FORMATS)
    manifests[1]["search"]["is_satisfied"] = False
    for m in manifests:
        m["provenance"]["job_wall_s"] = 125.0
    validations = [{"verdict": "ranking predicts damage: ρ = 0.8"}] * 5 + [{"verdict": "inconclusive: ρ = 0.1 [-0.3, 0.5]"}] * 3
    page = front_page(manifests, validations, SIZES, FORMATS, validation_enabled=True).to_markdown()
    assert "**8 cells** = 1 models (`Qwen3-VL-4B-Instruct`) × 2 formats (`wfp8_afp8`, `wint8_aint8`) × 2 scopes " \
           "(lm-only, all-layers) × 2 calibration sizes (small (128 samples), large (128 samples))." in page
    assert "Device: NVIDIA H100 80GB HBM3 (8 cells). Cell jobs: 16 min 40 s in all, the longest 2 min 05 s " \
           "(from each job's process start)." in page
    assert "Bit budget: 7 of 8 cells reached it; missed by Qwen3-VL-4B-Instruct/wfp8_afp8/lm-only/large." in page
    assert "Ranking vs measured damage: ranking predicts damage in 5 of 8 cells; inconclusive in 3 of 8 cells." in page
    assert "Held-out validation: 8 of 8 cells." in page
    rst = front_page(manifests, [], SIZES, FORMATS, validation_enabled=False).to_rst()
    assert "Held-out validation: not run (``validation.enabled`` is false)." in rst and "Ranking vs" not in rst
