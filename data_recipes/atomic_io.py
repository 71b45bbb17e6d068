"""Atomic writes: checkpoint directories built in a temporary sibling and renamed into place, and single files
(text, JSON, PNG) written under a temporary name and renamed, so a file that exists is always complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary sibling of `path` (parents created), then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    """JSON with sorted keys, indented; values JSON cannot hold are written as their str()."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_png(image: Any, path: str | os.PathLike) -> Path:
    """A PIL image as PNG."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def atomic_save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG (tight layout); the figure is closed afterwards."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def atomic_directory_write(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` on a fresh sibling directory, then move its entries into `target` atomically.

    A new `target` appears in one rename; in an existing one each written entry replaces its old version with
    `os.replace` (other entries already there are left alone).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if not target.exists():
            os.replace(tmp, target)
            return target
        for entry in tmp.iterdir():
            destination = target / entry.name
            if destination.is_dir() and not destination.is_symlink():
                old = target / f".{entry.name}.old-{os.getpid()}"
                os.replace(destination, old)
                os.replace(entry, destination)
                shutil.rmtree(old)
            else:
                os.replace(entry, destination)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
