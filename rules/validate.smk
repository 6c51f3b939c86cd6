# Validation of rankings: does quantizing what a cell ranks "fragile" really hurt more than what it
# ranks "safe"? Measured on the held-out evaluation subset, disjoint from calibration.


rule prepare_eval_samples:
    input:
        unpack(checkpoint_input),
        unpack(demo_coco_input),
        db=rules.coco_eval_subset.output.db,
    output:
        samples=f"{OUT}/samples_held_out/{{model}}/{{scope}}/samples.pt",
    # after the smallest calibration subsets, before the others (see samples_priority)
    priority: 1
    params:
        checkpoint=checkpoint_of,
        coco_root=coco_root(),
        inputs=lambda wildcards: calibration_inputs(config, wildcards.scope),
        prompts=lambda wildcards: prompt_settings(config, wildcards.scope),
        # the GPU jobs' worker, warmed while the samples are encoded (vlmsens.gpupool.warm_gpu_worker)
        extensions_cache=f"{OUT}/.cache/torch_extensions",
        gpu_locks=f"{OUT}/.locks/gpu",
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
        state=rules.autoquant.output.state,
        samples=rules.prepare_samples.output.samples,
        eval_samples=rules.prepare_eval_samples.output.samples,
    output:
        json=f"{CELL_DIR}/validation.json",
        markdown=f"{CELL_DIR}/validation.md",
    # Right after its cell: run by the warm worker in the process that ran the cell, it takes the
    # cell's search model from it instead of loading and restoring it (vlmsens.handoff).
    priority: 2
    params:
        checkpoint=checkpoint_of,
        model_cfg=cell_model_settings,
        formats_cfg=cell_format_settings,
        autoquant_cfg=cell_autoquant_settings,
        validation_cfg=validation_settings(config),
        seed=config["seed"],
        extensions_cache=f"{OUT}/.cache/torch_extensions",
        gpu_locks=f"{OUT}/.locks/gpu",
    threads: 1  # a GPU job: see rule autoquant
    resources:
        gpu=1,
        mem_mb=64000,
        runtime=60,
        batch_size=batch_size_for_attempt,
        batch_halvings=batch_halvings_for_attempt,
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
