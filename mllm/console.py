"""The `dualtoken` console script: one argparse tree whose subcommands live in the packages that own them.

Each top-level package may provide a `cli` module exposing `register(subparsers)`; it adds its subcommands and
sets `func` on each (a callable taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

PACKAGES = ("data_recipes", "tokenizer", "mllm", "train", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualtoken", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for package in PACKAGES:
        if importlib.util.find_spec(f"{package}.cli") is not None:
            importlib.import_module(f"{package}.cli").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
