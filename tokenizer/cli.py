"""`dualtoken tokenizer ...`: the DualToken tokenizer subcommands.

Each subcommand lives with the module that owns it and is added by one `module.register(tok_sub)` line in
`register` below; the teacher's is defined here (`dualtoken tokenizer teacher`). Heavy imports (torch,
transformers) happen inside the command functions so that building the parser stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path


def format_zero_shot(result: dict) -> str:
    """A small table of a `zero_shot_eval` result."""
    lines = [
        f"zero-shot on {result['split']}: single-object images, {result['classes']} color x shape classes "
        f"(chance {result['chance']:.1%})",
        f"{'subset':<8} {'n':>5} {'top-1':>7} {'color':>7} {'shape':>7}",
    ]
    for subset in ("all", "seen", "heldout"):
        row = result[subset]
        if row["n"] == 0:
            lines.append(f"{subset:<8} {0:>5} {'-':>7} {'-':>7} {'-':>7}")
        else:
            lines.append(
                f"{subset:<8} {row['n']:>5} {row['top1']:>7.1%} {row['color']:>7.1%} {row['shape']:>7.1%}"
            )
    return "\n".join(lines)


def _teacher(args) -> int:
    from dataclasses import fields

    from tokenizer.teacher import TeacherSettings, train_teacher
    from tokenizer.teacher_zero_shot import write_zero_shot, zero_shot_eval

    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(TeacherSettings)
        if getattr(args, f.name, None) is not None
    }
    try:
        settings = TeacherSettings(**overrides)
        metrics = train_teacher(args.data, args.out, settings, progress=not args.quiet, resume=args.resume)
        result = zero_shot_eval(args.out, args.data, split=args.eval_split)
    except (ValueError, FileNotFoundError) as error:
        print(f"dualtoken tokenizer teacher: error: {error}", file=sys.stderr)
        return 2
    write_zero_shot(args.out, result)
    print(
        f"teacher: {metrics['steps']} steps in {metrics['train_seconds']:.0f} s "
        f"({metrics['pairs_per_second']:.0f} pairs/s, {metrics['cpu_seconds']:.0f} CPU s in all), loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f}; "
        f"saved to {args.out}"
    )
    print(format_zero_shot(result))
    return 0


def register_teacher(tok_sub) -> None:
    """Add `dualtoken tokenizer teacher`."""
    parser = tok_sub.add_parser(
        "teacher",
        help="train the tiny SigLIP teacher on shapes-world captions, then score it zero-shot",
        description="Train the tiny SigLIP teacher (vision + text towers, sigmoid loss) on the train split of a "
        "shapes-world dataset, save it as an HF directory, and print its zero-shot color x shape accuracy.",
    )
    parser.add_argument("--data", required=True, type=Path, help="shapes-world dataset directory")
    parser.add_argument("--out", required=True, type=Path, help="teacher directory to write")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: TeacherSettings.steps)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="image-caption pairs per step")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--warmup-steps", dest="warmup_steps", type=int, help="linear warmup steps")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--image-size",
        dest="image_size",
        type=int,
        help="image side in pixels (default: TeacherSettings.image_size)",
    )
    parser.add_argument(
        "--patch-size",
        dest="patch_size",
        type=int,
        help="patch side in pixels (default: TeacherSettings.patch_size; 16 at --image-size 48 gives one token per "
        "layout slot of the shapes world)",
    )
    parser.add_argument(
        "--dense-loss-weight",
        dest="dense_loss_weight",
        type=float,
        help="weight of the per-patch class loss on the distilled layer (default: TeacherSettings.dense_loss_weight)",
    )
    parser.add_argument(
        "--dense-factorized",
        dest="dense_factorized",
        action="store_const",
        const=True,
        help="the per-patch head as color, shape and size classifiers instead of one over every combination",
    )
    parser.add_argument(
        "--checkpoint-every",
        dest="checkpoint_every",
        type=int,
        help="steps between checkpoints, 0 for none (default: TeacherSettings.checkpoint_every)",
    )
    parser.add_argument(
        "--keep-checkpoints", dest="keep_checkpoints", type=int, help="checkpoints kept, 0 for all"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run into --out from its newest checkpoint (same data and settings); a "
        "teacher already finished there with them is kept as it is",
    )
    parser.add_argument(
        "--bf16", action="store_true", default=None, help="bf16 autocast (fast on CPUs with native bf16)"
    )
    parser.add_argument(
        "--eval-split", default="test", help="split for the zero-shot evaluation (default test)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_teacher)


def register(subparsers) -> None:
    tokenizer = subparsers.add_parser(
        "tokenizer", help="the DualToken visual tokenizer: teacher, training, eval"
    )
    tok_sub = tokenizer.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    from tokenizer import ablate, encode, evaluate, probe, train_cli

    register_teacher(tok_sub)
    train_cli.register(tok_sub)
    evaluate.register(tok_sub)
    encode.register(tok_sub)
    ablate.register(tok_sub)
    probe.register(tok_sub)
