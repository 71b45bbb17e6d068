"""The tiny teacher for the embedded default: a transformers `SiglipModel` (vision + text towers) trained with its
own sigmoid loss on shapes-world image-caption pairs. Its data reading lives in `teacher_data`, its zero-shot
color x shape evaluation in `teacher_zero_shot`, its resumable checkpoints in `teacher_checkpoint`.

The vision tower has the tiny DualToken backbone's geometry (64 px, patch 8 -> 8x8 grid, 6 layers, width 192), so
the tokenizer initialises from it and distils toward it. The text tower is small; its SentencePiece tokenizer is
trained on the dataset's train captions with `tokenizer.text_tokenizer.train_text_tokenizer`.

Teacher directory (written atomically: built in the sibling `.<name>.partial/`, then renamed over `out_dir`; the
run's checkpoints live there until then, and a killed run continues with `resume=True`, see teacher_checkpoint):
    config.json + model.safetensors   the SiglipModel (`SiglipModel.from_pretrained(dir)`); the vision tower alone
                                      loads with `SiglipVisionModel.from_pretrained(dir)` (the text weights are
                                      reported as unexpected and skipped)
    tokenizer.json, tokenizer.model, ...  the text tokenizer (`AutoTokenizer.from_pretrained(dir)`)
    teacher_metrics.json              training settings, losses, time, validation zero-shot
    tb/                               TensorBoard scalars (loss, learning rate, logit scale and bias)

Texts are encoded SigLIP-style: padded to the text tower's `max_position_embeddings` with the pad id, no attention
mask (the pooled text feature is the last position). Use `text_embeddings` / `image_embeddings` so callers agree.
Images enter as float (B, 3, H, W) in [-1, 1] (SigLIP mean = std = 0.5; `to_pixel_values`).

Zero-shot: the single-object images of a split, 48 color x shape classes; each class is scored by its best
template 'A {size} {color} {shape} {position}.' (18 per class, `class_prompts`): captions always name size and
position, and a bare 'a red circle' prompt scores near chance on shape. Reported for all images and separately
for seen and held-out pairs, with per-attribute accuracy of the predicted class.

Training notes (shapes world, 12k scenes): half of each batch is single-object images (with only multi-object
scenes every caption can be told apart by color, size and position, and a linear probe on the pooled features found
no shape at all after 300 steps). The geometry decides how fast shape is learned. At 64 px with 8-px patches an
object spreads over 1-9 patches and shape came slowly: ~50% zero-shot top-1 after 300 steps, 52% after 600 steps of
64 (405 s on 2 threads), 80% after 1,500 steps at width 128 in bf16; even supervised shape classification reached
only ~70% after 300 steps. At 48 px with 16-px patches (`image_size=48, patch_size=16`: a 3x3 grid, one token per
layout slot) every object sits whole in one patch: val top-1 after 100 / 200 / 300 / 400 / 500 / 600 steps of 64 was
2 / 33 / 75 / 87 / 94 / 98%, test 97.3% (212 s on one thread). The tiny preset keeps 64 px / 8-px patches: the rest
of the chain did worse on that grid within the demo budget (README "One token per layout slot").

Dense patch loss (`dense_loss_weight`, off by default, `dualtoken tokenizer teacher --dense-loss-weight 1`): besides
the sigmoid loss, a linear head on the layer the tiny DualToken preset distils (the next-to-last) predicts every
patch's class from the scene's ground truth (`data_recipes.cell_truth.cell_class_grid`: background, or the covering
object's color x shape x size), cross-entropy over all patches. The paper's teacher is a pretrained SigLIP whose patch
features already name what they show; the tiny teacher starts from nothing, and this loss gives it that property in
the demo's budget: at 64 px / 8-px patches, 600 steps of 64, zero-shot test top-1 went from 51.9% to 81.1% (held-out
pairs 44.7 -> 75.5%), and the tokenizer distilled from it reads a cell's shape from its semantic codes 86% of the time
instead of 55%. The demo's MLLM did not answer better from those codes at its budget (README "A teacher that sees
shapes"), so the demo keeps the loss off. The head is dropped before saving: the teacher directory holds a plain
SiglipModel.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, SiglipConfig, SiglipModel

from data_recipes.atomic_io import atomic_write_text
from data_recipes.cell_truth import NUM_CELL_CLASSES, cell_class_grid, class_factors, class_from_factors
from data_recipes.shapes import COLOR_NAMES, SHAPES, SIZES, Scene
from data_recipes.shapes_text import class_labels
from tokenizer.teacher_checkpoint import (
    CHECKPOINTS,
    checkpoint_dirs,
    load_checkpoint,
    save_checkpoint,
    settings_mismatch,
    work_dir,
)
from tokenizer.teacher_data import encode_texts, has_split, load_captions, load_images, to_pixel_values
from tokenizer.teacher_zero_shot import (
    class_text_features,
    image_embeddings,
    single_object_set,
    zero_shot_scores,
)
from tokenizer.text_tokenizer import load_text_tokenizer, train_text_tokenizer

METRICS_NAME = "teacher_metrics.json"
CAPTIONS_PER_IMAGE = 6


@dataclass
class TeacherSettings:
    """Budget and shape of the teacher. The defaults fit the demo budget (600 steps there: about 7 minutes on 2 idle
    CPU cores, about 52% zero-shot top-1 on the shapes world: color is learned first, shape slowly). Accuracy grows
    much faster with 16-px patches of 48-px images (97% after 600 steps) or with the dense patch loss
    (`dense_loss_weight=1`: 81% after 600 steps), see the module docstring; the loss is off by default because the
    demo's MLLM did not answer better from the codes of such a teacher (README "A teacher that sees shapes")."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    vision_layers: int = 6
    vision_width: int = 192
    vision_heads: int = 3
    vision_mlp: int = 768
    text_layers: int = 2
    text_width: int = 128
    text_heads: int = 2
    text_mlp: int = 512
    text_max_length: int = 64
    text_vocab_size: int = 1024
    single_object_fraction: float | None = 0.5
    logit_lr_multiplier: float = 10.0
    dense_loss_weight: float = 0.0
    # The dense head as three classifiers (color, shape, size; 0 = background for each) instead of one over every
    # color x shape x size: a held-out color-shape pair then has targets in every head, not a class never trained.
    dense_factorized: bool = False
    bf16: bool = False
    threads: int = 2
    log_every: int = 20
    eval_every: int = 0
    checkpoint_every: int = 100  # 0: no checkpoints (then an interrupted run cannot be resumed)
    keep_checkpoints: int = 1  # 0 keeps every one

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "image_size",
            "patch_size",
            "text_max_length",
            "threads",
            "log_every",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TeacherSettings.{name}: expected a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ValueError("TeacherSettings.batch_size: the sigmoid loss needs at least 2 pairs per batch")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"TeacherSettings.image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        for width, heads, tower in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if width % heads:
                raise ValueError(
                    f"TeacherSettings.{tower}_width: {width} is not divisible by {tower}_heads {heads}"
                )
        if self.single_object_fraction is not None and not 0.0 <= self.single_object_fraction <= 1.0:
            raise ValueError(
                f"TeacherSettings.single_object_fraction: expected None or a share in [0, 1], "
                f"got {self.single_object_fraction!r}"
            )
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TeacherSettings.{name}: expected an integer >= 0, got {value!r}")
        weight = self.dense_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(
                f"TeacherSettings.dense_loss_weight: expected a weight >= 0, got {self.dense_loss_weight!r}"
            )
        if not isinstance(self.dense_factorized, bool):
            raise ValueError(
                f"TeacherSettings.dense_factorized: expected true or false, got {self.dense_factorized!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"TeacherSettings.lr: expected a positive learning rate, got {self.lr!r}")


def siglip_config(settings: TeacherSettings, tokenizer: PreTrainedTokenizerBase) -> SiglipConfig:
    """The SiglipConfig of a teacher with `settings` whose text tower reads `tokenizer`'s ids."""
    return SiglipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": settings.text_width,
            "intermediate_size": settings.text_mlp,
            "num_hidden_layers": settings.text_layers,
            "num_attention_heads": settings.text_heads,
            "max_position_embeddings": settings.text_max_length,
            "projection_size": settings.vision_width,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": settings.vision_width,
            "intermediate_size": settings.vision_mlp,
            "num_hidden_layers": settings.vision_layers,
            "num_attention_heads": settings.vision_heads,
            "image_size": settings.image_size,
            "patch_size": settings.patch_size,
        },
    )


# ---------------------------------------------------------------------------------------------------- data
# ---------------------------------------------------------------------------------------------------- training
def _lr_factor(step: int, settings: TeacherSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine


def _check_out_dir(out: Path) -> None:
    """Refuse an `out` that exists and is not a teacher directory (it would be replaced)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / METRICS_NAME).is_file())):
        raise ValueError(f"out_dir: {out} exists and is not a teacher directory; choose another --out")


def _finished_teacher(out: Path, root: Path, settings: TeacherSettings) -> dict[str, Any] | None:
    """The metrics of a finished teacher in `out` trained on `root` with `settings` (up to FREE_SETTINGS), else
    None; a checkpoints/ left by a run killed right after publishing is deleted."""
    try:
        metrics = json.loads((out / METRICS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if metrics.get("dataset") != str(root) or settings_mismatch(
        metrics.get("settings", {}), asdict(settings)
    ):
        return None
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return metrics


def _publish(work: Path, out: Path) -> None:
    """Rename the finished `work` over `out` (the old `out` is moved aside first, then deleted)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)


def _optimizer(model: SiglipModel, settings: TeacherSettings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings; the logit scale and bias learn `logit_lr_multiplier`
    times faster (a short run could not move them from their initialisation otherwise)."""
    decay, no_decay, logit = [], [], []
    for name, param in model.named_parameters():
        if name.startswith("logit_"):
            logit.append(param)
        elif param.ndim < 2 or "embedding" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay, "lr": settings.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": settings.lr},
        {"params": logit, "weight_decay": 0.0, "lr": settings.lr * settings.logit_lr_multiplier},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


class _BatchSampler:
    """Image indices per step: with `single_object_fraction`, that share of each batch from the single-object
    images (the zero-shot targets) and the rest from the others, each pool in epochs of random permutations;
    without it, epochs over all images. Its state (permutations, cursors, generator) goes into checkpoints."""

    def __init__(
        self, objects: Sequence[Sequence[dict]], settings: TeacherSettings, generator: torch.Generator
    ):
        counts = torch.tensor([len(o) for o in objects])
        singles, others = torch.nonzero(counts == 1).flatten(), torch.nonzero(counts != 1).flatten()
        fraction, size = settings.single_object_fraction, settings.batch_size
        if fraction is None or len(singles) == 0 or len(others) == 0:
            self.pools, self.sizes = [torch.arange(len(objects))], [size]
        else:
            n_single = min(size, round(fraction * size))
            self.pools, self.sizes = [singles, others], [n_single, size - n_single]
        self.generator = generator
        self.orders = [self._shuffled(pool) for pool in self.pools]
        self.cursors = [0] * len(self.pools)

    def _shuffled(self, pool: torch.Tensor) -> torch.Tensor:
        return pool[torch.randperm(len(pool), generator=self.generator)]

    def __call__(self) -> torch.Tensor:
        parts = []
        for k, needed in enumerate(self.sizes):
            while needed > 0:
                if self.cursors[k] >= len(self.orders[k]):
                    self.orders[k], self.cursors[k] = self._shuffled(self.pools[k]), 0
                chunk = self.orders[k][self.cursors[k] : self.cursors[k] + needed]
                self.cursors[k] += len(chunk)
                parts.append(chunk)
                needed -= len(chunk)
        return torch.cat(parts)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The permutations being read and the generator's state (the cursors are `self.cursors`)."""
        orders = {f"order{k}": order.contiguous() for k, order in enumerate(self.orders)}
        return {"generator": self.generator.get_state(), **orders}

    def load_state(self, tensors: dict[str, torch.Tensor], cursors: Sequence[int]) -> None:
        """Continue from `state_tensors()` and cursors saved by a run over the same images and settings."""
        orders = [tensors.get(f"order{k}") for k in range(len(self.pools))]
        if len(cursors) != len(self.pools) or any(
            order is None or len(order) != len(pool) for order, pool in zip(orders, self.pools)
        ):
            raise ValueError("the checkpoint's batch sampler read other images (the dataset changed?)")
        self.generator.set_state(tensors["generator"])
        self.orders, self.cursors = orders, [int(c) for c in cursors]


def train_teacher(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TeacherSettings | None = None,
    progress: bool = True,
    resume: bool = False,
    on_event: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Train the teacher on the train split of a shapes-world dataset and save it to `out_dir`; return its metrics
    (settings, first/last loss, seconds, throughput, validation zero-shot when the dataset has a val split).

    Checkpoints every `settings.checkpoint_every` steps and after the last (`tokenizer.teacher_checkpoint`).
    `resume=True` continues an interrupted run from its newest checkpoint to the weights of an uninterrupted run,
    returns the metrics of a teacher finished in `out_dir` from the same data and settings without training, and
    otherwise starts afresh; `resume=False` refuses to discard an interrupted run's checkpoints.
    `on_event(moment, step)` is called at 'begin' (step about to run), 'end' (its optimizer step done), 'saved'
    (its checkpoint complete), 'trained' (every step done, nothing saved yet) and 'published' (the teacher renamed
    into place, its checkpoints not yet deleted); the tests kill runs there.
    """
    settings = settings or TeacherSettings()
    root, out = Path(dataset_dir), Path(out_dir)
    event = on_event or (lambda moment, step: None)
    _check_out_dir(out)
    work = work_dir(out)
    existing = checkpoint_dirs(work)
    if existing and not resume:
        raise ValueError(
            f"out_dir: {work} holds the checkpoints of an interrupted run (newest {existing[-1][1].name}); pass "
            f"resume=True (--resume) to continue it, or delete {work} to start again"
        )
    if resume and not existing:
        finished = _finished_teacher(out, root, settings)
        if finished is not None:
            return finished
    start, cpu_start = time.perf_counter(), time.process_time()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    if not existing:  # a run killed before its first checkpoint left nothing worth keeping
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    try:
        image_files, captions, objects = load_captions(root, "train")
        if existing:
            tokenizer = load_text_tokenizer(work)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="vocab_size: the text supports")
                tokenizer = train_text_tokenizer(
                    [c for group in captions for c in group] + class_labels(),
                    work,
                    vocab_size=settings.text_vocab_size,
                    special_tokens=(),
                    seed=settings.seed,
                )
        per_image = min(len(group) for group in captions)
        flat = [c for group in captions for c in group[:per_image]]
        lengths = [len(ids) for ids in tokenizer(flat).input_ids]
        truncated = sum(n > settings.text_max_length for n in lengths)
        if truncated:
            warnings.warn(
                f"text_max_length: {truncated} of {len(flat)} captions exceed {settings.text_max_length} tokens "
                f"(longest {max(lengths)}) and are truncated",
                stacklevel=2,
            )
        caption_ids = encode_texts(tokenizer, flat, settings.text_max_length).view(
            len(captions), per_image, -1
        )
        images = load_images(root / "train", image_files, settings.image_size)
        val = single_object_set(root, "val", settings.image_size) if has_split(root, "val") else None
        load_seconds = time.perf_counter() - start

        torch.manual_seed(settings.seed)
        model = SiglipModel(siglip_config(settings, tokenizer))
        with torch.no_grad():  # SigLIP's initialisation: t' = log 10, b = -10
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
        cell_targets = None
        if settings.dense_loss_weight > 0:
            cell_targets = patch_classes(objects, settings)
            outputs = sum(DENSE_FACTORS) if settings.dense_factorized else NUM_CELL_CLASSES
            model.dense_head = torch.nn.Linear(settings.vision_width, outputs)
        optimizer = _optimizer(model, settings)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
        generator = torch.Generator().manual_seed(settings.seed)
        sampler = _BatchSampler(objects, settings, generator)
        identity = {"settings": asdict(settings), "dataset": str(root)}
        start_step, losses, val_curve, before = 0, [], [], {}
        if existing:
            start_step, checkpoint = existing[-1]
            state, tensors = load_checkpoint(checkpoint, identity, model, optimizer, scheduler)
            sampler.load_state(tensors, state["cursors"])
            losses, val_curve, before = (
                state["losses"],
                [tuple(v) for v in state["val_curve"]],
                state["seconds"],
            )
        writer = _summary_writer(work / "tb", start_step)

        def validate(step: int) -> dict[str, Any] | None:
            if val is None:
                return None
            model.eval()
            features = image_embeddings(model, to_pixel_values(val.images))
            scores = zero_shot_scores(features, class_text_features(model, tokenizer), val)
            model.train()
            val_curve.append((step, scores["all"]["top1"]))
            if writer is not None:
                writer.add_scalar("teacher/val_zero_shot_top1", scores["all"]["top1"], step)
            return scores

        def seconds() -> dict[str, float]:
            return {
                "train": before.get("train", 0.0) + time.perf_counter() - train_start,
                "total": before.get("total", 0.0) + time.perf_counter() - start,
                "cpu": before.get("cpu", 0.0) + time.process_time() - cpu_start,
            }

        model.train()
        train_start = time.perf_counter()
        bar = tqdm(
            total=settings.steps, initial=start_step, desc="teacher", unit="step", disable=not progress
        )
        for step in range(start_step, settings.steps):
            done = step + 1
            event("begin", done)
            batch = sampler()
            variant = torch.randint(per_image, (len(batch),), generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                output = model(
                    input_ids=caption_ids[batch, variant],
                    pixel_values=to_pixel_values(images[batch]),
                    return_loss=True,
                    output_hidden_states=cell_targets is not None,
                )
                loss = output.loss
                if cell_targets is not None:
                    tokens = output.vision_model_output.hidden_states[dense_layer(settings)]
                    dense = dense_loss(
                        model.dense_head(tokens), cell_targets[batch], settings.dense_factorized
                    )
                    loss = loss + settings.dense_loss_weight * dense
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            event("end", done)
            if step % settings.log_every == 0 or done == settings.steps:
                bar.set_postfix(loss=f"{np.mean(losses[-settings.log_every :]):.3f}")
                if writer is not None:
                    writer.add_scalar("teacher/loss", losses[-1], step)
                    writer.add_scalar("teacher/lr", scheduler.get_last_lr()[0], step)
                    writer.add_scalar("teacher/logit_scale", model.logit_scale.detach().exp().item(), step)
                    writer.add_scalar("teacher/logit_bias", model.logit_bias.detach().item(), step)
            if settings.eval_every and done % settings.eval_every == 0 and done < settings.steps:
                validate(done)
            if settings.checkpoint_every and (
                done % settings.checkpoint_every == 0 or done == settings.steps
            ):
                if writer is not None:
                    writer.flush()
                state = {"cursors": sampler.cursors, "losses": losses, "val_curve": val_curve}
                state |= {"seconds": seconds(), **identity}
                save_checkpoint(
                    work,
                    done,
                    model,
                    optimizer,
                    scheduler,
                    sampler.state_tensors(),
                    state,
                    settings.keep_checkpoints,
                )
                event("saved", done)
        bar.close()
        event("trained", settings.steps)
        model.eval()
        window = max(1, min(settings.log_every, len(losses) // 4))
        elapsed = seconds()
        metrics: dict[str, Any] = {
            "settings": asdict(settings),
            "dataset": str(root),
            "train_images": len(images),
            "text_vocab_size": len(tokenizer),
            "captions_truncated": truncated,
            "steps": settings.steps,
            "resumed_from_step": start_step if existing else None,
            "loss_first": float(np.mean(losses[:window])),
            "loss_last": float(np.mean(losses[-window:])),
            "logit_scale": model.logit_scale.detach().exp().item(),
            "logit_bias": model.logit_bias.detach().item(),
            "load_seconds": load_seconds,
            "train_seconds": elapsed["train"],
            "pairs_per_second": settings.steps * settings.batch_size / elapsed["train"],
            "parameters": {
                "vision": sum(p.numel() for p in model.vision_model.parameters()),
                "text": sum(p.numel() for p in model.text_model.parameters()),
            },
        }
        if cell_targets is not None:
            metrics["dense_patch_accuracy"] = _dense_accuracy(model, images, cell_targets, settings)
            del model.dense_head  # training only: the teacher directory holds a plain SiglipModel
        final = validate(settings.steps)
        if final is not None:
            metrics["val_zero_shot"] = final
            metrics["val_top1_curve"] = val_curve
        if writer is not None:
            writer.close()
        model.save_pretrained(work)
        elapsed = seconds()
        metrics["seconds"], metrics["cpu_seconds"] = elapsed["total"], elapsed["cpu"]
        atomic_write_text(work / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
        _publish(work, out)
        event("published", settings.steps)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        return metrics
    except BaseException:
        if work.exists() and not checkpoint_dirs(work):
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(previous_threads)


def dense_layer(settings: TeacherSettings) -> int:
    """The hidden-state index the dense loss reads: the output of the next-to-last encoder layer, the layer the tiny
    DualToken preset distils (`semantic_layer = num_layers - 1`)."""
    return max(1, settings.vision_layers - 1)


def patch_classes(objects: Sequence[Sequence[dict]], settings: TeacherSettings) -> torch.Tensor:
    """(N, grid*grid) class of every patch of every image (`data_recipes.cell_truth.cell_class_grid`: 0 for
    background, else the covering object's color x shape x size)."""
    grid = settings.image_size // settings.patch_size
    return torch.stack(
        [
            cell_class_grid(
                Scene.from_dict({"objects": list(objs)}), grid=grid, size=settings.image_size
            ).flatten()
            for objs in objects
        ]
    )


# Outputs of the factorized dense head: background + each color, background + each shape, background + each size.
DENSE_FACTORS: tuple[int, int, int] = (1 + len(COLOR_NAMES), 1 + len(SHAPES), 1 + len(SIZES))


def dense_loss(logits: torch.Tensor, classes: torch.Tensor, factorized: bool) -> torch.Tensor:
    """Cross-entropy of the dense head's logits (..., outputs) against the cell classes (...): one softmax over
    every class, or the mean of the color, shape and size heads' cross-entropies."""
    logits = logits.flatten(0, -2).float()
    if not factorized:
        return torch.nn.functional.cross_entropy(logits, classes.flatten())
    parts = logits.split(DENSE_FACTORS, dim=-1)
    targets = class_factors(classes.flatten())
    return torch.stack([torch.nn.functional.cross_entropy(p, t) for p, t in zip(parts, targets)]).mean()


def dense_classes(logits: torch.Tensor, factorized: bool) -> torch.Tensor:
    """The cell class the dense head reads: the argmax, or for the factorized head the class of the three
    attributes it reads (background when any of them reads background)."""
    if not factorized:
        return logits.argmax(-1)
    return class_from_factors(*(p.argmax(-1) for p in logits.split(DENSE_FACTORS, dim=-1)))


@torch.no_grad()
def _dense_accuracy(
    model: SiglipModel, images: torch.Tensor, cell_targets: torch.Tensor, settings: TeacherSettings
) -> dict[str, float]:
    """Share of the first 1,024 train images' patches whose class the dense head reads right: all patches, and
    the patches an object covers."""
    model.eval()
    pixels, targets = to_pixel_values(images[:1024]), cell_targets[:1024]
    hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    predicted = dense_classes(model.dense_head(hidden[dense_layer(settings)]), settings.dense_factorized)
    right, covered = predicted == targets, targets > 0
    return {"all": float(right.float().mean()), "objects": float(right[covered].float().mean())}


def _summary_writer(path: Path, start_step: int):
    """A TensorBoard writer (points from `start_step` on of an interrupted run are purged), or None when
    tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=start_step or None)
