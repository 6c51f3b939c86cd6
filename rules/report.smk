# Deployable recipes per cell, and one rule per analysis of vlmsens.reports (its registry says the
# level, inputs, outputs and report labels; the rule, the module and docs/report/<name>.rst share
# the analysis's name). `snakemake --report` turns the outputs with a label into the HTML report
# (category = model, subcategory = analysis; both numbered in reading order, rules/common.smk).
# Analyses read quant_manifest.json, recipes.json or validation.json only; recipes also read the
# cell's autoquant_state.pt.


rule recipes:
    input:
        manifest=rules.autoquant.output.manifest,
        state=rules.autoquant.output.state,
    output:
        summary_json=f"{RECIPE_DIR}/recipes.json",
        summary_md=f"{RECIPE_DIR}/recipes.md",
        summary_html=report(
            f"{RECIPE_DIR}/recipes.html",
            caption="../docs/report/recipes.rst",
            category=report_category(MODEL_CATEGORY),
            subcategory=report_subcategory(MODEL_CATEGORY, RECIPES_SUBCATEGORY),
            labels={"item": "cell recipes (table)", "format": "{format}", "scope": "{scope}", "size": "{size}"},
        ),
        quant_cfgs=per_budget(f"{RECIPE_DIR}/{{budget}}/modelopt_quant_cfg.json"),
        ignores=per_budget(f"{RECIPE_DIR}/{{budget}}/ignore.yaml"),
        nested_quant_cfgs=per_budget(f"{RECIPE_DIR}/{{budget}}/nested/modelopt_quant_cfg.json"),
        nested_ignores=per_budget(f"{RECIPE_DIR}/{{budget}}/nested/ignore.yaml"),
    params:
        budgets=BUDGETS,
        # run in the GPU jobs' warm worker, which has ModelOpt imported (vlmsens.gpupool.run_cpu_job_warm)
        extensions_cache=f"{OUT}/.cache/torch_extensions",
        gpu_locks=f"{OUT}/.locks/gpu",
    threads: 1
    log:
        f"{LOGS}/recipes/{{model}}/{{format}}/{{scope}}/{{size}}.log",
    benchmark:
        f"{BENCH}/recipes/{{model}}/{{format}}/{{scope}}/{{size}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/recipes.py"


for analysis in analyses().values():

    rule:
        name:
            analysis.name
        input:
            **analysis_inputs(analysis),
        output:
            **analysis_outputs(analysis),
        params:
            **{key: ANALYSIS_PARAMS[key] for key in analysis.params},
        log:
            analysis_path(analysis, LOGS, ".log"),
        benchmark:
            analysis_path(analysis, BENCH, ".tsv")
        conda:
            CONDA_ENV
        script:
            "../workflow/scripts/analysis.py"
