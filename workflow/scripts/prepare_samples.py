import torch

from vlmsens.cell import prepare_samples
from vlmsens.gpupool import warm_gpu_worker
from vlmsens.logs import run_job

w = snakemake.wildcards
torch.set_num_threads(snakemake.threads)
warm_gpu_worker(snakemake)  # the GPU jobs wait for these samples: their worker imports meanwhile
run_job(
    snakemake, f"{snakemake.rule} {w.model}/{w.scope}/{getattr(w, 'size', 'held-out')}", prepare_samples,
    checkpoint=snakemake.params.checkpoint, calib_db=snakemake.input.db, coco_root=snakemake.params.coco_root,
    scope=w.scope, inputs=snakemake.params.inputs, prompts=snakemake.params.prompts, out_path=snakemake.output.samples,
)
