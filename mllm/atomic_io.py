"""Atomic writes of checkpoint directories: build in a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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
