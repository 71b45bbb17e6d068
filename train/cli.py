"""`dualtoken train ...`: the training subcommands.

- `dualtoken train mllm --config FILE.yaml [--key value ...] [--resume] [--nproc N]`: MLLM instruction tuning
  (`train.mllm_train`); every argument after the config overrides it. `--nproc N` relaunches itself under
  torchrun with N local processes; for several nodes use torchrun or the DeepSpeed launcher directly (see
  `train.mllm_train`).
- `dualtoken train zero-to-model --checkpoint DIR --out DIR`: a ZeRO checkpoint -> a plain model directory.

Other training commands (`dualtoken train tokenizer`) register here as further `commands.add_parser` entries.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


class TrainCommandParser(argparse.ArgumentParser):
    """Subcommand parser; with `keep_unknown_as=NAME` unknown `--key value` pairs are kept in `NAME` (they are
    HfArgumentParser overrides) instead of being rejected."""

    def __init__(self, *args, keep_unknown_as: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_unknown_as = keep_unknown_as

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if self.keep_unknown_as is None:
            return namespace, extras
        setattr(namespace, self.keep_unknown_as, extras)
        return namespace, []


def _run_mllm(args: argparse.Namespace) -> int:
    argv = ["--config", args.config, *(["--resume"] if args.resume else []), *args.overrides]
    if args.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
        return subprocess.call([*command, "-m", "train.mllm_train", *argv], env=os.environ.copy())
    from train.mllm_train import run_script

    run_script(argv)
    return 0


def _run_zero_to_model(args: argparse.Namespace) -> int:
    from train.export import run_cli

    return run_cli(args)


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="training: MLLM instruction tuning, checkpoint conversion")
    commands = train.add_subparsers(
        dest="train_command", metavar="WHAT", required=True, parser_class=TrainCommandParser
    )
    mllm = commands.add_parser(
        "mllm",
        keep_unknown_as="overrides",
        help="instruction-tune the MLLM (HF Trainer, DeepSpeed, LoRA)",
        description="Any --key value after the config overrides it (e.g. --learning_rate 1e-4 --max_steps 100).",
    )
    mllm.add_argument("--config", required=True, help="YAML/JSON training config (see train/configs/)")
    mllm.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    mllm.add_argument("--nproc", type=int, default=1, help="local processes (relaunches under torchrun)")
    mllm.set_defaults(func=_run_mllm)

    export = commands.add_parser(
        "zero-to-model", help="convert a DeepSpeed ZeRO checkpoint to a model directory"
    )
    export.add_argument("--checkpoint", required=True, help="a checkpoint-N directory of a DeepSpeed run")
    export.add_argument("--out", required=True, help="output model directory")
    export.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    export.set_defaults(func=_run_zero_to_model)
