from vlmsens.logs import run_logged
from vlmsens.report import write_model_plot

run_logged(
    snakemake.log[0], f"sensitivity_plot {snakemake.wildcards.model}", write_model_plot,
    list(snakemake.input.manifests), snakemake.wildcards.model, snakemake.params.size_order,
    snakemake.output.png,
)
