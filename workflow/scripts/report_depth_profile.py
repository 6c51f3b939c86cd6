from vlmsens.logs import run_logged
from vlmsens.report import write_depth_profile

out = snakemake.output
run_logged(
    snakemake.log[0], "depth_profile", write_depth_profile,
    list(snakemake.input.manifests), snakemake.params.size_order,
    png=out.png, csv=out.csv, md=out.md, html=out.html,
)
