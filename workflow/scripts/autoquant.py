from vlmsens.cell import cell_arguments, run_cell
from vlmsens.gpupool import run_gpu_job
from vlmsens.provenance import process_started

w = snakemake.wildcards
run_gpu_job(
    snakemake, f"autoquant {w.model}/{w.format}/{w.scope}/{w.size}", run_cell, **cell_arguments(snakemake),
    samples_path=snakemake.input.samples, calib_db=snakemake.input.db, outputs=dict(snakemake.output.items()),
    job_started=process_started(),
)
