"""A small demo grid through a real SLURM cluster: `snakemake --profile profiles/slurm`, end to end.

The grid (SLURM_GRID): one model, two formats, one scope, one size: two AutoQuant cells, which
SLURM runs at once, one on each fake GPU, and two validations, with every other rule of the
workflow once. The full 24-cell demo runs locally in tests/test_workflow.py; here the subject is the
executor, which two cells exercise as well as 24 (and in minutes instead of ~14).

tests/slurm/setup_cluster.sh brings up (idempotently) a one-node SLURM cluster on this machine from
the Debian packages slurm-wlm and munge: slurmctld + slurmd, authenticated by munge, installing the
packages first when they are missing. It needs root and apt-get; without them the test is skipped,
saying so. In CI (a fresh machine, root) it installs and runs.

What the cluster lacks, and what the test changes for it:

* GPUs. The node declares two *fake* GPUs as a gpu GRES (gres.conf points at two /dev/null-like
  device files). SLURM schedules the AutoQuant cells' `--gpus=1` exactly as on a GPU node, at most
  two at once, and sets CUDA_VISIBLE_DEVICES=0 or 1 in each job; no GPU request is mapped to CPU.
  The demo's AutoQuant runs on CPU (`autoquant.device: cpu` in config/demo.yaml), so nothing touches
  CUDA. The test checks that every cell's log shows the GPU slot taking SLURM's allocation.
* Size. The node has the CPUs and memory of this machine, so the profile's autoquant request
  (64000 MB, 4 CPUs per GPU) could never be scheduled: the test profile, generated from
  profiles/slurm/config.yaml, lowers it to 6000 MB and 1 CPU per GPU. Nothing else changes.
* Profiles. The command is the documented one, `--profile profiles/slurm --workflow-profile none`
  (with the test profile in place of profiles/slurm): without `--workflow-profile none`, Snakemake
  layers profiles/default over it, whose `resources: gpu=1` would run the cells one at a time. The
  test checks that both fake GPUs were used.
* Accounting. No slurmdbd: `sacct` (the plugin's default status command) fails without it, so the
  test profile sets `slurm-status-command: squeue`, which the plugin supports and trusts because
  MinJobAge is 1 h. Finished jobs are checked with `squeue --states=all` (comment = rule and
  wildcards) and with `sacct --completion` (the job completion log, jobcomp/filetxt).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import copy_workflow

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "tests" / "slurm" / "setup_cluster.sh"
SLURM_GRID = {"models": ["tiny_qwen3_vl"], "formats": ["wfp8_afp8", "wint8_aint8"], "scopes": ["all-layers"], "sizes": ["small"]}
N_CELLS = 2
CELL_FILES = ["per-layer-sensitivity.json", "per-layer-sensitivity.md", "quant_manifest.json", "autoquant_state.pt"]

# Overrides of profiles/slurm/config.yaml for the one small CPU node (see the module docstring).
TEST_PROFILE_OVERRIDES = {
    "slurm-status-command": "squeue",
    "slurm-init-seconds-before-status-checks": 5,
    "slurm-keep-successful-logs": True,
}
AUTOQUANT_OVERRIDES = {"mem_mb": 6000, "cpus_per_gpu": 1}

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]


def _why_not_runnable() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"a local SLURM cluster needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "bringing up SLURM (apt-get install slurm-wlm munge, /etc/slurm, daemons) needs root; run as root or in CI"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install slurm-wlm and munge"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = _why_not_runnable()
    if reason:
        pytest.skip(f"needs SLURM: {reason}")
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=1200)
    if proc.returncode in (77, 78):  # the script's own "cannot run here"
        pytest.skip(f"needs SLURM: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"SLURM cluster set-up failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _test_profile(workdir: Path) -> Path:
    profile = yaml.safe_load((workdir / "profiles" / "slurm" / "config.yaml").read_text())
    profile.update(TEST_PROFILE_OVERRIDES)
    for rule in ("autoquant", "validate", "ladder", "export"):
        profile["set-resources"][rule].update(AUTOQUANT_OVERRIDES)
    folder = workdir / "profiles" / "slurm-test"
    folder.mkdir()
    (folder / "config.yaml").write_text(
        "# profiles/slurm/config.yaml with tests/test_slurm.py's overrides for a one-node CPU cluster\n"
        + yaml.safe_dump(profile, sort_keys=False)
    )
    return folder


def _small_grid_config(workdir: Path) -> Path:
    """config/demo.yaml cut to SLURM_GRID, with a calibration set and COCO tree to match."""
    config = yaml.safe_load((workdir / "config" / "demo.yaml").read_text())
    config["grid"] = dict(SLURM_GRID)
    config["models"] = {m: config["models"][m] for m in SLURM_GRID["models"]}
    config.pop("export", None)  # the demo's exports name cells outside this grid; the demo run checks them
    config["sizes"] = {"small": 4}
    config["coco"]["demo"] = {**config["coco"]["demo"], "train_images": 16, "val_images": 8}
    config["coco"]["eval_images"] = 4
    path = workdir / "config" / "slurm-test.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.M)


def _log_interval(text: str) -> tuple[datetime, datetime]:
    """First and last time stamp of a job log."""
    stamps = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in LOG_TIME.findall(text)]
    assert stamps, "a job log without time stamps"
    return stamps[0], stamps[-1]


def _job_stats(output: str) -> Counter:
    """Snakemake's 'Job stats' table: jobs per rule."""
    table = output.split("Job stats:", 1)[1]
    counts = Counter()
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def test_small_grid_through_slurm(slurm_cluster, tmp_path, capsys):
    workdir = copy_workflow(tmp_path / "vlmsens")
    profile = _test_profile(workdir)
    config = _small_grid_config(workdir)

    # --workflow-profile none: profiles/default (one machine, `resources: gpu=1`) would otherwise be
    # layered over the SLURM profile and run the GPU cells one at a time (README, "Beyond one GPU").
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(profile.relative_to(workdir)), "--workflow-profile", "none",
           "--configfile", str(config.relative_to(workdir)), "--replace-workflow-config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "CUDA_VISIBLE_DEVICES"}
    t0 = time.monotonic()
    run = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=3300)
    wall = time.monotonic() - t0
    output = run.stdout + run.stderr
    (tmp_path / "snakemake.out").write_text(output)
    assert run.returncode == 0, f"snakemake --profile slurm failed after {wall:.0f} s:\n{output[-20000:]}"

    # Every non-local job was an sbatch job of this cluster.
    stats = _job_stats(output)
    remote = {rule: n for rule, n in stats.items() if rule != "all"}  # `all` has no action: runs locally
    job_ids = sorted(set(re.findall(r"submitted with SLURM jobid (\d+)", output)), key=int)
    assert len(job_ids) >= sum(remote.values()), f"{len(job_ids)} SLURM jobs for {remote}"

    queue = subprocess.run(["squeue", "--states=all", "--noheader", "--jobs", ",".join(job_ids),
                            "--format=%i|%j|%k|%T"], capture_output=True, text=True, check=True).stdout
    rows = [line.split("|") for line in queue.splitlines() if line.strip()]
    assert len(rows) == len(job_ids), f"squeue knows {len(rows)} of {len(job_ids)} jobs:\n{queue}"
    assert {row[3] for row in rows} == {"COMPLETED"}, queue
    assert len({row[1] for row in rows}) == 1, "the jobs of one run share the run's uuid as job name"
    per_rule = Counter(re.match(r"rule_(.+?)(_wildcards_.*)?$", row[2]).group(1) for row in rows)
    assert per_rule == Counter(remote), f"rule names in the SLURM comments {per_rule} != Snakemake's {remote}"

    completion = subprocess.run(["sacct", "--completion", "--parsable2", "--noheader", "--jobs", ",".join(job_ids),
                                 "--format=JobIdRaw,State"], capture_output=True, text=True, check=True).stdout
    done = {line.split("|")[0] for line in completion.splitlines() if line.endswith("|COMPLETED")}
    assert done == set(job_ids), f"sacct --completion misses {set(job_ids) - done}"

    # The cells, the reports, and each cell on the GPU SLURM gave it.
    out = workdir / "results" / "demo"
    cells = sorted(out.glob("autoquant/*/*/*/*"))
    assert len(cells) == N_CELLS
    for cell in cells:
        for name in CELL_FILES:
            assert (cell / name).is_file() and (cell / name).stat().st_size > 0, cell / name
    assert (out / "reports" / "summary.md").is_file()
    logs = sorted((out / "logs" / "autoquant").rglob("*.log"))
    assert len(logs) == N_CELLS
    devices = Counter()
    intervals = []
    for log in logs:
        text = log.read_text()
        m = re.search(r"GPU slot: SLURM job (\d+), using the GPU\(s\) SLURM allocated: CUDA_VISIBLE_DEVICES=(\S+)", text)
        assert m, f"{log} does not show the SLURM GPU allocation"
        assert m.group(1) in job_ids
        devices[m.group(2)] += 1
        intervals.append(_log_interval(text))
    # The two cells ran at once, one on each (fake) GPU: nothing serialises the GPU jobs on the Snakemake side.
    assert devices == Counter({"0": 1, "1": 1}), devices
    (start_a, end_a), (start_b, end_b) = intervals
    assert max(start_a, start_b) < min(end_a, end_b), f"the two cells did not overlap: {intervals}"
    validate_logs = sorted((out / "logs" / "validate").rglob("*.log"))
    assert len(validate_logs) == N_CELLS and len(list(out.glob("autoquant/*/*/*/*/validation.json"))) == N_CELLS
    for log in validate_logs:
        assert re.search(r"GPU slot: SLURM job \d+, using the GPU\(s\) SLURM allocated", log.read_text()), log
    sbatch_logs = list((workdir / ".snakemake" / "slurm_logs" / "rule_autoquant").rglob("*.log"))
    assert len(sbatch_logs) == N_CELLS

    with capsys.disabled():
        print(f"\n[test_slurm] {SLURM_GRID} through SLURM: {len(job_ids)} sbatch jobs "
              f"({', '.join(f'{r} {n}' for r, n in sorted(per_rule.items()))}), all COMPLETED; "
              f"{N_CELLS} cells; fake-GPU allocations {dict(sorted(devices.items()))}; "
              f"overrides for the CPU node: autoquant {AUTOQUANT_OVERRIDES}, status command squeue; "
              f"wall time {wall:.0f} s ({wall / 60:.1f} min)")
