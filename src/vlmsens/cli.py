"""Command line: `vlmsens rerender MANIFEST` re-renders a cell's JSON and Markdown from its manifest."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from . import __version__
from .cell import rerender as rerender_cell
from .errors import VlmsensError
from .failures import describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmsens", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vlmsens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    rerender = sub.add_parser("rerender", help="rewrite per-layer-sensitivity.{json,md} from quant_manifest.json alone")
    rerender.add_argument("manifest", type=Path, nargs="+")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except Exception as err:  # noqa: BLE001 - a command line user gets one line, not a traceback
        if os.environ.get(TRACEBACK_ENV):
            traceback.print_exc()
        print(f"vlmsens: {error_line(err, args)}", file=sys.stderr)
        return 1


TRACEBACK_ENV = "VLMSENS_TRACEBACK"


def error_line(err: Exception, args: argparse.Namespace) -> str:
    """One line for a failed command: the error, the files it was given, and what to do."""
    job = f"vlmsens {args.command}"
    if isinstance(err, VlmsensError | OSError):
        return describe(err, job)
    files = ", ".join(str(p) for p in getattr(args, "manifest", []))
    return (f"{job} failed with {type(err).__name__}: {' '.join(str(err).split()) or '(no message)'}"
            + (f" (inputs: {files})" if files else "")
            + f"; check that each input is a file vlmsens wrote ({TRACEBACK_ENV}=1 shows the traceback)")


def run(args: argparse.Namespace) -> int:
    if args.command == "rerender":
        for manifest in args.manifest:
            folder = manifest.parent
            rerender_cell(str(manifest), str(folder / "per-layer-sensitivity.json"), str(folder / "per-layer-sensitivity.md"))
            print(f"re-rendered {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
