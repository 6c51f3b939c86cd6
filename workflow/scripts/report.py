from vlmsens.logs import run_logged
from vlmsens.report import write_reports

out = snakemake.output
run_logged(
    snakemake.log[0], "report", write_reports,
    list(snakemake.input.manifests), snakemake.params.size_order,
    summary_md=out.summary_md, summary_html=out.summary_html, summary_csv=out.summary_csv,
    layers_csv=out.layers_csv, stability_csv=out.stability_csv,
)
