"""Evaluation of a trained DualToken tokenizer (`dualtoken tokenizer eval`): reconstruction, semantics, codebooks.

Metrics on one split (shapes-world dataset or image folder), every image encoded and its pixel codes decoded:
- PSNR and SSIM (`tokenizer.image_metrics`) of the clamped reconstruction vs the original, both in [-1, 1] mapped to
  [0, 1]; mean over images (per-image PSNR capped at 100 dB, so one exact reconstruction cannot make it inf).
- Reconstruction FD: the Fréchet distance between Gaussians fitted to the *teacher's* pooled SigLIP features
  (vision tower `pooler_output`, unnormalised) of the originals and of the reconstructions. It is an rFID-style
  number on teacher features, not Inception rFID, and is comparable only between runs scored with the same teacher.
- Zero-shot top-1 (shapes-world datasets): the semantic path's pooled embedding (`DualTokenModel.image_embedding`,
  the quantized semantic codes through the rest of the tower) scored against the teacher's text embeddings of the
  48 color x shape class prompts (`tokenizer.teacher_zero_shot.zero_shot_eval`), next to the teacher's own image tower on the
  same images; also per attribute and for seen / held-out pairs.
- Codebook usage per branch: share of the K codes used anywhere in the split (all depths), the entropy of the code
  histogram in bits (and normalised by log2 K), its perplexity, and the usage at each depth.

`evaluate_tokenizer` returns the metrics and, given `out_dir`, writes `metrics.json`, `report.md` and
`reconstructions.png` (originals above, reconstructions below) there.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from tokenizer.encode import dataset_images, default_device, is_shapes_dataset, load_pixels, load_tokenizer
from tokenizer.image_metrics import frechet_distance, psnr, ssim
from tokenizer.image_processing import reconstruction_grid

PSNR_CAP = 100.0  # dB; a perfect reconstruction has infinite PSNR, which would swamp the mean
METRICS_NAME = "metrics.json"
REPORT_NAME = "report.md"
GRID_NAME = "reconstructions.png"


def pair_scores(originals: torch.Tensor, reconstructions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (PSNR in dB, capped at `PSNR_CAP`; SSIM) of two (N, 3, H, W) batches in [-1, 1]; the
    reconstructions are clamped to [-1, 1] first, as a saved image would be."""
    originals, reconstructions = originals.float().cpu(), reconstructions.float().cpu().clamp(-1, 1)
    scores = psnr(originals, reconstructions, value_range=(-1, 1)).clamp(max=PSNR_CAP)
    return scores, ssim(originals, reconstructions, value_range=(-1, 1))


def codebook_statistics(codes: torch.Tensor, codebook_size: int) -> dict[str, Any]:
    """Usage and entropy of code grids (..., D) over a K-code codebook (all depths together, and per depth)."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=codebook_size).double()
    p = counts / counts.sum()
    nonzero = p[p > 0]
    entropy = float(-(nonzero * nonzero.log2()).sum())
    per_depth = [
        int((torch.bincount(codes[..., d].reshape(-1).long(), minlength=codebook_size) > 0).sum())
        for d in range(codes.shape[-1])
    ]
    return {
        "codebook_size": codebook_size,
        "used_codes": int((counts > 0).sum()),
        "usage": float((counts > 0).double().mean()),
        "entropy_bits": entropy,
        "normalized_entropy": entropy / math.log2(codebook_size),
        "perplexity": 2.0**entropy,
        "used_codes_per_depth": per_depth,
    }


def _teacher_dir_of(tokenizer_dir: Path) -> Path | None:
    from tokenizer.train import METRICS_NAME as TRAIN_METRICS

    path = tokenizer_dir / TRAIN_METRICS
    if path.is_file():
        return Path(json.loads(path.read_text(encoding="utf-8"))["teacher"])
    return None


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike | None = None,
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    grid_images: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the tokenizer at `tokenizer_dir` on `split` of `data_dir` (see the module docstring). The teacher
    defaults to the one recorded in the tokenizer's train_metrics.json."""
    from tokenizer.teacher_zero_shot import zero_shot_eval
    from tokenizer.train import load_teacher_tower

    start = time.perf_counter()
    tokenizer_dir, data_dir = Path(tokenizer_dir), Path(data_dir)
    teacher_dir = Path(teacher_dir) if teacher_dir is not None else _teacher_dir_of(tokenizer_dir)
    if teacher_dir is None:
        raise ValueError(
            f"evaluate_tokenizer: no teacher given and {tokenizer_dir} records none; pass teacher_dir (the FD "
            "features and the zero-shot text embeddings come from it)"
        )
    device = default_device()
    model = load_tokenizer(tokenizer_dir, device)
    teacher = load_teacher_tower(teacher_dir).to(device)
    images = dataset_images(data_dir, split)[:limit]
    if len(images) < 2:
        raise ValueError(
            f"evaluate_tokenizer: {data_dir} split {split!r} has {len(images)} image(s); need >= 2"
        )
    cfg = model.config
    psnrs, ssims, real_features, recon_features = [], [], [], []
    codes: dict[str, list[torch.Tensor]] = {"pixel": [], "semantic": []}
    grid_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    bar = tqdm(total=len(images), desc="eval", unit="img", disable=not progress)
    for first in range(0, len(images), batch_size):
        pixels = load_pixels(images[first : first + batch_size], cfg.image_size).to(device)
        encoded = model.encode(pixels)
        reconstruction = model.decode(encoded.pixel).float().clamp(-1, 1)
        batch_psnr, batch_ssim = pair_scores(pixels, reconstruction)
        psnrs.append(batch_psnr)
        ssims.append(batch_ssim)
        real_features.append(teacher(pixel_values=pixels).pooler_output.float().cpu())
        recon_features.append(teacher(pixel_values=reconstruction).pooler_output.float().cpu())
        codes["pixel"].append(encoded.pixel.cpu())
        codes["semantic"].append(encoded.semantic.cpu())
        if sum(len(a) for a, _ in grid_pairs) < grid_images:
            grid_pairs.append((pixels.cpu(), reconstruction.cpu()))
        bar.update(len(pixels))
    bar.close()
    psnr_all, ssim_all = torch.cat(psnrs), torch.cat(ssims)
    metrics: dict[str, Any] = {
        "tokenizer": str(tokenizer_dir.resolve()),
        "teacher": str(teacher_dir.resolve()),
        "data": str(data_dir.resolve()),
        "split": split,
        "images": len(images),
        "psnr": float(psnr_all.mean()),
        "ssim": float(ssim_all.mean()),
        "reconstruction_fd": frechet_distance(torch.cat(real_features), torch.cat(recon_features)),
        "fd_features": "teacher SigLIP pooled output (not Inception)",
        "codebooks": {
            branch: codebook_statistics(torch.cat(grids), cfg.codebook_size)
            for branch, grids in codes.items()
        },
    }
    if is_shapes_dataset(data_dir):

        def semantic_path(pixels: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [
                    model.image_embedding(pixels[i : i + batch_size].to(device)).cpu()
                    for i in range(0, len(pixels), batch_size)
                ]
            )

        metrics["zero_shot"] = {
            "dualtoken": zero_shot_eval(teacher_dir, data_dir, split, image_features=semantic_path),
            "teacher": zero_shot_eval(teacher_dir, data_dir, split),
        }
        metrics["zero_shot_top1"] = metrics["zero_shot"]["dualtoken"]["all"]["top1"]
        metrics["teacher_zero_shot_top1"] = metrics["zero_shot"]["teacher"]["all"]["top1"]
    metrics["seconds"] = time.perf_counter() - start
    if out_dir is not None:
        originals = torch.cat([a for a, _ in grid_pairs])[:grid_images]
        recons = torch.cat([b for _, b in grid_pairs])[:grid_images]
        write_report(metrics, Path(out_dir), reconstruction_grid(originals, recons))
    return metrics


def _percent(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def format_report(metrics: dict[str, Any]) -> str:
    """The markdown report of an `evaluate_tokenizer` result."""
    lines = [
        f"# DualToken tokenizer evaluation: {metrics['split']} split",
        "",
        f"- tokenizer: `{metrics['tokenizer']}`",
        f"- teacher: `{metrics['teacher']}`",
        f"- data: `{metrics['data']}` ({metrics['images']} images)",
        "",
        "## Reconstruction",
        "",
        "| PSNR (dB) | SSIM | reconstruction FD |",
        "|---:|---:|---:|",
        f"| {metrics['psnr']:.2f} | {metrics['ssim']:.4f} | {metrics['reconstruction_fd']:.4f} |",
        "",
        "Reconstruction FD is the Fréchet distance between the teacher's pooled SigLIP features of the originals "
        "and of the reconstructions (not Inception rFID; compare only runs scored with the same teacher).",
        "",
        f"![reconstructions]({GRID_NAME}) (originals above, reconstructions below)",
        "",
    ]
    if "zero_shot" in metrics:
        lines += [
            "## Zero-shot color x shape classification (single-object images)",
            "",
            "| image features | n | top-1 | color | shape | top-1 seen | top-1 held-out |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, label in (("dualtoken", "DualToken semantic path"), ("teacher", "teacher SigLIP")):
            result = metrics["zero_shot"][name]
            lines.append(
                f"| {label} | {result['all']['n']} | {_percent(result['all']['top1'])} | "
                f"{_percent(result['all']['color'])} | {_percent(result['all']['shape'])} | "
                f"{_percent(result['seen']['top1'])} | {_percent(result['heldout']['top1'])} |"
            )
        lines.append("")
    lines += [
        "## Codebooks",
        "",
        "| branch | K | used | usage | entropy (bits) | normalised entropy | perplexity | used per depth |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for branch, stats in metrics["codebooks"].items():
        lines.append(
            f"| {branch} | {stats['codebook_size']} | {stats['used_codes']} | {_percent(stats['usage'])} | "
            f"{stats['entropy_bits']:.2f} | {stats['normalized_entropy']:.3f} | {stats['perplexity']:.1f} | "
            f"{', '.join(str(n) for n in stats['used_codes_per_depth'])} |"
        )
    return "\n".join(lines) + "\n"


def write_report(metrics: dict[str, Any], out_dir: Path, grid: Image.Image) -> None:
    """metrics.json, report.md and reconstructions.png in `out_dir` (each written to a temp file, then renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, write in (
        (METRICS_NAME, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")),
        (REPORT_NAME, lambda p: p.write_text(format_report(metrics), encoding="utf-8")),
        (GRID_NAME, lambda p: grid.save(p, format="PNG")),
    ):
        tmp = out_dir / f".tmp-{name}"
        write(tmp)
        os.replace(tmp, out_dir / name)


def summary_line(metrics: dict[str, Any]) -> str:
    parts = [
        f"PSNR {metrics['psnr']:.2f} dB",
        f"SSIM {metrics['ssim']:.4f}",
        f"FD {metrics['reconstruction_fd']:.4f}",
    ]
    if "zero_shot_top1" in metrics:
        parts.append(
            f"zero-shot {_percent(metrics['zero_shot_top1'])} (teacher {_percent(metrics['teacher_zero_shot_top1'])})"
        )
    parts += [f"{b} usage {_percent(s['usage'])}" for b, s in metrics["codebooks"].items()]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- CLI
def _eval(args) -> int:
    import sys

    torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else args.model / f"eval_{args.split}"
    try:
        metrics = evaluate_tokenizer(
            args.model,
            args.data,
            args.teacher,
            split=args.split,
            out_dir=out,
            batch_size=args.batch_size,
            limit=args.limit,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"dualtoken tokenizer eval: error: {error}", file=sys.stderr)
        return 2
    print(summary_line(metrics))
    print(f"report: {out / REPORT_NAME}")
    return 0


def register(tok_sub, name: str = "eval") -> None:
    """Add `dualtoken tokenizer eval` (`eval.cli` adds the same command as `dualtoken eval tokenizer`)."""
    parser = tok_sub.add_parser(
        name,
        help="PSNR, SSIM, reconstruction FD, zero-shot and codebook usage of a trained tokenizer",
        description="Evaluate a trained tokenizer on a dataset split: PSNR, SSIM, reconstruction FD (Fréchet "
        "distance on the teacher's pooled SigLIP features), zero-shot top-1 of the semantic path next to the "
        "teacher's, codebook usage and entropy per branch. Writes metrics.json, report.md and "
        "reconstructions.png.",
    )
    parser.add_argument(
        "--model", "--tokenizer", dest="model", required=True, type=Path, help="trained tokenizer directory"
    )
    parser.add_argument("--data", required=True, type=Path, help="shapes-world dataset or image folder")
    parser.add_argument(
        "--teacher", type=Path, help="teacher SigLIP dir (default: the one the tokenizer records)"
    )
    parser.add_argument("--split", default="test", help="split to score (default test)")
    parser.add_argument("--out", type=Path, help="report directory (default MODEL/eval_SPLIT)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    parser.add_argument("--limit", type=int, help="score only the first N images")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_eval)
