import torch

from vlmsens.logs import run_logged
from vlmsens.reports.recipes import write_cell_recipes

w = snakemake.wildcards
out = snakemake.output
torch.set_num_threads(snakemake.threads)
run_logged(
    snakemake.log[0], f"recipes {w.model}/{w.format}/{w.scope}/{w.size}", write_cell_recipes,
    snakemake.input.manifest, snakemake.input.state, list(snakemake.params.budgets),
    summary_json=out.summary_json, summary_md=out.summary_md, summary_html=out.summary_html,
    quant_cfgs=list(out.quant_cfgs), ignores=list(out.ignores),
    nested_quant_cfgs=list(out.nested_quant_cfgs), nested_ignores=list(out.nested_ignores),
)
