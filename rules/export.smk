# Chosen recipes as deployable checkpoints: one folder per (cell, budget), written by ModelOpt's
# exporter, reloaded and checked against the fake-quantized model before it appears.


rule export:
    input:
        unpack(checkpoint_input),
        manifest=rules.autoquant.output.manifest,
        state=rules.autoquant.output.state,
        samples=rules.prepare_samples.output.samples,
        eval_samples=rules.prepare_eval_samples.output.samples,
    output:
        checkpoint=directory(f"{EXPORT_DIR}/bits-{{budget}}"),
        markdown=f"{EXPORT_DIR}/bits-{{budget}}.md",
        html=report(
            f"{EXPORT_DIR}/bits-{{budget}}.html",
            caption="../docs/report/export.rst",
            category=report_category(MODEL_CATEGORY),
            subcategory=report_subcategory(MODEL_CATEGORY, EXPORT_SUBCATEGORY),
            labels={"item": "export at {budget} bits (check)", "format": "{format}", "scope": "{scope}", "size": "{size}"},
        ),
    params:
        checkpoint=checkpoint_of,
        model_cfg=cell_model_settings,
        formats_cfg=cell_format_settings,
        autoquant_cfg=cell_autoquant_settings,
        export_cfg=export_settings(config),
        budget=lambda wildcards: float(wildcards.budget),
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
        f"{LOGS}/export/{{model}}/{{format}}/{{scope}}/{{size}}/bits-{{budget}}.log",
    benchmark:
        f"{BENCH}/export/{{model}}/{{format}}/{{scope}}/{{size}}/bits-{{budget}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/export.py"
