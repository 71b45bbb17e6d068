"""Resumable state of a teacher run (`train_teacher(..., resume=True)`, `dualtoken tokenizer teacher --resume`).

A run works in `.<name>.partial/` next to the teacher directory `<name>` (text tokenizer, tb/, checkpoints/); when
training ends the final model is saved there, the directory is renamed over `<name>` in one step, and its
checkpoints/ is deleted. Every `checkpoint_every` steps and after the last step, `checkpoints/step-NNNNNN/` is built
in a temporary sibling and renamed into place (`data_recipes.atomic_io.atomic_directory_write`), so a run killed at any
moment leaves only complete checkpoints:

    model.safetensors     the SiglipModel's weights
    optimizer.pt          the AdamW and LambdaLR state dicts (tensors, numbers, lists: read back with
                          `torch.load(weights_only=True)`, which loads no arbitrary objects)
    sampler.safetensors   the batch sampler's current permutations, its generator's state, torch's CPU RNG state
    state.json            step, the sampler's cursors, every loss so far, the validation curve, seconds, settings

The batch of step s is a function of the sampler's state after step s - 1 only, so restoring all of this continues
the run to the weights an uninterrupted run reaches (bit-identical in fp32 on CPU with the same thread count).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data_recipes.atomic_io import atomic_directory_write

CHECKPOINTS = "checkpoints"
STATE_NAME = "state.json"
STEP_PATTERN = re.compile(r"^step-(\d{6,})$")
# Settings a resumed run may change: they decide what is logged, evaluated, kept or how fast, not the weights.
FREE_SETTINGS = ("threads", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints")


def work_dir(out: Path) -> Path:
    """The directory a run into `out` builds the teacher in (and keeps its checkpoints in until it ends)."""
    return out.parent / f".{out.name}.partial"


def checkpoint_dirs(work: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, path) under `work`, oldest first (temporary directories are not listed)."""
    root = work / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_PATTERN.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def settings_mismatch(
    saved: dict[str, Any], current: dict[str, Any], free: tuple[str, ...] = FREE_SETTINGS
) -> list[str]:
    """Names of the settings (other than `free`, which a resumed run may change) whose values differ between two
    `asdict(settings)`."""
    names = sorted((set(saved) | set(current)) - set(free))
    return [name for name in names if saved.get(name) != current.get(name)]


def save_checkpoint(
    work: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` (0 keeps every one)."""
    tensors = {**sampler_tensors, "torch_rng": torch.get_rng_state()}

    def write(tmp: Path) -> None:
        weights = {name: value.detach().contiguous().clone() for name, value in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt"
        )
        save_file(tensors, str(tmp / "sampler.safetensors"))
        (tmp / STATE_NAME).write_text(json.dumps({**state, "step": step}) + "\n", encoding="utf-8")

    path = atomic_directory_write(work / CHECKPOINTS / f"step-{step:06d}", write)
    if keep:
        for _, old in checkpoint_dirs(work)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(
    path: Path,
    identity: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore the model, optimizer, scheduler and torch's CPU RNG from checkpoint `path` of a run with `identity`
    ({"settings": asdict(settings), "dataset": path}); return its state.json and the sampler's tensors (for
    `_BatchSampler.load_state`). A checkpoint of other data or settings (up to FREE_SETTINGS) is refused."""
    try:
        saved = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"teacher checkpoint {path}: cannot read {STATE_NAME} ({error})") from error
    changed = settings_mismatch(saved.get("settings", {}), identity["settings"])
    if changed or saved.get("dataset") != identity["dataset"]:
        raise ValueError(
            f"teacher checkpoint {path}: written by a run on {saved.get('dataset')} with other settings "
            f"({', '.join(changed) or 'same settings'}); resume with the same data and settings, or delete "
            f"{path.parent.parent} to start again"
        )
    try:
        weights = load_file(str(path / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
        states = torch.load(path / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        tensors = load_file(str(path / "sampler.safetensors"))
        torch.set_rng_state(tensors.pop("torch_rng"))
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError) as error:
        raise ValueError(f"teacher checkpoint {path}: cannot resume from it ({error})") from error
    return saved, tensors
