from vlmsens.demo import build_demo_coco
from vlmsens.logs import run_job

s = snakemake.params.settings
run_job(
    snakemake, "demo_coco", build_demo_coco,
    snakemake.output.root, n_train=s["train_images"], n_val=s["val_images"],
    seed=snakemake.params.seed, width=s["width"], height=s["height"],
)
