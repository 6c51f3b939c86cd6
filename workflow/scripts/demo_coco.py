from vlmsens.demo import build_demo_coco
from vlmsens.logs import run_logged

s = snakemake.params.settings
run_logged(
    snakemake.log[0], "demo_coco", build_demo_coco,
    snakemake.output.root, n_train=s["train_images"], n_val=s["val_images"],
    seed=snakemake.params.seed, width=s["width"], height=s["height"],
)
