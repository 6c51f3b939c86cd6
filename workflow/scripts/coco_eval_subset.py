from vlmsens.calib import build_eval_subset
from vlmsens.logs import run_logged

p = snakemake.params
run_logged(
    snakemake.log[0], "coco_eval_subset", build_eval_subset,
    coco_root=p.coco_root, split=p.split, num_images=p.num_images, seed=p.seed,
    db_path=snakemake.output.db, captions_path=snakemake.output.captions, on_bad_image=p.on_bad_image,
)
