from vlmsens.logs import run_logged
from vlmsens.reports.registry import Job, analyses

analysis = analyses()[snakemake.rule]
wildcards = dict(snakemake.wildcards.items())
job = Job(
    inputs=list(snakemake.input),
    outputs=dict(snakemake.output.items()),
    wildcards=wildcards,
    params=dict(snakemake.params.items()),
    named={key: [value] if isinstance(value, str) else list(value) for key, value in snakemake.input.items()},
)
run_logged(snakemake.log[0], analysis.describe(wildcards), analysis.write, job)
