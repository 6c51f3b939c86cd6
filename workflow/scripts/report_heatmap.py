from vlmsens.logs import run_logged
from vlmsens.report import write_heatmap

w = snakemake.wildcards
run_logged(
    snakemake.log[0], f"heatmap {w.model}/{w.format}/{w.scope}/{w.size}", write_heatmap,
    snakemake.input.manifest, png=snakemake.output.png, csv=snakemake.output.csv,
)
