from vlmsens.demo import build_demo_checkpoint
from vlmsens.logs import run_job

run_job(
    snakemake, f"demo_checkpoint {snakemake.wildcards.model}", build_demo_checkpoint,
    snakemake.params.family, snakemake.output.checkpoint, snakemake.input.coco,
    seed=snakemake.params.seed, vocab_size=snakemake.params.settings["vocab_size"],
    min_pixels=snakemake.params.min_pixels, max_pixels=snakemake.params.max_pixels,
    size=snakemake.params.settings.get("size", "tiny"),
)
