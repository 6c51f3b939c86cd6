from vlmsens.logs import run_logged
from vlmsens.report import write_towers

out = snakemake.output
run_logged(
    snakemake.log[0], f"towers {snakemake.wildcards.model}", write_towers,
    list(snakemake.input.manifests), snakemake.wildcards.model, snakemake.params.size_order,
    distribution_png=out.distribution_png, share_png=out.share_png, csv=out.csv, md=out.md, html=out.html,
)
