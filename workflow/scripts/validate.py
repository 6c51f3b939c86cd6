from vlmsens.cell import cell_arguments, validate_cell
from vlmsens.gpupool import run_gpu_job

w = snakemake.wildcards
run_gpu_job(
    snakemake, f"validate {w.model}/{w.format}/{w.scope}/{w.size}", validate_cell, takes_cell_model=True,
    **cell_arguments(snakemake),
    validation_cfg=snakemake.params.validation_cfg, manifest_path=snakemake.input.manifest, state_path=snakemake.input.state,
    samples_path=snakemake.input.samples, eval_samples_path=snakemake.input.eval_samples,
    outputs=dict(snakemake.output.items()),
)
