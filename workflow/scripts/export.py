from vlmsens.cell import cell_arguments, export_cell
from vlmsens.gpupool import run_gpu_job

w = snakemake.wildcards
run_gpu_job(
    snakemake, f"export {w.model}/{w.format}/{w.scope}/{w.size}/bits-{w.budget}", export_cell, **cell_arguments(snakemake),
    export_cfg=snakemake.params.export_cfg, budget=snakemake.params.budget, manifest_path=snakemake.input.manifest,
    state_path=snakemake.input.state, samples_path=snakemake.input.samples, eval_samples_path=snakemake.input.eval_samples,
    outputs=dict(snakemake.output.items()),
)
