from vlmsens.logs import run_logged
from vlmsens.report import write_format_comparison

out = snakemake.output
run_logged(
    snakemake.log[0], f"format_comparison {snakemake.wildcards.model}", write_format_comparison,
    list(snakemake.input.manifests), snakemake.wildcards.model, snakemake.params.size_order, snakemake.params.format_order,
    png=out.png, agreement_csv=out.agreement_csv, layers_csv=out.layers_csv, md=out.md, html=out.html,
)
