# Damage against effective bits, measured: each rung's optimal and nested recipe, random recipes of
# the same bits and uniform quantization, applied on the held-out evaluation subset (vlmsens.ladder).
# Only the cells ship_this.ladder chooses (default: each format x scope at the largest size).


rule ladder:
    input:
        unpack(checkpoint_input),
        manifest=rules.autoquant.output.manifest,
        state=rules.autoquant.output.state,
        samples=rules.prepare_samples.output.samples,
        eval_samples=rules.prepare_eval_samples.output.samples,
    output:
        json=f"{CELL_DIR}/ladder.json",
    params:
        checkpoint=checkpoint_of,
        model_cfg=cell_model_settings,
        formats_cfg=cell_format_settings,
        autoquant_cfg=cell_autoquant_settings,
        ladder_cfg=ladder_settings(config),
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
        f"{LOGS}/ladder/{{model}}/{{format}}/{{scope}}/{{size}}.log",
    benchmark:
        f"{BENCH}/ladder/{{model}}/{{format}}/{{scope}}/{{size}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/ladder.py"
