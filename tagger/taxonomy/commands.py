"""`tagger taxonomy ...`: commands merchandisers and operators run on the taxonomies."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tagger.settings import get_settings
from tagger.taxonomy.loader import validate_taxonomies


def cmd_validate(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else get_settings().taxonomy_dir
    taxonomies, errors = validate_taxonomies(directory)
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        print(f"{len(errors)} problem(s) found in {directory}", file=sys.stderr)
        return 1
    assert taxonomies is not None
    for taxonomy in taxonomies.taxonomies:
        labels = sum(len(a.labels) for a in taxonomy.attributes)
        print(f"ok  {taxonomy.name:<12} version {taxonomy.version}  {len(taxonomy.attributes)} attribute(s), "
              f"{labels} label(s)  ({taxonomy.source})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tagger taxonomy", description="Work with the taxonomies.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("validate", help="check every taxonomy file; errors name file, line and key")
    p.add_argument("--dir", help="taxonomy folder (TAGGER_TAXONOMY_DIR)")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
