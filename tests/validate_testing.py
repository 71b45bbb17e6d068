"""Helpers of the `dualtoken data validate` tests: run the command and read its problem lines, edit JSON / JSONL
files in place, write a small PNG."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from data_recipes import cli as data_cli


def run_validate(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and printed output (stdout, then stderr) of `dualtoken data validate ARGV`."""
    parser = argparse.ArgumentParser(prog="dualtoken")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "validate", *argv, "--no-progress"])
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def problem_lines(out: str, kind: str) -> list[str]:
    return [line for line in out.splitlines() if line.endswith(f"[{kind}]")]


def assert_reported(out: str, file: Path, record: str, kind: str, expected: str) -> str:
    """The printed problem of `kind` for `record` of `file`; its message must hold `expected`."""
    lines = [line for line in problem_lines(out, kind) if line.startswith(f"{file}: record {record}")]
    assert lines, f"no [{kind}] problem for {file} record {record} in:\n{out}"
    assert expected in lines[0], lines[0]
    return lines[0]


def read_json(path: Path):
    return json.loads(path.read_text())


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload))


def edit_jsonl(path: Path, line: int, edit: Callable[[dict], None]) -> None:
    rows = path.read_text().splitlines()
    row = json.loads(rows[line - 1])
    edit(row)
    rows[line - 1] = json.dumps(row)
    path.write_text("\n".join(rows) + "\n")


def write_png(path: Path, size: int = 32) -> None:
    Image.new("RGB", (size, size), (200, 30, 30)).save(path, format="PNG")
