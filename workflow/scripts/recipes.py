from vlmsens.gpupool import run_cpu_job_warm
from vlmsens.reports.recipes import write_cell_recipes

w = snakemake.wildcards
out = snakemake.output
# Reading the search state imports ModelOpt (most of a fresh process's time): a warm standby has it.
run_cpu_job_warm(
    snakemake, f"recipes {w.model}/{w.format}/{w.scope}/{w.size}", write_cell_recipes,
    manifest_path=snakemake.input.manifest, state_path=snakemake.input.state, budgets=list(snakemake.params.budgets),
    summary_json=out.summary_json, summary_md=out.summary_md, summary_html=out.summary_html,
    quant_cfgs=list(out.quant_cfgs), ignores=list(out.ignores),
    nested_quant_cfgs=list(out.nested_quant_cfgs), nested_ignores=list(out.nested_ignores),
)
