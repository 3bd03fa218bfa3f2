"""The command line the side-by-side benchmarks share: which problems, how many rounds,
and where the JSON goes."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def main(doc: str, run: Callable[[list[str], int], list[dict]], *, default: str,
         repeats: int, option: str = "--problems") -> None:
    """Parse ``option`` (a comma list of keys), ``--repeats`` and ``--json``; call
    ``run(keys, repeats)`` and write its rows to the JSON file if one is named."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument(option, dest="keys", default=default)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = run(args.keys.split(","), args.repeats)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
