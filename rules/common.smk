# Helpers, constraints, cell enumeration and input functions. Rules live in the other .smk files.
import os
import re
import sys

from vlmsens.config import (
    Settings,
    autoquant_settings,
    calibration_inputs,
    check_config,
    export_settings,
    export_targets,
    format_settings,
    grid_cells,
    is_demo_coco,
    is_demo_model,
    ladder_cells,
    ladder_settings,
    model_settings,
    prompt_settings,
    ship_this_settings,
    validation_settings,
)
from vlmsens.errors import VlmsensError
from vlmsens.recipes import budget_slug
from vlmsens.reports.front_page import FRONT_PAGE_RST
from vlmsens.reports.registry import MODEL_CATEGORY, analyses, category_labels, subcategory_labels

try:
    # A cluster job (SLURM) reads the Snakefile again with arguments Snakemake builds, which leave
    # out --replace-workflow-config; the main process has already refused a merged demo config.
    check_config(config, check_merged=not workflow.remote_exec)
except VlmsensError as err:
    sys.exit(f"vlmsens: configuration error: {err}")

SETTINGS = Settings.from_config(config)
OUT = SETTINGS.outdir
LOGS = f"{OUT}/logs"
BENCH = f"{OUT}/benchmarks"
CONDA_ENV = "../envs/vlmsens.yaml"
CELL_DIR = f"{OUT}/autoquant/{{model}}/{{format}}/{{scope}}/{{size}}"
GRID = config["grid"]


def _one_of(values):
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


MODEL_RE = _one_of(GRID["models"])
FORMAT_RE = _one_of(GRID["formats"])
SCOPE_RE = _one_of(GRID["scopes"])
SIZE_RE = _one_of(GRID["sizes"])


def cell_paths(cell):
    base = CELL_DIR.format(model=cell.model, format=cell.format, scope=cell.scope, size=cell.size)
    return {
        "json": f"{base}/per-layer-sensitivity.json",
        "markdown": f"{base}/per-layer-sensitivity.md",
        "manifest": f"{base}/quant_manifest.json",
        "state": f"{base}/autoquant_state.pt",
    }


def all_cell_outputs():
    return [path for cell in grid_cells(config) for path in cell_paths(cell).values()]


def all_manifests():
    return [cell_paths(cell)["manifest"] for cell in grid_cells(config)]


def coco_root():
    """The COCO root the subset rules read: generated for the demo, configured otherwise."""
    if is_demo_coco(config):
        return f"{OUT}/inputs/coco"
    return config["coco"]["root"]


def coco_annotations(split):
    return f"{coco_root()}/annotations/captions_{split}.json"


def subset_inputs(wildcards):
    if config["coco"].get("prebuilt_dir"):
        return {"db": f"{config['coco']['prebuilt_dir']}/coco2017_vlm_calib_{wildcards.size}.db"}
    if is_demo_coco(config):
        return {"coco": rules.demo_coco.output.root}
    return {"annotations": coco_annotations(config["coco"]["calib_split"])}


def eval_subset_inputs(wildcards):
    if is_demo_coco(config):
        return {"coco": rules.demo_coco.output.root}
    return {"annotations": coco_annotations(config["coco"]["eval_split"])}


def demo_coco_input(wildcards):
    """Cells that read images depend on the generated tree in the demo; real COCO is no rule output."""
    return {"coco": rules.demo_coco.output.root} if is_demo_coco(config) else {}


def checkpoint_input(wildcards):
    """A built demo checkpoint is a rule output; a real one is a folder or HF id (no input)."""
    if is_demo_model(config, wildcards.model):
        return {"checkpoint": rules.demo_checkpoint.output.checkpoint.format(model=wildcards.model)}
    return {}


def checkpoint_of(wildcards):
    if is_demo_model(config, wildcards.model):
        return rules.demo_checkpoint.output.checkpoint.format(model=wildcards.model)
    return config["models"][wildcards.model]["checkpoint"]


def samples_priority(wildcards):
    """The smallest calibration subset is encoded first: the GPU's first cells need only it, so the GPU starts
    within seconds. The held-out samples come next (prepare_eval_samples has priority 1): a cell's
    validation, which needs them, then runs right after the cell, in the process that holds its model."""
    smallest = min(GRID["sizes"], key=lambda size: config["sizes"][size])
    return 2 if wildcards.size == smallest else 0


def batch_size_for_attempt(wildcards, attempt):
    """Each retry halves the batch (0 means auto); only a CUDA out-of-memory failure is retried (attempt_number)."""
    size = SETTINGS.autoquant.batch_size
    return 0 if size == 0 else max(1, size // 2 ** (attempt - 1))


def batch_halvings_for_attempt(wildcards, attempt):
    """An auto-sized batch is halved inside the cell, once per retry."""
    return attempt - 1 if SETTINGS.autoquant.batch_size == 0 else 0


def attempt_number(wildcards, attempt):
    """The attempt, for the job script: Snakemake retries any failure, so a retry reads how the
    previous attempt failed and stops at once unless it was an out-of-memory error (vlmsens.failures)."""
    return attempt


# Params of the GPU rules: only the config a cell's output depends on (vlmsens.config).
def cell_model_settings(wildcards):
    return model_settings(config, wildcards.model)


def cell_format_settings(wildcards):
    return format_settings(config, wildcards.format)


def cell_autoquant_settings(wildcards):
    return autoquant_settings(config, wildcards.format)


def held_out_images():
    """coco.eval_images as far as a calibration subset depends on it: held-out images are excluded
    from the same split, and a pre-built DB is checked against them; otherwise it changes nothing."""
    coco = config["coco"]
    if coco["eval_split"] == coco["calib_split"] or coco.get("prebuilt_dir"):
        return coco["eval_images"]
    return 0


# --- Reports and recipes (rules/report.smk) ---------------------------------------------------
ALL_FORMATS = ", ".join(GRID["formats"])
ALL_SCOPES = ", ".join(GRID["scopes"])
ALL_SIZES = ", ".join(GRID["sizes"])
ALL_CELLS = {"format": ALL_FORMATS, "scope": ALL_SCOPES, "size": ALL_SIZES}
REPORTS = f"{OUT}/reports"
BUDGETS = list(SETTINGS.budgets)
RECIPE_DIR = f"{OUT}/recipes/{{model}}/{{format}}/{{scope}}/{{size}}"
FAMILIES_IN_GRID = sorted({config["models"][m]["family"] for m in GRID["models"]})


def per_budget(pattern):
    """One path per configured budget; the cell wildcards stay in place."""
    return [pattern.replace("{budget}", budget_slug(b)) for b in BUDGETS]


def per_cell(pattern):
    """``pattern`` (with {model}, {format}, {scope}, {size}) filled for every cell of the grid."""
    return [pattern.format(model=c.model, format=c.format, scope=c.scope, size=c.size) for c in grid_cells(config)]


def model_manifests(wildcards):
    """The manifests of one model's cells (per-model reports)."""
    return [cell_paths(c)["manifest"] for c in grid_cells(config) if c.model == wildcards.model]


def model_recipe_summaries(wildcards):
    """The recipes.json of one model's cells."""
    return [
        rules.recipes.output.summary_json.format(model=c.model, format=c.format, scope=c.scope, size=c.size)
        for c in grid_cells(config)
        if c.model == wildcards.model
    ]


# --- Validation (rules/validate.smk) ----------------------------------------------------------
VALIDATE = SETTINGS.validate


def model_validations(wildcards):
    """The validation.json of one model's cells."""
    return [
        rules.validate.output.json.format(model=c.model, format=c.format, scope=c.scope, size=c.size)
        for c in grid_cells(config)
        if c.model == wildcards.model
    ]


def all_validations(wildcards):
    """The validation.json of every cell."""
    return per_cell(rules.validate.output.json)


def validation_outputs():
    """Validation targets of the default target: every cell's files (the analyses come with the others)."""
    if not VALIDATE:
        return []
    return per_cell(rules.validate.output.json) + per_cell(rules.validate.output.markdown)


# --- Ladders (rules/ladder.smk) ------------------------------------------------------------------
LADDER_CELLS = ladder_cells(config)


def model_ladders(wildcards):
    """The ladder.json of one model's ladder cells."""
    return [
        rules.ladder.output.json.format(model=c.model, format=c.format, scope=c.scope, size=c.size)
        for c in LADDER_CELLS
        if c.model == wildcards.model
    ]


def all_ladders(wildcards):
    """The ladder.json of every ladder cell."""
    return ladder_outputs()


def ladder_outputs():
    """Ladder targets of the default target: the chosen cells' ladder.json (none when disabled)."""
    return [rules.ladder.output.json.format(model=c.model, format=c.format, scope=c.scope, size=c.size) for c in LADDER_CELLS]


# --- Analyses of vlmsens.reports: one rule each (rules/report.smk) ---------------------------
CELL_LABELS = {"format": "{format}", "scope": "{scope}", "size": "{size}"}
RECIPES_SUBCATEGORY = "Recipes per effective-bits budget"  # rule recipes (per cell) and analysis recipe_summary
REPORT_SECTIONS = {}
for _analysis in analyses().values():
    REPORT_SECTIONS.setdefault(_analysis.category, []).append(_analysis.subcategory)
REPORT_SECTIONS.setdefault(MODEL_CATEGORY, []).append(RECIPES_SUBCATEGORY)
EXPORT_SUBCATEGORY = "Exported checkpoints"  # rule export
REPORT_SECTIONS[MODEL_CATEGORY].append(EXPORT_SUBCATEGORY)
CATEGORY_LABELS = category_labels(GRID["models"], REPORT_SECTIONS)
SUBCATEGORY_LABELS = {category: subcategory_labels(subs) for category, subs in REPORT_SECTIONS.items()}


def report_front_page():
    """The report's landing page: the front page analysis front_page wrote, or the workflow's description."""
    front = os.path.abspath(f"{REPORTS}/{FRONT_PAGE_RST}")
    return front if os.path.exists(front) else "docs/report/workflow.rst"


def report_category(category):
    """The numbered report category (vlmsens.reports.registry: the report sorts categories by name);
    a model's own category is a function of the job's model."""
    if category == MODEL_CATEGORY:
        return lambda wildcards: CATEGORY_LABELS[wildcards.model]
    return CATEGORY_LABELS[category]


def report_subcategory(category, subcategory):
    return SUBCATEGORY_LABELS[category][subcategory]


WILDCARDS_OF_LEVEL = {"global": (), "model": ("model",), "cell": ("model", "format", "scope", "size")}
GRID_ORDERS = {"size_order": list(GRID["sizes"]), "format_order": list(GRID["formats"])}
# Every param an analysis may ask for (vlmsens.reports.registry.PARAMS): the grid orders and the
# ship_this thresholds.
ANALYSIS_PARAMS = {**GRID_ORDERS, "ship_this": ship_this_settings(config)}


def analysis_inputs(analysis):
    """The files an analysis reads, by kind: every cell's, one model's cells', or one cell's.

    Validations are read only when validation is enabled (an analysis that needs them says so
    with ``requires="validation"``; one that reads them beside others gets none otherwise).
    """
    level = analysis.level
    files = {
        "manifests": lambda: {"cell": rules.autoquant.output.manifest, "model": model_manifests, "global": all_manifests()}[level],
        "recipes": lambda: {"cell": cell_recipe_summary, "model": model_recipe_summaries}[level],
        "validations": lambda: {"cell": cell_validation, "model": model_validations, "global": all_validations}[level]
        if VALIDATE else [],
        "ladders": lambda: {"model": model_ladders, "global": all_ladders}[level],
    }
    return {kind: files[kind]() for kind in analysis.kinds_read}


def cell_recipe_summary(wildcards):
    return rules.recipes.output.summary_json.format(**wildcards)


def cell_validation(wildcards):
    return rules.validate.output.json.format(**wildcards)


def analysis_outputs(analysis):
    """Output paths under reports/, wrapped in report() where the analysis labels them."""
    labels = CELL_LABELS if analysis.level == "cell" else ALL_CELLS
    outputs = {}
    for out in analysis.outputs:
        path = f"{REPORTS}/{out.path}"
        if out.item is not None:
            path = report(
                path,
                caption=f"../docs/report/{analysis.name}.rst",
                category=report_category(analysis.category),
                subcategory=report_subcategory(analysis.category, analysis.subcategory),
                labels={"item": out.item, **labels},
            )
        outputs[out.key] = path
    return outputs


def analysis_path(analysis, root, suffix):
    """<root>/<name>[/{model}[/{format}/{scope}/{size}]]<suffix>: one log or benchmark file per job."""
    wildcards = (f"{{{w}}}" for w in WILDCARDS_OF_LEVEL[analysis.level])
    return f"{os.path.join(root, analysis.name, *wildcards)}{suffix}"


ANALYSIS_ENABLED = {None: True, "validation": VALIDATE, "two_families": len(FAMILIES_IN_GRID) >= 2, "ladder": bool(LADDER_CELLS)}


def analysis_targets():
    """Every output of every analysis the grid and config call for (rule all)."""
    targets = []
    for analysis in analyses().values():
        if not ANALYSIS_ENABLED[analysis.requires]:
            continue
        for path in getattr(rules, analysis.name).output:
            if analysis.level == "global":
                targets.append(path)
            elif analysis.level == "model":
                targets += expand(path, model=GRID["models"])
            else:
                targets += per_cell(path)
    return targets


# --- Exports (rules/export.smk) ---------------------------------------------------------------
EXPORT_DIR = f"{OUT}/export/{{model}}/{{format}}/{{scope}}/{{size}}"
BUDGET_RE = r"[0-9]+(\.[0-9]+)?"


def export_outputs():
    """Every export of export.cells at export.budgets (or the cell's own target): folder and page."""
    targets = []
    for cell, budget in export_targets(config):
        base = EXPORT_DIR.format(model=cell.model, format=cell.format, scope=cell.scope, size=cell.size)
        targets += [f"{base}/bits-{budget:g}", f"{base}/bits-{budget:g}.md", f"{base}/bits-{budget:g}.html"]
    return targets
