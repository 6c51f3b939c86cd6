from vlmsens.logs import run_logged
from vlmsens.report import write_rank_stability

out = snakemake.output
run_logged(
    snakemake.log[0], f"rank_stability {snakemake.wildcards.model}", write_rank_stability,
    list(snakemake.input.manifests), snakemake.wildcards.model, snakemake.params.size_order,
    png=out.png, csv=out.csv, md=out.md, html=out.html,
)
