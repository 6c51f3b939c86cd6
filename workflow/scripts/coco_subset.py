from vlmsens.calib import build_subset
from vlmsens.logs import run_job

p = snakemake.params
run_job(
    snakemake, f"coco_subset {snakemake.wildcards.size}", build_subset,
    coco_root=p.coco_root, split=p.split, size_name=snakemake.wildcards.size, num_samples=p.num_samples,
    seed=p.seed, db_path=snakemake.output.db, captions_path=snakemake.output.captions,
    on_bad_image=p.on_bad_image, eval_split=p.eval_split, eval_images=p.eval_images,
    prebuilt_dir=p.prebuilt_dir or None,
)
