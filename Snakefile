from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml")


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/calib.smk"
include: "rules/autoquant.smk"
include: "rules/report.smk"
include: "rules/validate.smk"
include: "rules/export.smk"
include: "rules/ladder.smk"


# The landing page of `snakemake --report`: what was run and the verdicts (analysis front_page)
# once the workflow has written them, the workflow's description before.
report: report_front_page()


wildcard_constraints:
    model=MODEL_RE,
    format=FORMAT_RE,
    scope=SCOPE_RE,
    size=SIZE_RE,
    budget=BUDGET_RE,


rule all:
    default_target: True
    input:
        cells=all_cell_outputs(),
        eval_db=rules.coco_eval_subset.output.db,
        analyses=analysis_targets(),
        recipes=per_cell(rules.recipes.output.summary_json),
        validation=validation_outputs(),
        exports=export_outputs(),
        ladders=ladder_outputs(),
