"""Provenance of a result: package versions, git revision, input checksums, host."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import __version__
from .io import sha256_file

PACKAGES = ("torch", "torchvision", "transformers", "nvidia-modelopt", "liger-kernel", "triton", "tokenizers", "snakemake", "numpy", "pandas")


def package_versions(names=PACKAGES) -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "vlmsens": __version__}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), not only its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def process_started() -> float:
    """When this process started (seconds since the epoch): a job's wall time counts its start-up too."""
    import psutil

    return psutil.Process().create_time()


def git_revision(start: str | Path | None = None) -> dict[str, object]:
    cwd = Path(start or Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"revision": "unknown (not a git checkout)", "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": "unknown (git unavailable)", "dirty": None}


def checkpoint_fingerprint(checkpoint: str) -> dict[str, object]:
    """A cheap identity of a checkpoint: config checksum plus weight file names and sizes.

    Hashing several GB of safetensors per cell would cost more than the cell; the config
    checksum and the file sizes change whenever the weights are replaced.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        return {"hub_id": checkpoint}
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {
        "config_sha256": sha256_file(path / "config.json"),
        "files": {p.name: p.stat().st_size for p in files},
    }


class InputChecksums:
    """The sha256 of a job's input files, computed on a thread from the moment the job names them.

    A large cell's samples file is a few GB; hashing it took seconds of the job's wall time before
    the cell's work began. ``hashlib`` releases the GIL while it hashes large blocks, so the thread
    runs beside the job's own work; :meth:`result` waits for it when the provenance is written.
    """

    def __init__(self, inputs: dict[str, str]):
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmsens-checksums")
        self._future = executor.submit(lambda: {name: sha256_file(path) for name, path in sorted(inputs.items())})
        executor.shutdown(wait=False)

    def result(self) -> dict[str, str]:
        return self._future.result()


def collect(inputs: dict[str, str] | InputChecksums, checkpoint: str | None = None) -> dict[str, object]:
    """``inputs``: name → path of each input file, or their checksums already under way."""
    checksums = inputs.result() if isinstance(inputs, InputChecksums) else {
        name: sha256_file(path) for name, path in sorted(inputs.items())}
    return {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_revision(),
        "inputs_sha256": checksums,
        **({"checkpoint": checkpoint_fingerprint(checkpoint)} if checkpoint else {}),
    }
