"""The ``hessfunc`` command: ``hessfunc demo`` and ``hessfunc analyze``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hessfunc",
        description="Second- and higher-order derivatives of PyTorch models, the functional way.",
    )
    parser.add_argument("--version", action="version", version=f"hessfunc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    demo = sub.add_parser("demo", help="train the built-in example and report its curvature")
    demo.add_argument("--out", default="hessfunc-demo", help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        print("hessfunc demo: the example problem's report lands with the demo issue; "
              "nothing was written.")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
