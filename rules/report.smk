# Cross-cell tables and plots; `snakemake --report` turns them into the HTML report.


rule report:
    input:
        manifests=all_manifests(),
    output:
        summary_md=report(
            f"{OUT}/reports/summary.md",
            caption="../docs/report/summary.rst",
            category="Summary",
            subcategory="Cells",
        ),
        summary_csv=f"{OUT}/reports/summary.csv",
        layers_csv=f"{OUT}/reports/layers.csv",
        stability_csv=report(
            f"{OUT}/reports/rank_stability.csv",
            caption="../docs/report/stability.rst",
            category="Summary",
            subcategory="Rank stability across sizes",
        ),
    params:
        size_order=list(config["grid"]["sizes"]),
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
        manifests=all_manifests(),
    output:
        png=report(
            f"{OUT}/reports/{{model}}/sensitivity.png",
            caption="../docs/report/sensitivity_plot.rst",
            category="{model}",
            subcategory="Per-group sensitivity",
            labels={"model": "{model}", "figure": "sensitivity by group, all formats, scopes and sizes"},
        ),
    params:
        size_order=list(config["grid"]["sizes"]),
    log:
        f"{LOGS}/sensitivity_plot/{{model}}.log",
    benchmark:
        f"{BENCH}/sensitivity_plot/{{model}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/sensitivity_plot.py"
