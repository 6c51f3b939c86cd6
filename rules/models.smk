# Inputs the demo builds itself: a COCO-format tree and tiny checkpoints of the real classes.


rule demo_coco:
    output:
        root=directory(f"{OUT}/inputs/coco"),
    params:
        settings=lambda wildcards: dict(sorted(config["coco"].get("demo", {}).items())),
        seed=config["seed"],
    log:
        f"{LOGS}/demo_coco.log",
    benchmark:
        f"{BENCH}/demo_coco.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/demo_coco.py"


rule demo_checkpoint:
    input:
        coco=rules.demo_coco.output.root,
    output:
        checkpoint=directory(f"{OUT}/inputs/checkpoints/{{model}}"),
    params:
        family=lambda wildcards: config["models"][wildcards.model]["family"],
        settings=lambda wildcards: dict(sorted(config["models"][wildcards.model]["demo"].items())),
        min_pixels=config["prompts"]["min_pixels"],
        max_pixels=config["prompts"]["max_pixels"],
        seed=config["seed"],
    log:
        f"{LOGS}/demo_checkpoint/{{model}}.log",
    benchmark:
        f"{BENCH}/demo_checkpoint/{{model}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/demo_checkpoint.py"
