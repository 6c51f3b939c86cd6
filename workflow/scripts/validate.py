import os

# The cell's own extension cache, so that validation never rebuilds ModelOpt's CUDA extensions.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(snakemake.params.extensions_cache))

from vlmsens.gpupool import gpu_slot  # noqa: E402
from vlmsens.logs import run_logged, setup  # noqa: E402

w = snakemake.wildcards
prefix = f"validate {w.model}/{w.format}/{w.scope}/{w.size}"
setup(snakemake.log[0], prefix)
with gpu_slot(snakemake.params.gpu_locks):
    import torch

    from vlmsens.cell import validate_cell

    torch.set_num_threads(snakemake.threads)
    run_logged(
        snakemake.log[0], prefix, validate_cell, log_mode="a",
        model_name=w.model, model_cfg=snakemake.params.model_cfg, checkpoint=snakemake.params.checkpoint,
        format_name=w.format, formats_cfg=snakemake.params.formats_cfg, scope=w.scope, size=w.size,
        autoquant_cfg=snakemake.params.autoquant_cfg, validation_cfg=snakemake.params.validation_cfg,
        batch_size=snakemake.resources.batch_size, seed=snakemake.params.seed,
        manifest_path=snakemake.input.manifest, samples_path=snakemake.input.samples,
        eval_samples_path=snakemake.input.eval_samples, outputs=dict(snakemake.output.items()),
    )
