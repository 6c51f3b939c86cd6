# Calibration and held-out evaluation subsets of COCO 2017 (docs/DESIGN.md, "Data contracts").


rule coco_subset:
    input:
        unpack(subset_inputs),
    output:
        db=f"{OUT}/calib/coco2017_vlm_calib_{{size}}.db",
        captions=f"{OUT}/calib/coco2017_captions_{{size}}.txt",
    params:
        coco_root=coco_root(),
        split=config["coco"]["calib_split"],
        num_samples=lambda wildcards: config["sizes"][wildcards.size],
        seed=config["seed"],
        on_bad_image=config["coco"]["on_bad_image"],
        eval_split=config["coco"]["eval_split"],
        eval_images=held_out_images(),
        prebuilt_dir=config["coco"].get("prebuilt_dir") or "",
    log:
        f"{LOGS}/coco_subset/{{size}}.log",
    benchmark:
        f"{BENCH}/coco_subset/{{size}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/coco_subset.py"


rule coco_eval_subset:
    input:
        unpack(eval_subset_inputs),
    output:
        db=f"{OUT}/calib/coco2017_vlm_eval.db",
        captions=f"{OUT}/calib/coco2017_captions_eval.txt",
    params:
        coco_root=coco_root(),
        split=config["coco"]["eval_split"],
        num_images=config["coco"]["eval_images"],
        seed=config["seed"],
        on_bad_image=config["coco"]["on_bad_image"],
    log:
        f"{LOGS}/coco_eval_subset.log",
    benchmark:
        f"{BENCH}/coco_eval_subset.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/coco_eval_subset.py"
