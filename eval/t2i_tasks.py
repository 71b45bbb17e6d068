"""Text-to-image evaluation: `run_t2i` draws an image per prompt spec (resumable per-sample file, PNGs written
atomically), parses each with the shapes-world scene parser and scores it against its spec (`eval.t2i_scoring`);
with `reference=True` it also scores the prompts' own test images and their DualToken reconstructions (the metric's
ceiling). `eval.t2i_diagnostics` measures, per residual depth, whether the image loss depends on the caption and on
the LLM at all and how much of each depth the scene predicts, and
`generated_vs_real_fd` is the Frechet distance between generated and real images in the teacher's feature space.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data_recipes.atomic_io import atomic_save_png, atomic_write_json, atomic_write_text
from data_recipes.image_io import load_image
from eval.tasks import EvalSettings, SampleLog, contiguous_batches, pending_items, progress_bar


def run_t2i(
    model,
    processor,
    prompts_jsonl: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    images_per_prompt: int = 1,
    generation_overrides: Mapping[str, Any] | None = None,
    real_images: str | os.PathLike | None = None,
    teacher_dir: str | os.PathLike | None = None,
    reference: bool = False,
) -> dict[str, Any]:
    """Draw `images_per_prompt` images per prompt spec, save them as PNGs and verify each with the scene parser
    (GenEval-style accuracy per tag, overall, seen vs held-out).

    With `reference`, the metrics add `reference`: the same check on each scored prompt's own image (its spec's
    `file`, relative to the prompts file's folder) and on that image's reconstruction through the model's image
    tokenizer, i.e. what a generator that reproduced the data exactly would score with and without the
    tokenizer's loss (the ceiling of this metric for this tokenizer); `caption_use`: the model's image
    cross-entropy per head and depth on those images with their own captions, with the captions shifted by one
    prompt (equal numbers mean the generator ignores the caption), and with the heads' LLM state zeroed or shuffled
    across cells (equal numbers mean the heads ignore the LLM); and `code_entropy` (see `t2i_reference_scores`).

    With `real_images` (a folder of PNGs, e.g. the split's `images/`) the metrics add `fd`: the Fréchet distance
    between the generated and the real images' pooled features of the teacher SigLIP tower (`teacher_dir`, by
    default the one the model's image tokenizer was distilled from), not Inception features. With few images the
    covariances are rank-deficient and the number is only comparable between runs of the same size."""
    from eval.t2i_scoring import load_prompt_specs, score_t2i
    from mllm.generation import GenerationSettings, generate_images

    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    image_dir = out_dir / "t2i_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    specs = load_prompt_specs(prompts_jsonl)
    log = SampleLog(out_dir / "t2i_samples.jsonl", "prompt_id")
    todo = pending_items(specs, log, lambda s: s["prompt_id"], settings.limit)
    overrides = {
        "seed": settings.seed,
        "images_per_prompt": images_per_prompt,
        **(generation_overrides or {}),
    }
    generation = GenerationSettings.for_codebook(model.config.codebook_size, **overrides)
    batch_size = max(1, settings.batch_size // images_per_prompt)
    bar = progress_bar(len(todo), "t2i", settings)
    position = {str(s["prompt_id"]): i for i, s in enumerate(specs)}
    for batch in contiguous_batches(todo, batch_size, lambda s: position[str(s["prompt_id"])]):
        # Row r of a call with seed s samples from stream s + r; starting each call at its first prompt's global
        # row keeps every image identical whatever the batch size or the point a resumed run starts from.
        first_row = position[str(batch[0]["prompt_id"])] * images_per_prompt
        result = generate_images(
            model,
            processor,
            [s["prompt"] for s in batch],
            generation.with_overrides(seed=settings.seed + first_row),
        )
        rows = []
        for spec, images in zip(batch, result.images):
            files = []
            for j, image in enumerate(images):
                path = atomic_save_png(image, image_dir / f"{spec['prompt_id']}_{j}.png")
                files.append(path.name)
            rows.append({"prompt_id": spec["prompt_id"], "files": files})
        log.extend(rows)
        bar.update(len(batch))
    bar.close()
    by_id = {str(s["prompt_id"]): s for s in specs}
    paired_specs, paired_images = [], []
    for row in log.rows.values():
        for name in row["files"]:
            paired_specs.append(by_id[str(row["prompt_id"])])
            paired_images.append(load_image(image_dir / name))
    scored = score_t2i(paired_specs, paired_images, show_progress=settings.progress)
    log_verdicts = out_dir / "t2i_verdicts.jsonl"
    if real_images is not None:
        scored["fd"] = generated_vs_real_fd(
            paired_images, real_images, teacher_dir or _image_tokenizer_teacher(processor)
        )
    if reference:
        scored["reference"] = t2i_reference_scores(
            processor, [by_id[str(i)] for i in log.rows], Path(prompts_jsonl).parent, settings, model
        )
    atomic_write_json(out_dir / "t2i_metrics.json", {k: v for k, v in scored.items() if k != "per_sample"})
    atomic_write_text(log_verdicts, "".join(json.dumps(v) + "\n" for v in scored["per_sample"]))
    return {k: v for k, v in scored.items() if k != "per_sample"}


def t2i_reference_scores(
    processor,
    specs: Sequence[Mapping[str, Any]],
    root: Path,
    settings: EvalSettings,
    model=None,
) -> dict[str, Any]:
    """{"real": summary, "reconstructed": summary}: the T2I check on the specs' own images (`root / spec["file"]`)
    and on their reconstructions through `processor`'s image tokenizer (pixel codes -> pixel decoder). With
    `model`, also "caption_use": `eval.t2i_diagnostics.image_loss_diagnostics` on those images (per head and depth:
    own caption, shifted caption, zeroed and cell-shuffled LLM state). When `root` holds the split's
    `scenes.jsonl`, also "code_entropy": `code_entropies` of the images' codes against what each cell shows."""
    import torch

    from eval.t2i_diagnostics import code_entropies, image_loss_diagnostics
    from eval.t2i_scoring import score_t2i
    from mllm.generation import decode_codes

    paired = [spec for spec in specs if spec.get("file")]
    if not paired:
        raise ValueError(f"T2I reference: none of the {len(specs)} prompt specs names its image ('file')")
    real = [load_image(root / spec["file"]) for spec in paired]
    reconstructed, codes = [], []
    bar = progress_bar(len(real), "t2i reference", settings)
    for start in range(0, len(real), settings.batch_size):
        pixel_codes, semantic_codes = processor.encode_images(real[start : start + settings.batch_size])
        reconstructed += decode_codes(processor, pixel_codes)
        codes += list(zip(pixel_codes, semantic_codes))
        bar.update(len(pixel_codes))
    bar.close()
    result = {
        name: score_t2i(paired, images, show_progress=False)["all"]
        for name, images in (("real", real), ("reconstructed", reconstructed))
    }
    if model is not None and len(paired) > 1:
        result["caption_use"] = image_loss_diagnostics(
            model, processor, [spec["prompt"] for spec in paired], codes, settings.batch_size, settings.seed
        )
    classes = _cell_classes(root, paired, codes[0][0].shape[0])
    if classes is not None:
        result["code_entropy"] = {
            "cells": int(classes.numel()),
            **code_entropies(
                {"pixel": torch.stack([c[0] for c in codes]), "semantic": torch.stack([c[1] for c in codes])},
                classes,
            ),
        }
    return result


def _cell_classes(root: Path, specs: Sequence[Mapping[str, Any]], grid: int):
    """(N, grid, grid) cell classes of the specs' images from the split's `scenes.jsonl` (shapes-world data),
    or None when the folder has no scenes file or a spec's image is not in it."""
    import torch

    from data_recipes.cell_truth import cell_class_grid
    from data_recipes.shapes import Scene

    path = root / "scenes.jsonl"
    if not path.is_file():
        return None
    scenes = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            scenes[row.get("image_id")] = row.get("scene")
    if any(spec.get("image_id") not in scenes for spec in specs):
        return None
    return torch.stack([cell_class_grid(Scene.from_dict(scenes[spec["image_id"]]), grid) for spec in specs])


def _image_tokenizer_teacher(processor) -> Path:
    source = getattr(getattr(processor.image_tokenizer, "config", None), "_name_or_path", "") or ""
    metrics = Path(source) / "train_metrics.json"
    if not metrics.is_file():
        raise ValueError(
            "run_t2i: the FD needs a teacher; pass teacher_dir (the model's image tokenizer does not record one: "
            f"no {metrics})"
        )
    return Path(json.loads(metrics.read_text(encoding="utf-8"))["teacher"])


def generated_vs_real_fd(
    generated: Sequence[Any],
    real_images: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Fréchet distance between the teacher features of `generated` PIL images and of every PNG in
    `real_images` (both resized to the teacher's input size)."""
    import numpy as np
    import torch

    from tokenizer.image_metrics import frechet_distance
    from tokenizer.teacher_data import to_pixel_values
    from tokenizer.train import load_teacher_tower

    teacher = load_teacher_tower(teacher_dir)
    size = teacher.config.image_size
    real = sorted(Path(real_images).glob("*.png"))
    if len(real) < 2 or len(generated) < 2:
        raise ValueError(
            f"generated_vs_real_fd: need >= 2 images on each side, got {len(generated)} and {len(real)}"
        )

    def features(images):
        out = []
        for first in range(0, len(images), batch_size):
            arrays = [
                np.asarray((load_image(i) if isinstance(i, Path) else i).convert("RGB").resize((size, size)))
                for i in images[first : first + batch_size]
            ]
            pixels = to_pixel_values(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
            with torch.no_grad():
                out.append(teacher(pixel_values=pixels).pooler_output.float())
        return torch.cat(out)

    return {
        "value": frechet_distance(features(list(generated)), features(real)),
        "generated": len(generated),
        "real": len(real),
        "features": f"teacher SigLIP pooled output ({teacher_dir}), not Inception",
    }
