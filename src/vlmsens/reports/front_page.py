"""The report's front page: what was run and the verdicts, in a few lines.

Written as Markdown and HTML (first item of the Summary) and as reStructuredText, which the
Snakefile's ``report:`` directive shows on the landing page of ``snakemake --report`` once it exists.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .doc import Doc
from .frames import SCOPES, layers_frame, ordered, short_name
from .registry import Analysis, Job, Output, register
from .report import job_wall_s


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def _grid_line(manifests: list[dict[str, Any]], size_order: list[str], format_order: list[str]) -> str:
    cells = [m["cell"] for m in manifests]
    models = ordered({c["model"] for c in cells}, [])
    formats = ordered({c["format"] for c in cells}, format_order)
    scopes = ordered({c["scope"] for c in cells}, SCOPES)
    samples = {m["cell"]["size"]: m["batches"]["samples"] for m in manifests}
    sizes = [f"{s} ({samples[s]} samples)" for s in ordered(samples, size_order)]
    return (f"**{len(cells)} cells** = {len(models)} models ({', '.join(f'`{m}`' for m in models)}) × {len(formats)} formats "
            f"({', '.join(f'`{f}`' for f in formats)}) × {len(scopes)} scopes ({', '.join(scopes)}) × {len(sizes)} calibration "
            f"sizes ({', '.join(sizes)}).")


def front_page(manifests: list[dict[str, Any]], validations: list[dict[str, Any]], size_order: list[str],
               format_order: list[str], validation_enabled: bool) -> Doc:
    doc = Doc("vlmsens: what was run and what it says")
    if not manifests:
        return doc.not_applicable("no cell has finished; run the workflow first")
    doc.heading("What was run")
    targets = sorted({m["search"]["effective_bits_target"] for m in manifests})
    methods = sorted({m["search"].get("method", "gradient") for m in manifests})
    devices = Counter(str(m["device"].get("name")) for m in manifests)
    walls = [job_wall_s(m) for m in manifests]
    doc.bullets([
        _grid_line(manifests, size_order, format_order),
        "AutoQuantize (" + ", ".join(methods) + " method) at an effective-bits target of "
        + ", ".join(f"{t:g}" for t in targets) + " bits; each group scored with the loss on caption tokens.",
        "Device: " + "; ".join(f"{name} ({n} cells)" for name, n in devices.most_common())
        + f". Cell jobs: {_duration(sum(walls))} in all, the longest {_duration(max(walls))}"
        + (" (from each job's process start)." if all("job_wall_s" in m.get("provenance", {}) for m in manifests) else "."),
        (f"Held-out validation: {len(validations)} of {len(manifests)} cells." if validation_enabled
         else "Held-out validation: not run (`validation.enabled` is false)."),
    ])
    doc.heading("Verdicts")
    missed = [m["cell"] for m in manifests if not m["search"]["is_satisfied"]]
    verdicts = [
        f"Bit budget: all {len(manifests)} cells reached it." if not missed else
        f"Bit budget: {len(manifests) - len(missed)} of {len(manifests)} cells reached it; missed by "
        + ", ".join("/".join(c[k] for k in ("model", "format", "scope", "size")) for c in missed) + "."
    ]
    if validations:
        classes = Counter(v["verdict"].split(":")[0].strip() for v in validations)
        verdicts.append("Ranking vs measured damage: " + "; ".join(f"{text} in {n} of {len(validations)} cells"
                                                                 for text, n in classes.most_common()) + ".")
    layers = layers_frame(manifests)
    for model, part in layers.groupby("model", sort=True):
        first = part[part["rank"] == 1]["layer"].map(short_name).value_counts()
        verdicts.append(f"`{model}`: the most sensitive group in most cells is `{first.index[0]}` "
                        f"(first in {first.iloc[0]} of {part[['format', 'scope', 'size']].drop_duplicates().shape[0]} cells).")
    doc.bullets(verdicts)
    doc.heading("Method")
    doc.para("Each cell calibrates on COCO image+caption samples (`all-layers`) or captions only (`lm-only`: the vision "
             "tower outside the search and the bit budget), scores every AutoQuantize group with the loss on caption "
             "tokens, and lets ModelOpt's solver pick a format per group at the effective-bits target. Validation "
             "quantizes the groups a cell ranks most and least sensitive on held-out samples and measures the damage.")
    doc.heading("Reading order")
    doc.para("Results are numbered: the Summary (this page, every cell's outcome, the validation verdicts), then what "
             "to ship where the grid gives it, then one category per model (sensitivity by group, heatmaps, the layer "
             "table of every cell, recipes per budget, rank stability, format and scope comparisons, towers, "
             "validation), then the comparison of model families. Every table is also a CSV under `reports/`.")
    return doc


def write(job: Job) -> None:
    manifests = [json.loads(Path(p).read_text()) for p in job.named.get("manifests", job.inputs)]
    validations = [json.loads(Path(p).read_text()) for p in job.named.get("validations", [])]
    page = front_page(manifests, validations, job.size_order, job.format_order, bool(job.named.get("validations")))
    page.write(job.outputs["md"], job.outputs["html"])
    # Jinja renders the report's front page before docutils: keep its text literal.
    atomic_write_text(job.outputs["rst"], "{% raw %}\n" + page.to_rst() + "\n{% endraw %}\n")


FRONT_PAGE_RST = "front_page.rst"

ANALYSIS = register(Analysis(
    name="front_page", level="global", reads=("manifests", "validations"), category="Summary", subcategory="Front page",
    params=("size_order", "format_order"),
    outputs=(
        Output("html", "front_page.html", "what was run and the verdicts (front page)"),
        Output("md", "front_page.md"),
        Output("rst", FRONT_PAGE_RST),
    ),
    write=write,
))


