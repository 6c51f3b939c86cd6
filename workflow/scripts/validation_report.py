from vlmsens.logs import run_logged
from vlmsens.report import write_validation_summary

out = snakemake.output
run_logged(
    snakemake.log[0], "validation_report", write_validation_summary,
    list(snakemake.input.validations), snakemake.params.size_order, md=out.md, html=out.html, csv=out.csv,
)
