"""`dualtoken tokenizer train`: its options (shared with `dualtoken tokenizer ablate`), how they become
`TokenizerTrainSettings` (a JSON settings file, then the options, then `--set FIELD=VALUE` model overrides), and the
command itself, which trains through `tokenizer.train.train_tokenizer`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizer.train import TokenizerTrainSettings, train_tokenizer

CLI_FIELDS = (
    "preset",
    "steps",
    "batch_size",
    "lr",
    "backbone_lr_multiplier",
    "disc_lr",
    "warmup_steps",
    "seed",
    "split",
    "recipe_root",
    "threads",
    "mixed_precision",
    "num_workers",
    "log_every",
    "sample_every",
    "checkpoint_every",
    "keep_checkpoints",
)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`FIELD=VALUE` strings -> a dict; VALUE is read as JSON when it parses (numbers, lists, null), else text."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE (a DualTokenConfig field)")
        try:
            overrides[name] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[name] = raw
    return overrides


def settings_from_args(args) -> TokenizerTrainSettings:
    values: dict[str, Any] = {}
    if args.settings is not None:
        values.update(json.loads(Path(args.settings).read_text(encoding="utf-8")))
    values.update({name: getattr(args, name) for name in CLI_FIELDS if getattr(args, name, None) is not None})
    overrides = parse_overrides(args.set)
    if overrides:
        values["model_overrides"] = {**values.get("model_overrides", {}), **overrides}
    return TokenizerTrainSettings.from_dict(values)


def _train(args) -> int:
    import sys

    try:
        settings = settings_from_args(args)
        metrics = train_tokenizer(
            args.data,
            args.out,
            settings,
            teacher_dir=args.teacher,
            resume=args.resume,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"dualtoken tokenizer train: error: {error}", file=sys.stderr)
        return 2
    last = metrics["last"] or {}
    print(
        f"tokenizer: {metrics['steps']} steps in {metrics['train_seconds']:.0f} s; last loss "
        f"{last.get('loss', float('nan')):.4f}, train PSNR {last.get('psnr', float('nan')):.2f} dB; "
        f"saved to {args.out}"
    )
    return 0


def add_train_options(parser, resume: bool = True) -> None:
    """The options of `dualtoken tokenizer train` (shared with `ablate`)."""
    parser.add_argument(
        "--data", required=True, type=Path, help="shapes-world dataset, image folder or recipe (YAML/JSON)"
    )
    parser.add_argument("--teacher", required=True, type=Path, help="teacher SigLIP directory")
    parser.add_argument("--out", required=True, type=Path, help="run directory (final tokenizer at its top)")
    if resume:
        parser.add_argument(
            "--resume", action="store_true", help="continue from the newest checkpoint in --out"
        )
    parser.add_argument("--settings", type=Path, help="JSON file of TokenizerTrainSettings fields")
    parser.add_argument("--preset", help="tiny or paper (default tiny)")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="images per step and process")
    parser.add_argument("--lr", type=float, help="peak learning rate of the new modules")
    parser.add_argument("--backbone-lr-multiplier", dest="backbone_lr_multiplier", type=float)
    parser.add_argument("--disc-lr", dest="disc_lr", type=float, help="discriminator learning rate")
    parser.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--split", help="training split (default train)")
    parser.add_argument("--recipe-root", dest="recipe_root", help="${DATA} of a recipe given as --data")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--mixed-precision", dest="mixed_precision", choices=("auto", "no", "bf16", "fp16"))
    parser.add_argument("--num-workers", dest="num_workers", type=int, help="image-loading worker processes")
    parser.add_argument("--log-every", dest="log_every", type=int)
    parser.add_argument("--sample-every", dest="sample_every", type=int, help="steps between sample grids")
    parser.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    parser.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, help="0 keeps all")
    parser.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="DualTokenConfig override, e.g. --set gan_start_step=200 --set decoder_channel_mult=[1,1,2,2]",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def register(tok_sub) -> None:
    """Add `dualtoken tokenizer train`."""
    parser = tok_sub.add_parser(
        "train",
        help="train the DualToken tokenizer (distilled from and initialised by the teacher)",
        description="Train the DualToken tokenizer on a dataset split with an accelerate loop (run it under "
        "`accelerate launch` or `torchrun` for several GPUs). The tower starts from the teacher's vision tower; "
        "checkpoints are atomic and --resume continues to the same result.",
    )
    add_train_options(parser)
    parser.set_defaults(func=_train)
