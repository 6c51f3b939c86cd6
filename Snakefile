from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml")


report: "docs/report/workflow.rst"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/calib.smk"
include: "rules/autoquant.smk"
include: "rules/report.smk"
include: "rules/validate.smk"


wildcard_constraints:
    model=MODEL_RE,
    format=FORMAT_RE,
    scope=SCOPE_RE,
    size=SIZE_RE,


rule all:
    default_target: True
    input:
        cells=all_cell_outputs(),
        eval_db=rules.coco_eval_subset.output.db,
        summary=rules.report.output.summary_md,
        summary_html=rules.report.output.summary_html,
        plots=expand(rules.sensitivity_plot.output.png, model=GRID["models"]),
        rank_stability=expand(rules.rank_stability.output.png, model=GRID["models"]),
        format_comparison=expand(rules.format_comparison.output.png, model=GRID["models"]),
        scope_comparison=expand(rules.scope_comparison.output.png, model=GRID["models"]),
        towers=expand(rules.towers.output.share_png, model=GRID["models"]),
        heatmaps=per_cell(rules.heatmap.output.png),
        recipes=per_cell(rules.recipes.output.summary_json),
        recipe_summary=expand(rules.recipe_summary.output.png, model=GRID["models"]),
        families=cross_model_reports(),
        validation=validation_outputs(),
