"""Training loop of the DualToken tokenizer (`dualtoken tokenizer train`): `TokenizerTrainSettings` and
`train_tokenizer(data, out_dir, settings, teacher_dir, resume=False)`; `data` is a shapes-world dataset, an image
folder or a data recipe (the images its llava / prompts / image_folder sources name, `tokenizer.encode`).

What one step does (official HEAD stage 1, notes section 2.3; loss terms from `DualTokenModel.forward` and
`tokenizer.losses`):
    targets = frozen teacher's (layer-`semantic_layer` tokens, pooled output) of the batch
    generator: loss = L_sem + L_commit + L_rec (+ g_w * gan_weight * L_G once step >= gan_start_step)
    discriminator (same batch, once the GAN is on): hinge loss x 1 during the first GAN epoch, x gan_weight after
Both optimizers always exist (and are checkpointed); the tiny preset trains with gan_weight 0 (see
`PRESET_TRAIN_OVERRIDES`), the paper preset switches the GAN on at its `gan_start_step`.
The tokenizer's SigLIP tower starts as a copy of the teacher's vision tower (the teacher itself stays frozen); the
whole tower, the projections and the decoder train (AdamW, betas (0.5, 0.9), no weight decay on biases / norms,
`backbone_lr_multiplier` on the tower); the EMA codebooks update inside the forward pass. Learning rates warm up
linearly, then follow a cosine to `min_lr_ratio`.

Distribution: an accelerate `Accelerator` (one CPU process here; `accelerate launch` / `torchrun` for several GPUs,
bf16 autocast on GPU with `mixed_precision="auto"`). Every rank reads its own slice of a global batch whose image
order is a pure function of (seed, step), so resuming needs only the step.

Run directory `out_dir`:
    config.json + model.safetensors    the final tokenizer (`DualTokenModel.from_pretrained(out_dir)`)
    train_metrics.json                 settings, teacher, timings, first / last loss terms, train-batch PSNR
    checkpoints/step-000250/           model (also loadable with from_pretrained), discriminator, both optimizer
                                       states, per-rank RNG states, trainer_state.json; written into
                                       checkpoints/.tmp-step-* and renamed into place, so a kill never leaves a
                                       half-written checkpoint (leftover temporary directories are ignored and
                                       removed); `resume=True` continues from the newest to the same result
    samples/step-000250.png            reconstruction grids of fixed images (originals above, reconstructions below)
    tb/                                TensorBoard scalars (every loss term, learning rates, GAN weight, PSNR)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tokenizer.encode import KeyedImage, dataset_images, is_shapes_dataset, load_pixels, source_images
from tokenizer.teacher_checkpoint import settings_mismatch
from tokenizer.train_checkpoint import (
    CHECKPOINTS,
    FREE_SETTINGS,
    STATE_NAME,
    TMP_PREFIX,
    StepBatches,
    checkpoint_dirs,
    load_state,
    save_checkpoint,
    set_rng_state,
)

METRICS_NAME = "train_metrics.json"

# Training-time overrides of each preset's DualTokenConfig fields (merged under `model_overrides`). The tiny
# decoder is lightened for CPU budgets: two blocks per level, channel mult (1, 1, 2, 2), no attention, 64 input
# channels (~0.7 M parameters instead of ~2.3 M; ~35% less time per step with the same PSNR trajectory early on).
# The tiny GAN is off: within a CPU budget of ~1000 steps the adversarial term only costs PSNR (measured: -0.6 dB
# over the 200 steps after it switched on); `--set gan_weight=0.75 --set gan_start_step=N` turns it back on.
PRESET_TRAIN_OVERRIDES: dict[str, dict[str, Any]] = {
    "tiny": {
        "decoder_channels": 32,
        "decoder_channel_mult": [1, 1, 2, 2],
        "decoder_res_blocks": 1,
        "decoder_attn_resolutions": [],
        "decoder_in_channels": 64,
        "gan_weight": 0.0,
    },
    "paper": {},
}


@dataclass
class TokenizerTrainSettings:
    """Budget, optimizer and model overrides of one tokenizer run.

    Defaults: the tiny preset on 2 CPU cores, ~7 minutes (0.28 s/step measured on an idle 2-core machine). Measured
    at equal compute on the 12k-scene 64 px shapes world: batch 8 beats batch 16 (+1.2 dB val PSNR after 2,400
    images, +1.7 dB after 9,600) and batch 4; lr 1e-3 beats 5e-4 and 2e-3; Adam betas (0.5, 0.9) (the official
    ones) beat (0.9, 0.99); backbone_lr_multiplier 0.3 is no better than 0.1."""

    preset: str = "tiny"
    steps: int = 1500
    batch_size: int = 8  # per process
    lr: float = 1e-3
    backbone_lr_multiplier: float = 0.1
    disc_lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    split: str = "train"
    recipe_root: str | None = None  # ${DATA} when the data is a recipe file
    sample_split: str | None = "val"
    sample_images: int = 8
    threads: int = 2
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "no", "bf16", "fp16"
    num_workers: int = 0
    log_every: int = 25
    sample_every: int = 250
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from tokenizer.presets import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"TokenizerTrainSettings.preset: expected one of {PRESETS}, got {self.preset!r}")
        for name in ("steps", "batch_size", "sample_every", "checkpoint_every", "log_every", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenizerTrainSettings.{name}: expected a positive integer, got {value!r}")
        for name in ("warmup_steps", "num_workers", "keep_checkpoints", "sample_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TokenizerTrainSettings.{name}: expected an integer >= 0, got {value!r}")
        for name in ("lr", "disc_lr", "backbone_lr_multiplier"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TokenizerTrainSettings.{name}: expected >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"TokenizerTrainSettings.min_lr_ratio: expected [0, 1], got {self.min_lr_ratio!r}"
            )
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(
                "TokenizerTrainSettings.mixed_precision: expected 'auto', 'no', 'bf16' or 'fp16', "
                f"got {self.mixed_precision!r}"
            )
        if not isinstance(self.model_overrides, dict):
            raise ValueError(
                "TokenizerTrainSettings.model_overrides: expected a dict of DualTokenConfig fields"
            )

    def config_fields(self) -> dict[str, Any]:
        """The DualTokenConfig overrides of this run: the preset's training overrides, then `model_overrides`."""
        return {**PRESET_TRAIN_OVERRIDES.get(self.preset, {}), **self.model_overrides}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TokenizerTrainSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TokenizerTrainSettings: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


# ---------------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, settings: TokenizerTrainSettings) -> float:
    """Linear warm-up over `warmup_steps`, then a cosine from 1 to `min_lr_ratio` at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def generator_param_groups(model: nn.Module, settings: TokenizerTrainSettings) -> list[dict[str, Any]]:
    """AdamW groups: tower / rest x decay / no decay (biases and < 2-D parameters); each records its base lr."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone = name.startswith("backbone.")
        decay = param.ndim >= 2 and not name.endswith(".bias")
        groups.setdefault((backbone, decay), []).append(param)
    out = []
    for (backbone, decay), params in sorted(groups.items()):
        base = settings.lr * (settings.backbone_lr_multiplier if backbone else 1.0)
        out.append(
            {
                "params": params,
                "weight_decay": settings.weight_decay if decay else 0.0,
                "base_lr": base,
                "lr": base,
            }
        )
    return out


def set_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# ---------------------------------------------------------------------------------------------------- helpers
@contextmanager
def _threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _frozen(module: nn.Module):
    """Parameters of `module` without gradients for the block (the discriminator during the generator step)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(module.parameters(), flags):
            param.requires_grad_(flag)


def load_teacher_tower(teacher_dir: str | os.PathLike) -> nn.Module:
    """The teacher's vision tower (a SiglipVisionModel; text weights of a SiglipModel dir are skipped), frozen."""
    from transformers import SiglipVisionModel

    from tokenizer.text_tokenizer import transformers_errors_only

    path = Path(teacher_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"teacher {path}: no config.json (expected a SiglipModel / SiglipVisionModel dir)"
        )
    with (
        transformers_errors_only()
    ):  # a SiglipModel dir reports its text weights as unexpected: expected here
        tower = SiglipVisionModel.from_pretrained(path, dtype=torch.float32)
    return tower.eval().requires_grad_(False)


def build_student(settings: TokenizerTrainSettings, teacher_dir: str | os.PathLike):
    """A fresh tokenizer of the preset whose tower is copied from the teacher's vision tower."""
    from transformers.utils import logging as hf_logging

    from tokenizer.presets import build_tokenizer

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return build_tokenizer(settings.preset, backbone_dir=teacher_dir, **settings.config_fields())
    finally:
        hf_logging.set_verbosity(verbosity)


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of images in [-1, 1] (range 2) from their mean squared error."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def _resolve_precision(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _sample_images(
    data_dir: Path, settings: TokenizerTrainSettings, train: list[KeyedImage]
) -> list[KeyedImage]:
    if settings.sample_images == 0:
        return []
    if settings.sample_split and is_shapes_dataset(data_dir):
        try:
            return dataset_images(data_dir, settings.sample_split)[: settings.sample_images]
        except ValueError:
            pass
    return train[: settings.sample_images]


# ---------------------------------------------------------------------------------------------------- training
def train_tokenizer(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TokenizerTrainSettings | None = None,
    teacher_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    on_event: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Train a tokenizer on `settings.split` of `data` (shapes-world dataset, image folder or recipe), distilling from
    (and initialised by) the SigLIP at `teacher_dir`; save it to `out_dir` and return the run's metrics.

    `resume=True` continues from the newest finished checkpoint in `out_dir` (or starts fresh when there is none)
    and reaches the same weights as an uninterrupted run; `resume=False` refuses an `out_dir` that has
    checkpoints already. `on_event(moment, step)` is called at 'begin' (step about to run), 'end' (its optimizer
    steps done), 'saved' (its checkpoint complete) and 'trained' (every step done, the final model not saved yet);
    the tests kill runs there."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from torch.utils.data import DataLoader

    from tokenizer.discriminator import PatchDiscriminator, hinge_d_loss
    from tokenizer.losses import gan_active, generator_adversarial_loss, load_perceptual, teacher_targets

    settings = settings or TokenizerTrainSettings()
    event = on_event or (lambda moment, step: None)
    if teacher_dir is None:
        raise ValueError(
            "train_tokenizer: teacher_dir is required (the SigLIP the tower starts from and distils to)"
        )
    data_dir, out = Path(data), Path(out_dir)
    precision = _resolve_precision(settings.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=not torch.cuda.is_available(),  # torchrun on CPUs: accelerate only sees the ranks (gloo) with cpu=True
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    main = accelerator.is_main_process
    existing = checkpoint_dirs(out)
    if existing and not resume:
        raise ValueError(
            f"train_tokenizer: {out} already holds checkpoints (newest {existing[-1][1].name}); pass resume=True "
            "(--resume) to continue that run, or choose another out_dir"
        )
    if resume and existing:
        saved = json.loads((existing[-1][1] / STATE_NAME).read_text(encoding="utf-8")).get("settings", {})
        differ = settings_mismatch(saved, asdict(settings), free=FREE_SETTINGS)
        if differ:
            raise ValueError(
                f"train_tokenizer: {existing[-1][1]} was trained with other settings ("
                + ", ".join(
                    f"{name}: {saved.get(name)!r} there, {getattr(settings, name, None)!r} now"
                    for name in differ
                )
                + "); resume with the same settings or choose another out_dir"
            )
    with _threads(settings.threads):
        images = source_images(data_dir, settings.split, settings.recipe_root)
        torch.manual_seed(settings.seed)
        model = build_student(settings, teacher_dir)
        cfg = model.config
        disc = PatchDiscriminator.from_config(cfg)
        teacher = load_teacher_tower(teacher_dir).to(accelerator.device) if cfg.semantic_weight > 0 else None
        perceptual = load_perceptual(cfg)
        if perceptual is not None:
            perceptual = perceptual.to(accelerator.device)
        betas = (settings.beta1, settings.beta2)
        opt_g = torch.optim.AdamW(generator_param_groups(model, settings), lr=settings.lr, betas=betas)
        opt_d = torch.optim.Adam(
            [{"params": list(disc.parameters()), "base_lr": settings.disc_lr}],
            lr=settings.disc_lr,
            betas=betas,
        )
        start_step, history, seconds_before, rng = 0, [], 0.0, None
        if main and (out / CHECKPOINTS).is_dir():
            for stale in (out / CHECKPOINTS).glob(TMP_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)  # a save that was killed half-way
        if resume and existing:
            start_step, checkpoint = existing[-1]
            load_state(model, checkpoint / "model.safetensors")
            load_state(disc, checkpoint / "discriminator.safetensors")
            state = json.loads((checkpoint / STATE_NAME).read_text(encoding="utf-8"))
            history, seconds_before = state["history"], state["train_seconds"]
            rng_path = checkpoint / f"rng-{accelerator.process_index}.pt"
            rng = torch.load(rng_path, weights_only=True)
        model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
        if resume and existing:
            opt_g.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
            opt_d.load_state_dict(torch.load(checkpoint / "disc_optimizer.pt", weights_only=True))
        student, critic = accelerator.unwrap_model(model), accelerator.unwrap_model(disc)

        world, rank = accelerator.num_processes, accelerator.process_index
        batches = StepBatches(images, cfg.image_size, settings.seed, settings.batch_size, rank, world)
        loader = DataLoader(
            batches,
            batch_size=None,
            sampler=range(start_step, settings.steps),
            num_workers=settings.num_workers,
            generator=torch.Generator(),  # never draws from the global RNG, which the run's state includes
        )
        epoch_steps = math.ceil(len(images) / (settings.batch_size * world))
        samples = _sample_images(data_dir, settings, images)
        sample_pixels = load_pixels(samples, cfg.image_size) if samples else None
        writer = _summary_writer(out / "tb", start_step) if main else None
        if rng is not None:
            set_rng_state(rng)

        model.train()
        disc.train()
        window: dict[str, list[float]] = {}
        run_start = time.perf_counter()
        bar = tqdm(
            total=settings.steps,
            initial=start_step,
            desc="tokenizer",
            unit="step",
            disable=not (progress and main),
        )
        for step, pixels in zip(range(start_step, settings.steps), loader):
            event("begin", step + 1)
            pixels = pixels.to(accelerator.device)
            factor = lr_factor(step, settings)
            set_learning_rates(opt_g, factor)
            set_learning_rates(opt_d, factor)
            with accelerator.autocast():
                targets = (
                    teacher_targets(teacher, pixels, cfg.semantic_layer) if teacher is not None else None
                )
                output = model(pixels, teacher=targets, perceptual=perceptual)
                with _frozen(critic):
                    gan = generator_adversarial_loss(cfg, output, critic, step)
                loss = output.loss + gan["gan"]
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if settings.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
            opt_g.step()
            terms = {name: float(value.detach()) for name, value in output.losses.items()}
            terms.update(
                loss=float(loss.detach()),
                gan=float(gan["gan"].detach()),
                gan_adaptive_weight=float(gan["gan_adaptive_weight"]),
            )
            if gan_active(cfg, step):
                # one discriminator pass over [real; fake] (per-sample GroupNorm: equal to two passes, DDP-safe)
                scale = 1.0 if step < cfg.gan_start_step + epoch_steps else cfg.gan_weight
                with accelerator.autocast():
                    both = torch.cat([pixels, output.reconstruction.detach().to(pixels.dtype)])
                    logits_real, logits_fake = disc(both).chunk(2)
                    d_loss = scale * hinge_d_loss(logits_real, logits_fake, cfg.disc_hinge)
                opt_d.zero_grad(set_to_none=True)
                accelerator.backward(d_loss)
                opt_d.step()
                terms["disc_loss"] = float(d_loss.detach())
            terms["psnr"] = psnr_from_mse(terms["recon_l2"])
            for name, value in terms.items():
                window.setdefault(name, []).append(value)
            done = step + 1
            bar.update(1)
            event("end", done)
            at_checkpoint = done % settings.checkpoint_every == 0 or done == settings.steps
            if done % settings.log_every == 0 or at_checkpoint:  # a resumed run logs the same windows
                means = _mean_over_ranks(
                    accelerator, {name: sum(values) / len(values) for name, values in window.items()}
                )
                window = {}
                history.append({"step": done, **means})
                bar.set_postfix(_postfix(means))
                if writer is not None:
                    for name, value in means.items():
                        writer.add_scalar(f"tokenizer/{name}", value, done)
                    writer.add_scalar("tokenizer/lr", opt_g.param_groups[-1]["lr"], done)
            if (
                main
                and sample_pixels is not None
                and (done % settings.sample_every == 0 or done == settings.steps)
            ):
                _write_samples(student, sample_pixels, out / "samples" / f"step-{done:06d}.png", writer, done)
            if at_checkpoint:
                seconds = seconds_before + time.perf_counter() - run_start
                save_checkpoint(
                    accelerator, out, done, student, critic, opt_g, opt_d, history, seconds, settings
                )
                event("saved", done)
        bar.close()
        event("trained", settings.steps)
        if writer is not None:
            writer.close()
        run_seconds = time.perf_counter() - run_start
        trained = settings.steps - start_step
        metrics = {
            "settings": asdict(settings),
            "config_overrides": settings.config_fields(),
            "teacher": str(Path(teacher_dir).resolve()),
            "data": str(data_dir.resolve()),
            "split": settings.split,
            "train_images": len(images),
            "steps": settings.steps,
            "resumed_from_step": start_step if resume and existing else None,
            "processes": world,
            "device": str(accelerator.device),
            "mixed_precision": precision,
            "train_seconds": seconds_before + run_seconds,
            "seconds_per_step_this_run": run_seconds / trained if trained else None,
            "images_per_second_this_run": trained * settings.batch_size * world / run_seconds
            if trained
            else None,
            "first": history[0] if history else None,
            "last": history[-1] if history else None,
            "history": history,
        }
        if main:
            _save_final(student, out, metrics)
        accelerator.wait_for_everyone()
        return metrics


def _mean_over_ranks(accelerator, means: dict[str, float]) -> dict[str, float]:
    """Window means averaged over the ranks (every rank logs at the same steps with the same term names)."""
    if accelerator.num_processes == 1:
        return means
    names = sorted(means)
    values = torch.tensor([means[name] for name in names], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(names, values.tolist()))


def _postfix(means: dict[str, float]) -> dict[str, str]:
    shown = {"loss": "loss", "psnr": "psnr", "semantic": "sem", "commitment": "commit", "gan": "gan"}
    return {label: f"{means[name]:.3g}" for name, label in shown.items() if name in means}


def _summary_writer(path: Path, start_step: int):
    """A TensorBoard writer (points past `start_step` of an earlier run are purged), or None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=start_step or None)


@torch.no_grad()
def _write_samples(student, pixels: torch.Tensor, path: Path, writer, step: int) -> None:
    from tokenizer.image_processing import reconstruction_grid

    was_training = student.training
    student.eval()
    param = student.decoder.conv_out.weight
    reconstruction = student.decode(student.encode(pixels.to(param.device)).pixel).float().cpu()
    student.train(was_training)
    grid = reconstruction_grid(pixels, reconstruction)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    if writer is not None:
        import numpy as np

        writer.add_image("tokenizer/reconstructions", np.asarray(grid), step, dataformats="HWC")


def _save_final(student, out: Path, metrics: dict[str, Any]) -> None:
    """save_pretrained into a temporary directory, then move its files into `out` (each rename atomic)."""
    tmp = out / f"{TMP_PREFIX}final"
    if tmp.exists():
        shutil.rmtree(tmp)
    student.save_pretrained(tmp)
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()
    text = json.dumps(metrics, indent=1) + "\n"
    path = out / METRICS_NAME
    tmp_file = out / f"{TMP_PREFIX}{METRICS_NAME}"
    tmp_file.write_text(text, encoding="utf-8")
    os.replace(tmp_file, path)
