from vlmsens.calib import build_eval_subset
from vlmsens.logs import run_job

p = snakemake.params
run_job(
    snakemake, "coco_eval_subset", build_eval_subset,
    coco_root=p.coco_root, split=p.split, num_images=p.num_images, seed=p.seed,
    db_path=snakemake.output.db, captions_path=snakemake.output.captions, on_bad_image=p.on_bad_image,
)
