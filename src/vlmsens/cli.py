"""Command line: `vlmsens rerender MANIFEST` re-renders a cell's JSON and Markdown from its manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cell import rerender as rerender_cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmsens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rerender = sub.add_parser("rerender", help="rewrite per-layer-sensitivity.{json,md} from quant_manifest.json alone")
    rerender.add_argument("manifest", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "rerender":
        for manifest in args.manifest:
            folder = manifest.parent
            rerender_cell(str(manifest), str(folder / "per-layer-sensitivity.json"), str(folder / "per-layer-sensitivity.md"))
            print(f"re-rendered {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
