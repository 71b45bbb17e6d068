"""Real-format data loaders: image folders, webdataset tar shards, LLaVA JSON, COCO captions, VQAv2, prompt JSONL;
one module per format family (`images`, `llava`, `captions`, `vqa`, `prompts`) over the shared `base`. This module
holds the registry (`LOADERS`, `open_loader`).

Each loader is an iterable of typed, frozen records. Records carry image *paths* (or, for tar shards, where the
bytes live) and decode lazily through `data_recipes.image_io.load_image`; `check_images=True` makes the loader
fully decode (verify) every image up front. Relative image paths resolve against `image_root` (default: the
directory of the annotation file).

A malformed record is handled by `on_bad_sample`: "error" raises `DataError` (a ValueError naming file, record and
what was expected); "skip" drops the record and counts it by reason in the loader's `SkipCounter` (`loader.skips`,
or one passed in and shared by several loaders), which the caller reads and reports. A file that cannot be read or
parsed at all (missing, not JSON, wrong top-level shape) always raises: there is nothing to skip to.

    loader = open_loader("llava", "train/llava.json", on_bad_sample="skip")
    records = list(loader)
    print(loader.skips.report())
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from data_recipes.loaders.base import Loader
from data_recipes.loaders.captions import CocoCaptionsLoader
from data_recipes.loaders.images import ImageFolderLoader, WebDatasetLoader
from data_recipes.loaders.llava import LlavaLoader
from data_recipes.loaders.prompts import PromptsLoader
from data_recipes.loaders.vqa import VQALoader

LOADERS: dict[str, type[Loader]] = {
    "image_folder": ImageFolderLoader,
    "webdataset": WebDatasetLoader,
    "llava": LlavaLoader,
    "coco_captions": CocoCaptionsLoader,
    "vqav2": VQALoader,
    "prompts": PromptsLoader,
}


def open_loader(kind: str, path: str | os.PathLike | Sequence[str | os.PathLike], **options: Any) -> Loader:
    """The loader of `kind` (a key of LOADERS) over `path`; `options` go to its constructor."""
    if kind not in LOADERS:
        raise ValueError(f"kind: expected one of {sorted(LOADERS)}, got {kind!r}")
    return LOADERS[kind](path, **options)
