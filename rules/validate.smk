# Validation of rankings: does quantizing what a cell ranks "fragile" really hurt more than what it
# ranks "safe"? Measured on the held-out evaluation subset, disjoint from calibration.


rule prepare_eval_samples:
    input:
        unpack(checkpoint_input),
        unpack(demo_coco_input),
        db=rules.coco_eval_subset.output.db,
    output:
        samples=f"{OUT}/samples_held_out/{{model}}/{{scope}}/samples.pt",
    params:
        checkpoint=checkpoint_of,
        coco_root=coco_root(),
        prompts=lambda wildcards: prompt_settings(config, wildcards.scope),
    threads: 1
    log:
        f"{LOGS}/prepare_eval_samples/{{model}}/{{scope}}.log",
    benchmark:
        f"{BENCH}/prepare_eval_samples/{{model}}/{{scope}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/prepare_samples.py"


rule validate:
    input:
        unpack(checkpoint_input),
        manifest=rules.autoquant.output.manifest,
        samples=rules.prepare_samples.output.samples,
        eval_samples=rules.prepare_eval_samples.output.samples,
    output:
        json=f"{CELL_DIR}/validation.json",
        markdown=f"{CELL_DIR}/validation.md",
    params:
        checkpoint=checkpoint_of,
        model_cfg=cell_model_settings,
        formats_cfg=cell_format_settings,
        autoquant_cfg=cell_autoquant_settings,
        validation_cfg=validation_settings(config),
        seed=config["seed"],
        extensions_cache=f"{OUT}/.cache/torch_extensions",
        gpu_locks=f"{OUT}/.locks/gpu",
    threads: 2
    resources:
        gpu=1,
        mem_mb=64000,
        runtime=60,
        batch_size=batch_size_for_attempt,
        attempt=attempt_number,
    retries: 2
    log:
        f"{LOGS}/validate/{{model}}/{{format}}/{{scope}}/{{size}}.log",
    benchmark:
        f"{BENCH}/validate/{{model}}/{{format}}/{{scope}}/{{size}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/validate.py"


rule validation_report:
    input:
        validations=per_cell(rules.validate.output.json),
    output:
        html=report(
            f"{REPORTS}/validation.html",
            caption="../docs/report/validation.rst",
            category="Summary",
            subcategory="Validation of rankings",
            labels={"item": "verdict per cell (table)", **ALL_CELLS},
        ),
        md=f"{REPORTS}/validation.md",
        csv=f"{REPORTS}/validation.csv",
    params:
        size_order=list(GRID["sizes"]),
    log:
        f"{LOGS}/validation_report.log",
    benchmark:
        f"{BENCH}/validation_report.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/validation_report.py"


rule validation_plot:
    input:
        validations=model_validations,
    output:
        png=report(
            f"{MODEL_REPORTS}/validation.png",
            caption="../docs/report/validation_plot.rst",
            category="{model}",
            subcategory="(g) Validation of the ranking",
            labels={"item": "predicted score vs measured damage (scatter)", **ALL_CELLS},
        ),
    params:
        size_order=list(GRID["sizes"]),
    log:
        f"{LOGS}/validation_plot/{{model}}.log",
    benchmark:
        f"{BENCH}/validation_plot/{{model}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/validation_plot.py"
