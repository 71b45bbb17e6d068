"""What makes the DualToken tokenizer's training loop resume exactly: batches addressed by step (`StepBatches`: a
seeded permutation per epoch, so step N reads the same images in a fresh run and after a resume) and checkpoints,
`checkpoints/step-NNNNNN/` directories holding the model and discriminator weights (safetensors), both optimizers,
every rank's RNG state and trainer_state.json (step, time, loss history, settings). A checkpoint is written into a `.tmp-` directory and renamed into place, so a kill
leaves either the whole checkpoint or none; `checkpoint_dirs` lists only finished ones."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tokenizer.encode import KeyedImage, load_pixels

CHECKPOINTS = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
TMP_PREFIX = ".tmp-"
STATE_NAME = "trainer_state.json"
# Settings a resumed run may change: they do not touch the weights or the data order.
FREE_SETTINGS = (
    "threads",
    "num_workers",
    "log_every",
    "sample_every",
    "checkpoint_every",
    "keep_checkpoints",
)


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


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{index}"] = cuda_state
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in state]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in module.state_dict().items()}


def load_state(module: nn.Module, path: Path) -> None:
    state = load_file(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def save_checkpoint(
    accelerator,
    out: Path,
    step: int,
    student,
    critic: nn.Module,
    opt_g,
    opt_d,
    history: list[dict],
    seconds: float,
    settings: Any,
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
        save_file(cpu_state_dict(student), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(cpu_state_dict(critic), str(tmp / "discriminator.safetensors"), metadata={"format": "pt"})
        torch.save(opt_g.state_dict(), tmp / "optimizer.pt")
        torch.save(opt_d.state_dict(), tmp / "disc_optimizer.pt")
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
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
