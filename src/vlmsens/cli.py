"""Command line.

* ``vlmsens rerender MANIFEST``: re-render a cell's JSON and Markdown from its manifest.
* ``vlmsens export MODEL/FORMAT/SCOPE/SIZE [--bits B]``: build the exported checkpoint of one
  cell's recipe (rule ``export``) with Snakemake, which runs whatever the cell still lacks first.
* ``vlmsens --version``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
from pathlib import Path

from . import __version__
from .cell import rerender as rerender_cell
from .config import parse_cell
from .errors import VlmsensError
from .failures import describe

TRACEBACK_ENV = "VLMSENS_TRACEBACK"


def export_targets(cell_text: str, budgets: list[float], config_path: Path) -> list[str]:
    """The folders rule ``export`` writes for ``cell_text`` at ``budgets`` (default: the cell's own target)."""
    import yaml

    if not config_path.is_file():
        raise VlmsensError(f"--configfile {config_path} does not exist")
    config = yaml.safe_load(config_path.read_text()) or {}
    cell = parse_cell(cell_text)
    if not budgets:
        targets = (config.get("autoquant") or {}).get("effective_bits") or {}
        if cell.format not in targets:
            raise VlmsensError(f"{config_path} sets no autoquant.effective_bits.{cell.format}; give --bits")
        budgets = [float(targets[cell.format])]
    outdir = str(config.get("outdir", "results")).rstrip("/")
    return [f"{outdir}/export/{cell_text}/bits-{b:g}" for b in budgets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmsens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vlmsens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    rerender = sub.add_parser("rerender", help="rewrite per-layer-sensitivity.{json,md} from quant_manifest.json alone")
    rerender.add_argument("manifest", type=Path, nargs="+")
    export = sub.add_parser("export", help="export one cell's recipe as a checked, deployable checkpoint (rule export)",
                            epilog="Arguments after -- go to Snakemake, e.g. -- --cores 4 --dry-run")
    export.add_argument("cell", help="model/format/scope/size, a cell of the config's grid")
    export.add_argument("--bits", type=float, action="append", default=[],
                        help="effective-bits budget (repeatable); default: the cell's autoquant.effective_bits target")
    export.add_argument("--configfile", type=Path, default=Path("config/config.yaml"), help="the run's config (default: %(default)s)")
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(passthrough) - (1 if "--" in argv else 0)])
    try:
        return run(args, passthrough)
    except Exception as err:  # noqa: BLE001 - a command line user gets one line, not a traceback
        if os.environ.get(TRACEBACK_ENV):
            traceback.print_exc()
        print(f"vlmsens: {error_line(err, args)}", file=sys.stderr)
        return 2 if args.command == "export" and isinstance(err, VlmsensError) else 1


def error_line(err: Exception, args: argparse.Namespace) -> str:
    """One line for a failed command: the error, the files it was given, and what to do."""
    job = f"vlmsens {args.command}"
    if isinstance(err, VlmsensError | OSError):
        return describe(err, job)
    files = ", ".join(str(p) for p in getattr(args, "manifest", []))
    return (f"{job} failed with {type(err).__name__}: {' '.join(str(err).split()) or '(no message)'}"
            + (f" (inputs: {files})" if files else "")
            + f"; check that each input is a file vlmsens wrote ({TRACEBACK_ENV}=1 shows the traceback)")


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    if args.command == "rerender":
        for manifest in args.manifest:
            folder = manifest.parent
            rerender_cell(str(manifest), str(folder / "per-layer-sensitivity.json"), str(folder / "per-layer-sensitivity.md"))
            print(f"re-rendered {folder}")
        return 0
    targets = export_targets(args.cell, args.bits, args.configfile)
    config_args = [] if args.configfile == Path("config/config.yaml") else ["--configfile", str(args.configfile), "--replace-workflow-config"]
    command = [sys.executable, "-m", "snakemake", *config_args, *targets, *passthrough]
    print("vlmsens export: " + " ".join(command[2:]), file=sys.stderr)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    raise SystemExit(main())
