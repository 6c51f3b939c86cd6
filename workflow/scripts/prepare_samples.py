from vlmsens.gpupool import warm_gpu_worker

# first: the GPU jobs wait for these samples, and their worker imports meanwhile (before torch here)
warm_gpu_worker(snakemake)

import torch  # noqa: E402

from vlmsens.cell import prepare_samples  # noqa: E402
from vlmsens.logs import run_job  # noqa: E402

w = snakemake.wildcards
torch.set_num_threads(snakemake.threads)
run_job(
    snakemake, f"{snakemake.rule} {w.model}/{w.scope}/{getattr(w, 'size', 'held-out')}", prepare_samples,
    checkpoint=snakemake.params.checkpoint, calib_db=snakemake.input.db, coco_root=snakemake.params.coco_root,
    scope=w.scope, inputs=snakemake.params.inputs, prompts=snakemake.params.prompts, out_path=snakemake.output.samples,
)
