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
import re
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from tokenizer.encode import KeyedImage, dataset_images, is_shapes_dataset, load_pixels, source_images

CHECKPOINTS = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
TMP_PREFIX = ".tmp-"
METRICS_NAME = "train_metrics.json"
STATE_NAME = "trainer_state.json"

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


# ---------------------------------------------------------------------------------------------------- data
def batch_positions(step: int, rank: int, per_rank: int, world: int) -> range:
    """Positions in the endless stream of epochs that rank `rank` reads at `step`."""
    first = (step * world + rank) * per_rank
    return range(first, first + per_rank)


class StepBatches(torch.utils.data.Dataset):
    """Item `step` = this rank's float batch (B, 3, S, S) of that step: the stream is the images in a
    seeded permutation per epoch (permutation of epoch e seeded by (seed, e)), read in order across epochs."""

    def __init__(
        self, images: list[KeyedImage], image_size: int, seed: int, per_rank: int, rank: int, world: int
    ):
        self.images, self.image_size, self.seed = images, image_size, seed
        self.per_rank, self.rank, self.world = per_rank, rank, world
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.images), generator=generator).tolist()}
        return self._orders[epoch]

    def indices(self, step: int) -> list[int]:
        n = len(self.images)
        return [
            self._order(p // n)[p % n] for p in batch_positions(step, self.rank, self.per_rank, self.world)
        ]

    def __len__(self) -> int:  # steps are addressed directly; the sampler decides which
        return 2**62

    def __getitem__(self, step: int) -> torch.Tensor:
        return load_pixels([self.images[i] for i in self.indices(step)], self.image_size)


# ---------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Finished checkpoints (step, path), oldest first; temporary directories of interrupted saves are ignored."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{index}"] = cuda_state
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in state]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def _state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in module.state_dict().items()}


def _load_state(module: nn.Module, path: Path) -> None:
    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


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
            _load_state(model, checkpoint / "model.safetensors")
            _load_state(disc, checkpoint / "discriminator.safetensors")
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
            _set_rng_state(rng)

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
                _save_checkpoint(
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


def _save_checkpoint(
    accelerator,
    out: Path,
    step: int,
    student,
    critic: nn.Module,
    opt_g,
    opt_d,
    history: list[dict],
    seconds: float,
    settings: TokenizerTrainSettings,
) -> None:
    """Write checkpoint `step` into a temporary directory and rename it into place (then prune old ones)."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f"{TMP_PREFIX}step-{step:06d}"
    main = accelerator.is_main_process
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        student.config.save_pretrained(tmp)
        save_file(_state_dict(student), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(_state_dict(critic), str(tmp / "discriminator.safetensors"), metadata={"format": "pt"})
        torch.save(opt_g.state_dict(), tmp / "optimizer.pt")
        torch.save(opt_d.state_dict(), tmp / "disc_optimizer.pt")
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if main:
        state = {"step": step, "train_seconds": seconds, "history": history, "settings": asdict(settings)}
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if settings.keep_checkpoints:
            for _, old in checkpoint_dirs(out)[: -settings.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


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


# ---------------------------------------------------------------------------------------------------- CLI
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
