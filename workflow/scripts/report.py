from vlmsens.logs import run_logged
from vlmsens.report import write_reports

run_logged(
    snakemake.log[0], "report", write_reports,
    list(snakemake.input.manifests), snakemake.params.size_order,
    summary_md=snakemake.output.summary_md, summary_csv=snakemake.output.summary_csv,
    layers_csv=snakemake.output.layers_csv, stability_csv=snakemake.output.stability_csv,
)
