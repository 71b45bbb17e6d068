"""What the ladders (`vqa_ladder.py`, `t2i_ladder.py`) share: their training options and the calibration's
optimizer (AdamW, betas 0.9/0.98, weight decay 0.01; linear warm-up then cosine decay), so that rungs of both
ladders train alike."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def add_training_args(p: argparse.ArgumentParser, steps: int, batch: int, warmup: int) -> None:
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", type=Path, default=None, help="append the result row here as one JSON line")


def parse_llm_overrides(pairs: list[str]) -> dict:
    """`--llm num_hidden_layers=8` pairs -> tiny Qwen2 config overrides (integers and floats parsed)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--llm: expected KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            raise SystemExit(f"--llm {pair!r}: expected a number after '='") from None
    return overrides


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in ("steps", "batch", "warmup", "threads", *names):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def optimizer_and_schedule(model: torch.nn.Module, args: argparse.Namespace):
    """(AdamW over the trainable parameters, its warm-up + cosine LambdaLR over `args.steps`)."""
    opt = torch.optim.AdamW(
        [q for q in model.parameters() if q.requires_grad], lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01
    )

    def factor(t: int) -> float:
        return (
            min(1.0, (t + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(t, args.steps) / args.steps))
        )

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def report_row(
    args: argparse.Namespace, row: dict, labels: list[str], scores: dict, columns: tuple[str, ...]
) -> dict:
    """Print the run as one Markdown table row (`labels`, then `scores[c]` per column, then the training minutes)
    and append `row` to `args.log` as a JSON line when given."""
    cells = [
        *labels,
        f"{args.steps} x {args.batch}",
        *(f"{scores.get(c, float('nan')):.1f}" for c in columns),
    ]
    print("| " + " | ".join(cells) + f" | {row['train_s'] / 60:.1f} min |")
    if args.log:
        with args.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def optimizer_step(model: torch.nn.Module, opt, sched, loss: torch.Tensor) -> None:
    """One update: backward, gradient clipping at norm 1.0 (as the trainer), optimizer and schedule step."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def reinit(llm: torch.nn.Module, pairs: list[str], flag: str = "--init", own_std: bool = False) -> None:
    """Start a tiny-preset Qwen2 built from `tiny_text_config` as the preset does: its query and key projections
    at the preset's `llm_query_key_init_std` when it sets one (the rest at `initializer_range`), unless `own_std`
    (the caller set its own `initializer_range`, which then holds for every matrix). Then the `q_proj,k_proj=0.1`
    pairs (given to `flag`): draw the weight matrices whose names hold any of the comma-separated parts anew
    from N(0, std)."""
    from mllm.presets import tiny_fields

    preset_std = tiny_fields().get("llm_query_key_init_std")
    if not own_std and preset_std is not None:
        from mllm.modeling import draw_query_key

        draw_query_key(llm, preset_std)
    for pair in pairs:
        keys, sep, value = pair.partition("=")
        try:
            std = float(value) if sep else -1.0
        except ValueError:
            std = -1.0
        if not keys or not std > 0:
            raise SystemExit(f"{flag}: expected NAMES=STD with a standard deviation > 0, got {pair!r}")
        hit = [
            w
            for name, w in llm.named_parameters()
            if w.dim() == 2 and any(k in name for k in keys.split(","))
        ]
        if not hit:
            raise SystemExit(f"{flag}: no weight matrix matches {keys!r}")
        with torch.no_grad():
            for w in hit:
                w.normal_(0.0, std)
