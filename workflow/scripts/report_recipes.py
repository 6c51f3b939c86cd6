from vlmsens.logs import run_logged
from vlmsens.report import write_recipe_summary

out = snakemake.output
run_logged(
    snakemake.log[0], f"recipe_summary {snakemake.wildcards.model}", write_recipe_summary,
    list(snakemake.input.recipes), snakemake.wildcards.model, snakemake.params.size_order,
    png=out.png, csv=out.csv, md=out.md, html=out.html,
)
