"""`python -m lokr_diffusion.schema --markdown | --write README.md | --text [SECTION]`: print or
refresh the config reference generated from the fields' help texts."""
from __future__ import annotations

import sys
from pathlib import Path

from . import help_text, markdown_reference, update_readme


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lokr_diffusion.schema",
                                     description="Print or refresh the generated config reference.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the README config reference")
    group.add_argument("--write", metavar="README", type=Path, help="rewrite the reference between the markers")
    group.add_argument("--text", nargs="?", const="", metavar="SECTION", help="print the --help-config text")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_reference())
    elif args.write:
        print(f"{args.write}: {'updated' if update_readme(args.write) else 'already up to date'}")
    else:
        print(help_text(args.text or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
