from vlmsens.logs import run_logged
from vlmsens.report import plot_validation

run_logged(
    snakemake.log[0], f"validation_plot {snakemake.wildcards.model}", plot_validation,
    list(snakemake.input.validations), snakemake.wildcards.model, snakemake.params.size_order, snakemake.output.png,
)
