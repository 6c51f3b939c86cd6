# AutoQuantize cells: samples are encoded once per (model, scope, size) and shared by every format.


rule prepare_samples:
    input:
        unpack(checkpoint_input),
        unpack(demo_coco_input),
        db=rules.coco_subset.output.db,
    output:
        samples=f"{OUT}/samples/{{model}}/{{scope}}/{{size}}/samples.pt",
    params:
        checkpoint=checkpoint_of,
        coco_root=coco_root(),
        inputs=lambda wildcards: calibration_inputs(config, wildcards.scope),
        prompts=lambda wildcards: prompt_settings(config, wildcards.scope),
        # the GPU jobs' worker, warmed while the samples are encoded (vlmsens.gpupool.warm_gpu_worker)
        extensions_cache=f"{OUT}/.cache/torch_extensions",
        gpu_locks=f"{OUT}/.locks/gpu",
    priority: samples_priority
    threads: 1
    log:
        f"{LOGS}/prepare_samples/{{model}}/{{scope}}/{{size}}.log",
    benchmark:
        f"{BENCH}/prepare_samples/{{model}}/{{scope}}/{{size}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/prepare_samples.py"


rule autoquant:
    input:
        unpack(checkpoint_input),
        samples=rules.prepare_samples.output.samples,
        db=rules.coco_subset.output.db,
    output:
        json=f"{CELL_DIR}/per-layer-sensitivity.json",
        markdown=f"{CELL_DIR}/per-layer-sensitivity.md",
        manifest=f"{CELL_DIR}/quant_manifest.json",
        state=f"{CELL_DIR}/autoquant_state.pt",
    # When the GPU frees up, a waiting cell goes before the other GPU jobs, except its own validation
    # (rule validate), which goes first.
    priority: 1
    params:
        checkpoint=checkpoint_of,
        model_cfg=cell_model_settings,
        formats_cfg=cell_format_settings,
        autoquant_cfg=cell_autoquant_settings,
        seed=config["seed"],
        extensions_cache=f"{OUT}/.cache/torch_extensions",
        gpu_locks=f"{OUT}/.locks/gpu",
    # One core: the GPU does the work, and a GPU job asking for two waits until two cores are free
    # at once, which never happens while single-core CPU jobs (sample encoding) queue for them.
    threads: 1
    resources:
        gpu=1,
        mem_mb=64000,
        runtime=60,
        batch_size=batch_size_for_attempt,
        batch_halvings=batch_halvings_for_attempt,
        attempt=attempt_number,
    retries: 2
    log:
        f"{LOGS}/autoquant/{{model}}/{{format}}/{{scope}}/{{size}}.log",
    benchmark:
        f"{BENCH}/autoquant/{{model}}/{{format}}/{{scope}}/{{size}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/autoquant.py"
