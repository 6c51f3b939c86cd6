# The whole set-up lives here: `make demo` and `make test` create or update the virtual environment
# in .venv (torch 2.14.1 + torchvision 0.29.1, then this package with its test extras) and run.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlmsens-installed
SNAKEMAKE := $(BIN)/snakemake
DEMO := --configfile config/demo.yaml --replace-workflow-config

.PHONY: env demo report test test-slurm lint dag clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

env: $(STAMP)

demo: $(STAMP)
	$(SNAKEMAKE) $(DEMO)
	$(SNAKEMAKE) $(DEMO) --report results/demo/report.zip
	@echo "demo report: results/demo/report.zip (unzip, open report/report.html), summary: results/demo/reports/summary.md"

report: $(STAMP)
	$(SNAKEMAKE) --report results/report.zip

test: $(STAMP)
	$(BIN)/python -m pytest

test-slurm: $(STAMP)
	$(BIN)/python -m pytest -m slurm tests/test_slurm.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_imports.py
	$(SNAKEMAKE) $(DEMO) --lint

dag: $(STAMP)
	$(SNAKEMAKE) $(DEMO) --rulegraph mermaid-js > docs/rulegraph.mmd
	$(SNAKEMAKE) $(DEMO) --rulegraph dot > docs/rulegraph.dot

clean-demo:
	rm -rf results/demo
