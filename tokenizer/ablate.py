"""The paper's tokenizer ablation at the tiny scale (`dualtoken tokenizer ablate`): each variant trains with the same
settings and budget (steps, batch, optimizer, seed) as the full DualToken run, is scored by `tokenizer.evaluate`,
and one markdown table compares them (zero-shot, FD, PSNR, SSIM, as in the paper's table).

Variants (`ABLATIONS`, DualTokenConfig overrides on top of the run's):
    dualtoken      the full model: pixel branch at the shallow tap (+ shortcut; the tiny preset taps the patch
                   embedding, per token), semantic branch at the deep tap
    same_layer     pixel and semantic branches both read the deep (semantic) layer through the official attention
                   projection, no shortcut (VILA-U-like single-layer design, still two quantizers)
    recon_only     shallow pixel tap, no semantic distillation (semantic_weight 0: the semantic path is never
                   trained, so its zero-shot measures what reconstruction training leaves of the teacher's tower)
    semantic_only  distillation only (reconstruction, LPIPS and GAN weights 0: the decoder is never trained)

Each variant lives in `out_dir/<variant>/` (a `train_tokenizer` run dir with `eval_<split>/`); finished variants
are reused, interrupted ones resume, so a re-run only does what is missing. `ablation.md` and `ablation.json`
summarise them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokenizer.evaluate import METRICS_NAME as EVAL_METRICS
from tokenizer.evaluate import evaluate_tokenizer
from tokenizer.train import METRICS_NAME as TRAIN_METRICS
from tokenizer.train import TokenizerTrainSettings, checkpoint_dirs, train_tokenizer

ABLATIONS: dict[str, str] = {
    "dualtoken": "DualToken: pixel at the shallow tap, semantic at the deep tap",
    "same_layer": "same layer: pixel and semantic both at the deep tap",
    "recon_only": "reconstruction only (shallow tap, no distillation)",
    "semantic_only": "semantic only (distillation, no reconstruction loss)",
}


def ablation_overrides(variant: str, semantic_layer: int) -> dict[str, Any]:
    """The DualTokenConfig overrides of `variant` for a tower whose semantic tap is `semantic_layer`."""
    if variant == "dualtoken":
        return {}
    if variant == "same_layer":
        return {"pixel_layer": semantic_layer, "shortcut_layer": None, "pixel_projection_attention": True}
    if variant == "recon_only":
        return {"semantic_weight": 0.0}
    if variant == "semantic_only":
        return {"recon_l2_weight": 0.0, "lpips_weight": 0.0, "gan_weight": 0.0}
    raise ValueError(f"unknown ablation {variant!r}; expected one of {list(ABLATIONS)}")


def variant_settings(
    variant: str, settings: TokenizerTrainSettings, teacher_dir: str | os.PathLike
) -> TokenizerTrainSettings:
    """`settings` with the variant's overrides merged into its model overrides (budget unchanged)."""
    from tokenizer.presets import preset_fields

    fields = preset_fields(settings.preset, backbone_dir=teacher_dir, **settings.config_fields())
    overrides = {**settings.model_overrides, **ablation_overrides(variant, fields["semantic_layer"])}
    return replace(settings, model_overrides=overrides)


def _taps(run_dir: Path) -> tuple[str, str]:
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    pixel = f"L{config['pixel_layer']}" if config["pixel_layer"] else "patch embedding"
    if config.get("shortcut_layer") is not None:
        pixel += f" + {config['shortcut_weight']:g} x L{config['shortcut_layer']}"
    if not config.get("pixel_projection_attention", True):
        pixel += ", per-token projection"
    return pixel, f"L{config['semantic_layer']}"


def run_ablations(
    data_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TokenizerTrainSettings | None = None,
    variants: list[str] | None = None,
    split: str = "test",
    existing: dict[str, str | os.PathLike] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse / resume) and evaluate every variant, then write `ablation.md` and `ablation.json` into
    `out_dir`. `existing` maps a variant to an already trained run directory with the same settings (e.g. the
    demo's tokenizer for "dualtoken"), which is then only evaluated."""
    settings = settings or TokenizerTrainSettings()
    variants = variants or list(ABLATIONS)
    existing = {name: Path(path) for name, path in (existing or {}).items()}
    for name in [*variants, *existing]:
        ablation_overrides(name, 1)  # validates the name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for variant in variants:
        run_dir = existing.get(variant, out / variant)
        eval_dir = out / variant / f"eval_{split}"
        start = time.perf_counter()
        if not (run_dir / TRAIN_METRICS).is_file():
            if variant in existing:
                raise FileNotFoundError(
                    f"run_ablations: {run_dir} has no {TRAIN_METRICS} (not a finished run)"
                )
            train_tokenizer(
                data_dir,
                run_dir,
                variant_settings(variant, settings, teacher_dir),
                teacher_dir=teacher_dir,
                resume=bool(checkpoint_dirs(run_dir)),
                progress=progress,
            )
        if (eval_dir / EVAL_METRICS).is_file():
            metrics = json.loads((eval_dir / EVAL_METRICS).read_text(encoding="utf-8"))
        else:
            metrics = evaluate_tokenizer(
                run_dir, data_dir, teacher_dir, split=split, out_dir=eval_dir, progress=progress
            )
        train = json.loads((run_dir / TRAIN_METRICS).read_text(encoding="utf-8"))
        pixel_tap, semantic_tap = _taps(run_dir)
        rows[variant] = {
            "description": ABLATIONS[variant],
            "run": str(run_dir),
            "pixel_tap": pixel_tap,
            "semantic_tap": semantic_tap,
            "steps": train["steps"],
            "batch_size": train["settings"]["batch_size"],
            "train_seconds": train["train_seconds"],
            "zero_shot_top1": metrics.get("zero_shot_top1"),
            "teacher_zero_shot_top1": metrics.get("teacher_zero_shot_top1"),
            "reconstruction_fd": metrics["reconstruction_fd"],
            "psnr": metrics["psnr"],
            "ssim": metrics["ssim"],
            "pixel_usage": metrics["codebooks"]["pixel"]["usage"],
            "semantic_usage": metrics["codebooks"]["semantic"]["usage"],
            "seconds": time.perf_counter() - start,
        }
    result = {
        "split": split,
        "data": str(Path(data_dir).resolve()),
        "teacher": str(Path(teacher_dir).resolve()),
    }
    result["variants"] = rows
    for name, text in (
        ("ablation.json", json.dumps(result, indent=2) + "\n"),
        ("ablation.md", format_table(result)),
    ):
        tmp = out / f".tmp-{name}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(result: dict[str, Any]) -> str:
    """The ablation as one markdown table (zero-shot, FD, PSNR, SSIM first, as the paper's)."""
    rows = result["variants"]
    teacher = next(
        (r["teacher_zero_shot_top1"] for r in rows.values() if r["teacher_zero_shot_top1"] is not None), None
    )
    lines = [
        f"# Tokenizer ablation ({result['split']} split, same budget for every variant)",
        "",
        f"Teacher zero-shot top-1: {_pct(teacher)}%. FD is the Fréchet distance on the teacher's pooled SigLIP "
        "features of originals vs reconstructions (not Inception rFID).",
        "",
        "| variant | pixel tap | semantic tap | zero-shot top-1 (%) | FD | PSNR (dB) | SSIM | pixel / semantic usage (%) "
        "| steps x batch | train s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        lines.append(
            f"| {row['description']} | {row['pixel_tap']} | {row['semantic_tap']} | {_pct(row['zero_shot_top1'])} | "
            f"{row['reconstruction_fd']:.3f} | {row['psnr']:.2f} | {row['ssim']:.4f} | "
            f"{_pct(row['pixel_usage'])} / {_pct(row['semantic_usage'])} | {row['steps']} x {row['batch_size']} | "
            f"{row['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI
def _ablate(args) -> int:
    import sys

    from tokenizer.train_cli import settings_from_args

    try:
        settings = settings_from_args(args)
        existing = {"dualtoken": args.dualtoken} if args.dualtoken is not None else None
        result = run_ablations(
            args.data,
            args.teacher,
            args.out,
            settings,
            variants=args.variants,
            split=args.eval_split,
            existing=existing,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"dualtoken tokenizer ablate: error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"table: {Path(args.out) / 'ablation.md'}")
    return 0


def register(tok_sub) -> None:
    """Add `dualtoken tokenizer ablate` (it takes every `dualtoken tokenizer train` option)."""
    from tokenizer.train_cli import add_train_options

    parser = tok_sub.add_parser(
        "ablate",
        help="train and evaluate the same-layer / recon-only / semantic-only ablations next to DualToken",
        description="Train every ablation variant with the same settings and budget as the DualToken run, "
        "evaluate each, and write one markdown table (zero-shot, FD, PSNR, SSIM). Finished variants are reused; "
        "--out is the directory holding one run per variant.",
    )
    add_train_options(parser, resume=False)
    parser.add_argument(
        "--variants", nargs="+", choices=list(ABLATIONS), help="subset of variants (default all)"
    )
    parser.add_argument(
        "--eval-split", dest="eval_split", default="test", help="evaluation split (default test)"
    )
    parser.add_argument("--dualtoken", type=Path, help="an existing full DualToken run to reuse for that row")
    parser.set_defaults(func=_ablate)
