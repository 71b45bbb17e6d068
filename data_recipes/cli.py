"""`dualtoken data ...`: the data subcommands (shapes-world generation, dataset validation)."""

from __future__ import annotations

from data_recipes import shapes_dataset, validate


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="generate and validate datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    shapes_dataset.register(data_sub)
    validate.register(data_sub)
