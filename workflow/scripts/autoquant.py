import os

# ModelOpt JIT-builds its CUDA extensions on first use; one cache for all cells means only the first pays.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(snakemake.params.extensions_cache))

from vlmsens.gpupool import gpu_slot  # noqa: E402
from vlmsens.logs import run_logged, setup  # noqa: E402

w = snakemake.wildcards
prefix = f"autoquant {w.model}/{w.format}/{w.scope}/{w.size}"
setup(snakemake.log[0], prefix)
# One free GPU of this host for the whole job, pinned through CUDA_VISIBLE_DEVICES before torch loads;
# SLURM's own allocation under SLURM, a no-op without GPUs.
with gpu_slot(snakemake.params.gpu_locks):
    import torch

    from vlmsens.cell import run_cell

    torch.set_num_threads(snakemake.threads)
    run_logged(
        snakemake.log[0], prefix, run_cell, log_mode="a",
        model_name=w.model, model_cfg=snakemake.params.model_cfg, checkpoint=snakemake.params.checkpoint,
        format_name=w.format, formats_cfg=snakemake.params.formats_cfg, scope=w.scope, size=w.size,
        autoquant_cfg=snakemake.params.autoquant_cfg, batch_size=snakemake.resources.batch_size,
        seed=snakemake.params.seed, samples_path=snakemake.input.samples, calib_db=snakemake.input.db,
        outputs=dict(snakemake.output.items()),
    )
