"""The pre-tokenized code store: DualToken code grids of a dataset's images, written once, read by MLLM training.

Layout of a store directory::

    DIR/manifest.json           {"format": "dualtoken-codes/1", "grid": [h, w], "depth": D, "codebook_size": K,
                                 "tokenizer": str, "source": str,
                                 "shards": [{"file": "codes-00000.safetensors", "count": n}, ...],
                                 "complete": bool}
    DIR/codes-00000.safetensors image_ids (n,) int64, pixel (n,h,w,D), semantic (n,h,w,D)

Codes are int16 when K <= 32767, else int32. Images are keyed by an int64 id: `image_key(ref)` turns a record's
image reference into that id (an int stays itself; a path string, relative to the dataset root exactly as LLaVA's
"image" and prompt records' "file" fields hold it, becomes a stable 63-bit hash), so the encoder that writes a
store and the training data that reads it agree without sharing a table.

`CodeShardWriter` is resumable and kill-safe: every shard is written to a temporary file and renamed into place,
then the manifest is rewritten the same way, so a kill leaves the store at its last complete shard;
`done_ids` tells the encoder which images to skip. `CodeStore` reads lazily (one row of one shard per `get`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "dualtoken-codes/1"
MANIFEST = "manifest.json"
SHARD_PATTERN = "codes-{:05d}.safetensors"
_TMP_PREFIX = ".tmp-"
_INT16_MAX = 32767


def image_key(ref: int | str | os.PathLike) -> int:
    """The int64 id of an image reference: an int (a record's "image_id") stays itself; a path string hashes
    (blake2b, 63 bits) after normalisation to POSIX form without a leading "./"."""
    if isinstance(ref, bool):
        raise TypeError(f"image_key: {ref!r} is not an image reference")
    if isinstance(ref, int):
        if not 0 <= ref < 2**63:
            raise ValueError(f"image_key: image id {ref} does not fit a non-negative int64")
        return ref
    text = Path(ref).as_posix() if isinstance(ref, os.PathLike) else str(ref).replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    if not text:
        raise ValueError("image_key: empty image reference")
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def code_dtype(codebook_size: int) -> torch.dtype:
    """The compact integer dtype that holds codes in [0, codebook_size)."""
    return torch.int16 if codebook_size <= _INT16_MAX else torch.int32


def _atomic_write_bytes(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"code store {directory}: no {MANIFEST} (not a code store, or nothing written yet)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"code store {path}: manifest is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"code store {path}: format is {found!r}, expected {FORMAT!r}")
    checks = {
        "grid": lambda v: (
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)
        ),
        "depth": lambda v: isinstance(v, int) and v > 0,
        "codebook_size": lambda v: isinstance(v, int) and v > 0,
        "tokenizer": lambda v: isinstance(v, str),
        "source": lambda v: isinstance(v, str),
        "shards": lambda v: (
            isinstance(v, list)
            and all(
                isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("count"), int)
                for s in v
            )
        ),
        "complete": lambda v: isinstance(v, bool),
    }
    for key, valid in checks.items():
        if key not in manifest or not valid(manifest[key]):
            raise ValueError(
                f"code store {path}: field {key!r} is missing or malformed ({manifest.get(key)!r})"
            )
    return manifest


class CodeShardWriter:
    """Append image code grids to a store directory, one safetensors shard per `shard_size` images.

    Reopening an existing store with the same geometry, tokenizer and source resumes it (`done_ids` holds what
    is already written); a different geometry/tokenizer/source raises. Call `finish()` when every image of the
    source is written: only then does the manifest say `complete: true`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        grid: tuple[int, int] | list[int],
        depth: int,
        codebook_size: int,
        tokenizer: str,
        source: str,
        shard_size: int = 4096,
    ):
        if shard_size <= 0:
            raise ValueError(f"CodeShardWriter: shard_size must be positive, got {shard_size}")
        self.directory = Path(directory)
        self.grid = [int(grid[0]), int(grid[1])]
        self.depth = int(depth)
        self.codebook_size = int(codebook_size)
        self.dtype = code_dtype(self.codebook_size)
        self.shard_size = shard_size
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(_TMP_PREFIX + "*"):
            stale.unlink()
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "grid": self.grid,
            "depth": self.depth,
            "codebook_size": self.codebook_size,
            "tokenizer": str(tokenizer),
            "source": str(source),
            "shards": [],
            "complete": False,
        }
        self.done_ids: set[int] = set()
        if (self.directory / MANIFEST).exists():
            existing = _read_manifest(self.directory)
            for key in ("grid", "depth", "codebook_size", "tokenizer", "source"):
                if existing[key] != self.manifest[key]:
                    raise ValueError(
                        f"CodeShardWriter: {self.directory} holds codes with {key}={existing[key]!r}, "
                        f"this writer has {key}={self.manifest[key]!r}; use another directory"
                    )
            self.manifest["shards"] = existing["shards"]
            self.manifest["complete"] = existing["complete"]
            for shard in existing["shards"]:
                with safe_open(self.directory / shard["file"], framework="pt") as handle:
                    self.done_ids.update(handle.get_tensor("image_ids").tolist())
        self._ids: list[int] = []
        self._pixel: list[torch.Tensor] = []
        self._semantic: list[torch.Tensor] = []

    def __len__(self) -> int:
        """Images written to shards so far (buffered ones excluded)."""
        return len(self.done_ids)

    def add(self, image_ids: Iterable[int], pixel: torch.Tensor, semantic: torch.Tensor) -> None:
        """Buffer a batch: ids (n,) and code grids (n,h,w,D); full shards are written as they fill up."""
        ids = [int(i) for i in (image_ids.tolist() if torch.is_tensor(image_ids) else image_ids)]
        shape = (len(ids), *self.grid, self.depth)
        for name, codes in (("pixel", pixel), ("semantic", semantic)):
            if tuple(codes.shape) != shape:
                raise ValueError(
                    f"CodeShardWriter.add: {name} codes are {tuple(codes.shape)}, expected {shape}"
                )
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
                raise ValueError(f"CodeShardWriter.add: {name} codes must lie in [0, {self.codebook_size})")
        pending = set(self._ids)
        for image_id in ids:
            if not 0 <= image_id < 2**63:
                raise ValueError(f"CodeShardWriter.add: image id {image_id} is not a non-negative int64")
            if image_id in self.done_ids or image_id in pending:
                raise ValueError(f"CodeShardWriter.add: image id {image_id} is already in {self.directory}")
            pending.add(image_id)
        if ids:
            self.manifest["complete"] = False
        self._ids.extend(ids)
        self._pixel.append(pixel.detach().to("cpu", self.dtype))
        self._semantic.append(semantic.detach().to("cpu", self.dtype))
        while len(self._ids) >= self.shard_size:
            self._write_shard(self.shard_size)

    def flush(self) -> None:
        """Write the buffered images as a (possibly short) shard."""
        if self._ids:
            self._write_shard(len(self._ids))

    def finish(self) -> None:
        """Flush and mark the store complete."""
        self.flush()
        self.manifest["complete"] = True
        self._write_manifest()

    def _write_shard(self, count: int) -> None:
        pixel, semantic = torch.cat(self._pixel), torch.cat(self._semantic)
        ids = torch.tensor(self._ids[:count], dtype=torch.int64)
        name = SHARD_PATTERN.format(len(self.manifest["shards"]))
        tensors = {
            "image_ids": ids,
            "pixel": pixel[:count].contiguous(),
            "semantic": semantic[:count].contiguous(),
        }
        _atomic_write_bytes(
            self.directory / name, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT})
        )
        self.manifest["shards"].append({"file": name, "count": count})
        self._write_manifest()
        self.done_ids.update(self._ids[:count])
        self._ids = self._ids[count:]
        self._pixel, self._semantic = [pixel[count:]], [semantic[count:]]

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1) + "\n"
        _atomic_write_bytes(self.directory / MANIFEST, lambda tmp: Path(tmp).write_text(text))


class CodeStore:
    """Read-only, lazy view of a store: `len`, `image_id in store`, `get(image_id) -> (pixel, semantic)`.

    An incomplete store (an interrupted encode) raises unless `allow_incomplete=True`. Open shard handles are
    not pickled, so the store can go to DataLoader workers.
    """

    def __init__(self, directory: str | os.PathLike, allow_incomplete: bool = False):
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory)
        if not self.manifest["complete"] and not allow_incomplete:
            raise ValueError(
                f"code store {self.directory} is incomplete (complete=false in {MANIFEST}): the encoder was "
                "interrupted; resume it, or open with allow_incomplete=True"
            )
        self.grid = tuple(self.manifest["grid"])
        self.depth = int(self.manifest["depth"])
        self.codebook_size = int(self.manifest["codebook_size"])
        shape = (*self.grid, self.depth)
        self._index: dict[int, tuple[int, int]] = {}
        for shard_number, shard in enumerate(self.manifest["shards"]):
            path = self.directory / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"code store {self.directory}: shard {shard['file']} is missing")
            try:
                with safe_open(path, framework="pt") as handle:
                    ids = handle.get_tensor("image_ids").tolist()
                    for name in ("pixel", "semantic"):
                        tensor_shape = tuple(handle.get_slice(name).get_shape())
                        if tensor_shape != (shard["count"], *shape):
                            raise ValueError(
                                f"code store {path}: {name} is {tensor_shape}, the manifest implies "
                                f"{(shard['count'], *shape)}"
                            )
            except (OSError, SafetensorError) as err:
                raise ValueError(f"code store {path}: unreadable shard ({err})") from err
            if len(ids) != shard["count"]:
                raise ValueError(
                    f"code store {path}: holds {len(ids)} ids, the manifest says {shard['count']}"
                )
            for row, image_id in enumerate(ids):
                if image_id in self._index:
                    raise ValueError(f"code store {self.directory}: image id {image_id} appears twice")
                self._index[image_id] = (shard_number, row)
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, int) and image_id in self._index

    def ids(self) -> list[int]:
        return list(self._index)

    def check_geometry(self, grid_size: int, rq_depth: int, codebook_size: int) -> None:
        """Raise when the store's codes do not fit a model with this grid, depth and codebook size."""
        expected = {"grid": (grid_size, grid_size), "depth": rq_depth, "codebook_size": codebook_size}
        found = {"grid": self.grid, "depth": self.depth, "codebook_size": self.codebook_size}
        if found != expected:
            raise ValueError(
                f"code store {self.directory} holds codes with {found}; the model expects {expected}"
            )

    def code_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel, semantic) (D, K) counts of every code at every residual depth over all images of the store."""
        counts = [torch.zeros(self.depth, self.codebook_size, dtype=torch.long) for _ in range(2)]
        for shard in self.manifest["shards"]:
            with safe_open(self.directory / shard["file"], framework="pt") as handle:
                for total, name in zip(counts, ("pixel", "semantic")):
                    codes = handle.get_tensor(name).long().reshape(-1, self.depth)
                    for depth in range(self.depth):
                        total[depth] += torch.bincount(codes[:, depth], minlength=self.codebook_size)
        return counts[0], counts[1]

    def get(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel, semantic) LongTensors (h, w, D) of one image."""
        try:
            shard_number, row = self._index[image_id]
        except KeyError:
            raise KeyError(f"code store {self.directory}: no codes for image id {image_id}") from None
        handle = self._handles.get(shard_number)
        if handle is None:
            path = self.directory / self.manifest["shards"][shard_number]["file"]
            handle = self._handles[shard_number] = safe_open(path, framework="pt")
        pixel = handle.get_slice("pixel")[row : row + 1]
        semantic = handle.get_slice("semantic")[row : row + 1]
        return pixel[0].long(), semantic[0].long()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
