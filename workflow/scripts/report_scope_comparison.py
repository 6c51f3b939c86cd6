from vlmsens.logs import run_logged
from vlmsens.report import write_scope_comparison

out = snakemake.output
run_logged(
    snakemake.log[0], f"scope_comparison {snakemake.wildcards.model}", write_scope_comparison,
    list(snakemake.input.manifests), snakemake.wildcards.model, snakemake.params.size_order,
    png=out.png, agreement_csv=out.agreement_csv, layers_csv=out.layers_csv, md=out.md, html=out.html,
)
