# Cross-cell tables and plots, and deployable recipes; `snakemake --report` turns the outputs
# wrapped in report() into the HTML report (category = model, subcategory = analysis).
# Every analysis reads quant_manifest.json only; recipes also read the cell's autoquant_state.pt.

ALL_FORMATS = ", ".join(GRID["formats"])
ALL_SCOPES = ", ".join(GRID["scopes"])
ALL_SIZES = ", ".join(GRID["sizes"])
ALL_CELLS = {"format": ALL_FORMATS, "scope": ALL_SCOPES, "size": ALL_SIZES}
REPORTS = f"{OUT}/reports"
MODEL_REPORTS = f"{OUT}/reports/{{model}}"


rule report:
    input:
        manifests=all_manifests(),
    output:
        summary_md=f"{REPORTS}/summary.md",
        summary_html=report(
            f"{REPORTS}/summary.html",
            caption="../docs/report/summary.rst",
            category="Summary",
            subcategory="Cells",
            labels={"item": "summary of every cell (table)", **ALL_CELLS},
        ),
        summary_csv=f"{REPORTS}/summary.csv",
        layers_csv=f"{REPORTS}/layers.csv",
        stability_csv=f"{REPORTS}/rank_stability.csv",
    params:
        size_order=list(GRID["sizes"]),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/report.py"


rule sensitivity_plot:
    input:
        manifests=model_manifests,
    output:
        png=report(
            f"{MODEL_REPORTS}/sensitivity.png",
            caption="../docs/report/sensitivity_plot.rst",
            category="{model}",
            subcategory="Per-group sensitivity",
            labels={"item": "sensitivity by group (plot)", **ALL_CELLS},
        ),
    params:
        size_order=list(GRID["sizes"]),
    log:
        f"{LOGS}/sensitivity_plot/{{model}}.log",
    benchmark:
        f"{BENCH}/sensitivity_plot/{{model}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/sensitivity_plot.py"


rule rank_stability:
    input:
        manifests=model_manifests,
    output:
        png=report(
            f"{MODEL_REPORTS}/rank_stability.png",
            caption="../docs/report/rank_stability.rst",
            category="{model}",
            subcategory="(a) Rank stability across sizes",
            labels={"item": "agreement per size pair (plot)", **ALL_CELLS},
        ),
        html=report(
            f"{MODEL_REPORTS}/rank_stability.html",
            caption="../docs/report/rank_stability.rst",
            category="{model}",
            subcategory="(a) Rank stability across sizes",
            labels={"item": "agreement per size pair (table)", **ALL_CELLS},
        ),
        csv=f"{MODEL_REPORTS}/rank_stability.csv",
        md=f"{MODEL_REPORTS}/rank_stability.md",
    params:
        size_order=list(GRID["sizes"]),
    log:
        f"{LOGS}/rank_stability/{{model}}.log",
    benchmark:
        f"{BENCH}/rank_stability/{{model}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/report_rank_stability.py"


rule format_comparison:
    input:
        manifests=model_manifests,
    output:
        png=report(
            f"{MODEL_REPORTS}/format_comparison.png",
            caption="../docs/report/format_comparison.rst",
            category="{model}",
            subcategory="(b) Format comparison (FP8 vs INT8)",
            labels={"item": "per-group scores of two formats (scatter)", **ALL_CELLS},
        ),
        html=report(
            f"{MODEL_REPORTS}/format_comparison.html",
            caption="../docs/report/format_comparison.rst",
            category="{model}",
            subcategory="(b) Format comparison (FP8 vs INT8)",
            labels={"item": "agreement and largest disagreements (table)", **ALL_CELLS},
        ),
        agreement_csv=f"{MODEL_REPORTS}/format_agreement.csv",
        layers_csv=f"{MODEL_REPORTS}/format_layers.csv",
        md=f"{MODEL_REPORTS}/format_comparison.md",
    params:
        size_order=list(GRID["sizes"]),
        format_order=list(GRID["formats"]),
    log:
        f"{LOGS}/format_comparison/{{model}}.log",
    benchmark:
        f"{BENCH}/format_comparison/{{model}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/report_format_comparison.py"


rule scope_comparison:
    input:
        manifests=model_manifests,
    output:
        png=report(
            f"{MODEL_REPORTS}/scope_comparison.png",
            caption="../docs/report/scope_comparison.rst",
            category="{model}",
            subcategory="(c) LM-only vs all-layers",
            labels={"item": "text-layer scores in both scopes (scatter)", **ALL_CELLS},
        ),
        html=report(
            f"{MODEL_REPORTS}/scope_comparison.html",
            caption="../docs/report/scope_comparison.rst",
            category="{model}",
            subcategory="(c) LM-only vs all-layers",
            labels={"item": "rank correlation and largest rank shifts (table)", **ALL_CELLS},
        ),
        agreement_csv=f"{MODEL_REPORTS}/scope_agreement.csv",
        layers_csv=f"{MODEL_REPORTS}/scope_layers.csv",
        md=f"{MODEL_REPORTS}/scope_comparison.md",
    params:
        size_order=list(GRID["sizes"]),
    log:
        f"{LOGS}/scope_comparison/{{model}}.log",
    benchmark:
        f"{BENCH}/scope_comparison/{{model}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/report_scope_comparison.py"


rule towers:
    input:
        manifests=model_manifests,
    output:
        distribution_png=report(
            f"{MODEL_REPORTS}/towers_distribution.png",
            caption="../docs/report/towers.rst",
            category="{model}",
            subcategory="(d) Towers: vision / text / head",
            labels={"item": "score distribution per tower (box plot)", **ALL_CELLS},
        ),
        share_png=report(
            f"{MODEL_REPORTS}/towers_share.png",
            caption="../docs/report/towers.rst",
            category="{model}",
            subcategory="(d) Towers: vision / text / head",
            labels={"item": "sensitivity, weight and BF16-budget share (bars)", **ALL_CELLS},
        ),
        html=report(
            f"{MODEL_REPORTS}/towers.html",
            caption="../docs/report/towers.rst",
            category="{model}",
            subcategory="(d) Towers: vision / text / head",
            labels={"item": "shares per cell and tower (table)", **ALL_CELLS},
        ),
        csv=f"{MODEL_REPORTS}/towers.csv",
        md=f"{MODEL_REPORTS}/towers.md",
    params:
        size_order=list(GRID["sizes"]),
    log:
        f"{LOGS}/towers/{{model}}.log",
    benchmark:
        f"{BENCH}/towers/{{model}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/report_towers.py"


rule heatmap:
    input:
        manifest=rules.autoquant.output.manifest,
    output:
        png=report(
            f"{MODEL_REPORTS}/heatmaps/{{format}}/{{scope}}/{{size}}/heatmap.png",
            caption="../docs/report/heatmap.rst",
            category="{model}",
            subcategory="(e) Heatmaps: block × sublayer",
            labels={"item": "heatmap", "format": "{format}", "scope": "{scope}", "size": "{size}"},
        ),
        csv=f"{MODEL_REPORTS}/heatmaps/{{format}}/{{scope}}/{{size}}/heatmap.csv",
    log:
        f"{LOGS}/heatmap/{{model}}/{{format}}/{{scope}}/{{size}}.log",
    benchmark:
        f"{BENCH}/heatmap/{{model}}/{{format}}/{{scope}}/{{size}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/report_heatmap.py"


rule recipes:
    input:
        manifest=rules.autoquant.output.manifest,
        state=rules.autoquant.output.state,
    output:
        summary_json=f"{RECIPE_DIR}/recipes.json",
        summary_md=f"{RECIPE_DIR}/recipes.md",
        summary_html=report(
            f"{RECIPE_DIR}/recipes.html",
            caption="../docs/report/recipes_cell.rst",
            category="{model}",
            subcategory="Recipes per effective-bits budget",
            labels={"item": "cell recipes (table)", "format": "{format}", "scope": "{scope}", "size": "{size}"},
        ),
        quant_cfgs=per_budget(f"{RECIPE_DIR}/{{budget}}/modelopt_quant_cfg.json"),
        ignores=per_budget(f"{RECIPE_DIR}/{{budget}}/ignore.yaml"),
    params:
        budgets=BUDGETS,
    threads: 1
    log:
        f"{LOGS}/recipes/{{model}}/{{format}}/{{scope}}/{{size}}.log",
    benchmark:
        f"{BENCH}/recipes/{{model}}/{{format}}/{{scope}}/{{size}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/recipes.py"


rule recipe_summary:
    input:
        recipes=model_recipe_summaries,
    output:
        png=report(
            f"{MODEL_REPORTS}/recipes.png",
            caption="../docs/report/recipes.rst",
            category="{model}",
            subcategory="Recipes per effective-bits budget",
            labels={"item": "predicted score vs bits (plot)", **ALL_CELLS},
        ),
        html=report(
            f"{MODEL_REPORTS}/recipes.html",
            caption="../docs/report/recipes.rst",
            category="{model}",
            subcategory="Recipes per effective-bits budget",
            labels={"item": "all cells and budgets (table)", **ALL_CELLS},
        ),
        csv=f"{MODEL_REPORTS}/recipes.csv",
        md=f"{MODEL_REPORTS}/recipes.md",
    params:
        size_order=list(GRID["sizes"]),
    log:
        f"{LOGS}/recipe_summary/{{model}}.log",
    benchmark:
        f"{BENCH}/recipe_summary/{{model}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/report_recipes.py"


rule depth_profile:
    input:
        manifests=all_manifests(),
    output:
        png=report(
            f"{REPORTS}/families/depth_profile.png",
            caption="../docs/report/depth_profile.rst",
            category="Model families",
            subcategory="(f) Sensitivity by relative depth",
            labels={"item": "share of sensitivity by relative depth (plot)", **ALL_CELLS},
        ),
        html=report(
            f"{REPORTS}/families/depth_profile.html",
            caption="../docs/report/depth_profile.rst",
            category="Model families",
            subcategory="(f) Sensitivity by relative depth",
            labels={"item": "depth summary per family (table)", **ALL_CELLS},
        ),
        csv=f"{REPORTS}/families/depth_profile.csv",
        md=f"{REPORTS}/families/depth_profile.md",
    params:
        size_order=list(GRID["sizes"]),
    log:
        f"{LOGS}/depth_profile.log",
    benchmark:
        f"{BENCH}/depth_profile.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/report_depth_profile.py"
