from vlmsens.cell import cell_arguments, ladder_cell
from vlmsens.gpupool import run_gpu_job

w = snakemake.wildcards
run_gpu_job(
    snakemake, f"ladder {w.model}/{w.format}/{w.scope}/{w.size}", ladder_cell, **cell_arguments(snakemake),
    ladder_cfg=snakemake.params.ladder_cfg, manifest_path=snakemake.input.manifest, state_path=snakemake.input.state,
    samples_path=snakemake.input.samples, eval_samples_path=snakemake.input.eval_samples,
    outputs=dict(snakemake.output.items()),
)
