#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86_64, torch and CUDA already there): the packages of
# .venv that the machine's image lacks, one version each, no dependencies resolved (all are named).
# Run here after `make env`; then carry .whl with each GPU command and `source bench/gpu_env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
packages=(
  nvidia-modelopt==0.47.0 omegaconf==2.4.0 pulp==3.3.2 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 transformers==5.24.0 py-spy==0.4.1
  snakemake==9.27.1 snakemake-interface-common==1.23.0 snakemake-interface-executor-plugins==9.4.0
  snakemake-interface-logger-plugins==2.1.0 snakemake-interface-report-plugins==1.3.0
  snakemake-interface-scheduler-plugins==2.0.2 snakemake-interface-storage-plugins==4.4.1
  snakemake-executor-plugin-slurm==2.8.0 snakemake-executor-plugin-slurm-jobstep==0.6.1
  argparse-dataclass==2.0.0 conda-inject==1.3.2 configargparse==1.9.0 docutils==0.22.4 dpath==2.2.0
  fastjsonschema==2.22.3 gitdb==4.0.12 gitpython==3.2.1 humanfriendly==10.0 immutables==0.21
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  jupyter-core==5.9.1 nbformat==5.11.1 traitlets==5.16.1 platformdirs==4.14.8 smart-open==7.7.1
  smmap==5.0.3 sqlalchemy==2.0.58 sqlmodel==0.0.37 tenacity==9.2.1 throttler==1.2.3 yte==1.9.4
  tzdata==2026.6 sniffio==1.3.1 httpcore2==2.16.2 httpx2==2.16.2
  qwen-vl-utils==0.0.14 plotly==7.1.0 narwhals==2.29.0 liger-kernel==0.8.5
)
for package in "${packages[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$package"
done
# connection_pool is published as a source archive only (pure Python)
.venv/bin/pip wheel -q --no-deps -w .whl connection_pool==0.0.3
