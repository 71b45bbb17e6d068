"""Pre-tokenization: a dataset's images -> DualToken code grids in a code store (`data_recipes.code_shards`), and code
grids -> PNGs (`dualtoken tokenizer encode | decode`). Also owns how a dataset names its images.

Image names (the CONTRACT with `train.data`): every image is keyed by `image_key(ref)` where `ref` is its path
relative to the dataset root, written exactly as LLaVA's "image" field and a prompt record's "file" field hold it.
For a shapes-world dataset the root is the split directory (`DATA/train/llava.json` says "images/0000000.png"), so
`dataset_images(DATA, "train")` lists `scenes.jsonl`'s "file" entries relative to `DATA/train`; a plain folder of
images is its own root (paths relative to it); a recipe's llava / prompts / image_folder sources name their images
relative to each source's image root (the file's directory unless the recipe sets `image_root`).

`encode_images` is batched, shows a progress bar and resumes: images already in the store (its `done_ids`) are
skipped, and a store whose manifest says complete with every image present is left untouched (nothing rewritten).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_recipes.code_shards import CodeShardWriter, CodeStore, image_key
from data_recipes.image_io import IMAGE_EXTENSIONS, ImageLoadError, load_image
from tokenizer.image_processing import preprocess, to_pil

SHAPES_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class KeyedImage:
    """An image file and the reference string it is keyed by (`image_key(ref)`)."""

    ref: str
    path: Path

    @property
    def key(self) -> int:
        return image_key(self.ref)


# ---------------------------------------------------------------------------------------------------- listing
def is_shapes_dataset(data_dir: str | os.PathLike) -> bool:
    return (Path(data_dir) / SHAPES_MANIFEST).is_file()


def shapes_split_dir(data_dir: str | os.PathLike, split: str) -> Path:
    """The directory a shapes-world split's image references are relative to."""
    root = Path(data_dir)
    manifest = json.loads((root / SHAPES_MANIFEST).read_text(encoding="utf-8"))
    files = manifest.get("files", {}).get(split)
    if not isinstance(files, dict) or "scenes" not in files:
        found = sorted(manifest.get("files", {}))
        raise ValueError(f"{root / SHAPES_MANIFEST}: no split {split!r} (splits: {found})")
    return (root / files["scenes"]).parent


def dataset_images(data_dir: str | os.PathLike, split: str | None = "train") -> list[KeyedImage]:
    """The images of a shapes-world split (`DATA/manifest.json` present; `split` required) in scenes.jsonl order,
    or of a plain image folder (every image file under it, recursively, sorted; `split` names a sub-folder when
    given and present, else is ignored)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {root}: not a directory")
    if is_shapes_dataset(root):
        if split is None:
            raise ValueError(f"dataset {root} is a shapes-world dataset: name a split (train, val or test)")
        split_dir = shapes_split_dir(root, split)
        lines = (split_dir / "scenes.jsonl").read_text(encoding="utf-8").splitlines()
        refs = [json.loads(line)["file"] for line in lines if line.strip()]
        return [KeyedImage(ref, split_dir / ref) for ref in refs]
    if split and (root / split).is_dir():
        root = root / split
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                path = Path(directory) / name
                found.append(KeyedImage(path.relative_to(root).as_posix(), path))
    if not found:
        raise ValueError(f"dataset {root}: no image files (extensions {sorted(IMAGE_EXTENSIONS)})")
    return sorted(found, key=lambda image: image.ref)


def recipe_images(
    recipe: str | os.PathLike, split: str = "train", root: str | os.PathLike | None = None
) -> list[KeyedImage]:
    """Every image the llava / prompts / image_folder sources of a recipe split reference (first occurrence kept),
    keyed relative to each source's image root, as `train.data` looks them up."""
    from data_recipes.recipes import load_recipe

    images: dict[str, KeyedImage] = {}
    for spec in load_recipe(recipe, root=root).sources(split):
        if spec.kind == "image_folder":
            for image in dataset_images(spec.path, None):
                images.setdefault(image.ref, image)
            continue
        if spec.kind not in ("llava", "prompts"):
            raise ValueError(
                f"recipe {recipe}: source {spec.name!r} is a {spec.kind} source; encode handles llava, prompts "
                "and image_folder sources (their image paths are what the MLLM training data looks up)"
            )
        image_root = Path(spec.image_root) if spec.image_root is not None else Path(spec.path).parent
        for record in spec.loader(on_bad_sample="skip").load():
            paths = record.image_paths if spec.kind == "llava" else (record.image_path,)
            for path in paths:
                if path is None:
                    continue
                ref = Path(os.path.relpath(path, image_root)).as_posix()
                images.setdefault(ref, KeyedImage(ref, Path(path)))
    if not images:
        raise ValueError(f"recipe {recipe}: split {split!r} references no image")
    return list(images.values())


def is_recipe(source: str | os.PathLike) -> bool:
    """A recipe is a file (YAML / JSON); a dataset is a directory."""
    return Path(source).is_file()


def source_images(
    source: str | os.PathLike, split: str | None = "train", recipe_root: str | os.PathLike | None = None
) -> list[KeyedImage]:
    """The images of `split` of a dataset directory (`dataset_images`) or of a recipe file (`recipe_images`)."""
    if is_recipe(source):
        return recipe_images(source, split or "train", recipe_root)
    return dataset_images(source, split)


def load_pixels(images: Sequence[KeyedImage], image_size: int) -> torch.Tensor:
    """(N, 3, S, S) float in [-1, 1] (`tokenizer.image_processing.preprocess` of the safely loaded images)."""
    return preprocess([load_image(image.path) for image in images], image_size=image_size)


def load_tokenizer(tokenizer_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """A trained `DualTokenModel` (eval mode) from its directory."""
    from tokenizer.modeling import DualTokenModel

    path = Path(tokenizer_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"tokenizer {path}: no config.json (expected a `dualtoken tokenizer train` output)"
        )
    return DualTokenModel.from_pretrained(path).to(device).eval()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------- encode
def encode_images(
    model,
    images: Sequence[KeyedImage],
    out_dir: str | os.PathLike,
    *,
    tokenizer_name: str,
    source: str,
    batch_size: int = 64,
    shard_size: int = 2048,
    max_images: int | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode `images` with `model` into the store `out_dir`, skipping what it already holds. `max_images` stops
    after that many new images without marking the store complete (as an interrupted run would). Unreadable
    images raise, or are counted and left out with `skip_bad_images`. Returns counts and seconds."""
    start = time.perf_counter()
    cfg = model.config
    writer = CodeShardWriter(
        out_dir,
        grid=(model.grid_size, model.grid_size),
        depth=cfg.rq_depth,
        codebook_size=cfg.codebook_size,
        tokenizer=tokenizer_name,
        source=source,
        shard_size=shard_size,
    )
    unique: dict[int, KeyedImage] = {}
    for image in images:
        unique.setdefault(image.key, image)
    todo = [image for key, image in unique.items() if key not in writer.done_ids]
    already = len(unique) - len(todo)
    if not todo and writer.manifest["complete"]:
        return {"images": len(unique), "encoded": 0, "already_done": already, "skipped": [], "seconds": 0.0}
    stop_early = max_images is not None and max_images < len(todo)
    if stop_early:
        todo = todo[:max_images]
    device = next(model.parameters()).device
    skipped: list[str] = []
    encoded = 0
    bar = tqdm(total=len(todo), desc="encode", unit="img", disable=not progress)
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        pixels, kept = [], []
        for image in batch:
            try:
                pixels.append(load_image(image.path))
                kept.append(image)
            except ImageLoadError as error:
                if not skip_bad_images:
                    raise
                skipped.append(f"{image.ref}: {error}")
        if kept:
            codes = model.encode(preprocess(pixels, image_size=cfg.image_size).to(device))
            writer.add([image.key for image in kept], codes.pixel, codes.semantic)
            encoded += len(kept)
        bar.update(len(batch))
    bar.close()
    if stop_early:
        writer.flush()
    else:
        writer.finish()
    return {
        "images": len(unique),
        "encoded": encoded,
        "already_done": already,
        "skipped": skipped,
        "complete": not stop_early,
        "seconds": time.perf_counter() - start,
    }


def encode_dataset(
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str | None = "train",
    recipe: str | os.PathLike | None = None,
    recipe_root: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`encode_images` over a dataset split (`data_dir`) or a recipe split (`recipe`; a `data_dir` that is a
    file is taken as a recipe); the store records the tokenizer directory and the source, and refuses to mix codes
    of another tokenizer or source."""
    if (data_dir is None) == (recipe is None):
        raise ValueError("encode_dataset: give exactly one of data_dir and recipe")
    if recipe is None and is_recipe(data_dir):
        recipe, data_dir = data_dir, None
    if recipe is not None:
        images = recipe_images(recipe, split or "train", recipe_root)
        source = f"recipe:{Path(recipe).resolve()}:{split}"
    else:
        images = dataset_images(data_dir, split)
        source = (
            f"{Path(data_dir).resolve()}:{split}"
            if is_shapes_dataset(data_dir)
            else str(Path(data_dir).resolve())
        )
    model = load_tokenizer(tokenizer_dir, default_device())
    result = encode_images(
        model, images, out_dir, tokenizer_name=str(Path(tokenizer_dir).resolve()), source=source, **options
    )
    return {"store": str(out_dir), "source": source, **result}


# ---------------------------------------------------------------------------------------------------- decode
def decode_store(
    tokenizer_dir: str | os.PathLike,
    store_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    images: Sequence[KeyedImage] | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> list[Path]:
    """Decode the pixel codes of a store to PNGs. With `images` (the listing the store was encoded from) each PNG
    goes to `out_dir/<ref>` (the dataset's own layout) and only those images are decoded; without it every image
    of the store becomes `out_dir/<image id>.png`. Returns the written paths."""
    model = load_tokenizer(tokenizer_dir, default_device())
    store = CodeStore(store_dir, allow_incomplete=True)
    store.check_geometry(model.grid_size, model.config.rq_depth, model.config.codebook_size)
    if images is not None:
        missing = [image.ref for image in images if image.key not in store]
        if missing:
            raise KeyError(
                f"code store {store_dir}: no codes for {len(missing)} image(s), e.g. {missing[:3]}"
            )
        targets = [(image.key, Path(image.ref)) for image in images]
    else:
        targets = [(key, Path(f"{key}.png")) for key in sorted(store.ids())]
    targets = targets[:limit] if limit is not None else targets
    out = Path(out_dir)
    written: list[Path] = []
    bar = tqdm(total=len(targets), desc="decode", unit="img", disable=not progress)
    for first in range(0, len(targets), batch_size):
        batch = targets[first : first + batch_size]
        pixel = torch.stack([store.get(key)[0] for key, _ in batch])
        for (_, name), image in zip(batch, to_pil(model.decode(pixel))):
            path = out / name.with_suffix(".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            written.append(path)
        bar.update(len(batch))
    bar.close()
    return written


# ---------------------------------------------------------------------------------------------------- CLI
def _encode(args) -> int:
    import sys

    torch.set_num_threads(args.threads)
    try:
        result = encode_dataset(
            args.model,
            args.out,
            data_dir=args.data,
            split=args.split,
            recipe_root=args.recipe_root,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            skip_bad_images=args.skip_bad_images,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"dualtoken tokenizer encode: error: {error}", file=sys.stderr)
        return 2
    print(
        f"encode: {result['encoded']} new, {result['already_done']} already in {result['store']} "
        f"({result['images']} images, {len(result['skipped'])} skipped) in {result['seconds']:.1f} s"
    )
    for line in result["skipped"][:10]:
        print(f"  skipped {line}")
    return 0


def _decode(args) -> int:
    import sys

    torch.set_num_threads(args.threads)
    try:
        images = source_images(args.data, args.split, args.recipe_root) if args.data is not None else None
        written = decode_store(
            args.model, args.codes, args.out, images=images, limit=args.limit, progress=not args.quiet
        )
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"dualtoken tokenizer decode: error: {error}", file=sys.stderr)
        return 2
    print(f"decode: wrote {len(written)} PNGs under {args.out}")
    return 0


def register(tok_sub) -> None:
    """Add `dualtoken tokenizer encode` and `dualtoken tokenizer decode`."""
    parser = tok_sub.add_parser(
        "encode",
        help="pre-tokenize a dataset split into a code store",
        description="Encode every image of a split of --data (a shapes-world dataset or image folder, or a data "
        "recipe file whose llava / prompts / image_folder sources name the images) into a code store of pixel + "
        "semantic code grids. Resumable: re-running skips the images already stored.",
    )
    parser.add_argument(
        "--model", "--tokenizer", dest="model", required=True, type=Path, help="trained tokenizer directory"
    )
    parser.add_argument(
        "--data", required=True, type=Path, help="shapes-world dataset, image folder or recipe (YAML/JSON)"
    )
    parser.add_argument("--recipe-root", dest="recipe_root", type=Path, help="${DATA} of a recipe")
    parser.add_argument("--split", default="train", help="split to encode (default train)")
    parser.add_argument("--out", required=True, type=Path, help="code store directory")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    parser.add_argument("--shard-size", dest="shard_size", type=int, default=2048, help="images per shard")
    parser.add_argument("--skip-bad-images", dest="skip_bad_images", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_encode)

    parser = tok_sub.add_parser(
        "decode",
        help="decode a code store's pixel codes to PNGs",
        description="Decode the pixel codes of a code store to PNG images: into the dataset's own layout when "
        "--data/--split name the images the store was encoded from, else as <image id>.png.",
    )
    parser.add_argument(
        "--model", "--tokenizer", dest="model", required=True, type=Path, help="trained tokenizer directory"
    )
    parser.add_argument("--codes", required=True, type=Path, help="code store directory")
    parser.add_argument("--out", required=True, type=Path, help="output directory for PNGs")
    parser.add_argument(
        "--data",
        type=Path,
        help="dataset or recipe the store was encoded from (names the PNGs by image path)",
    )
    parser.add_argument("--split", default="train", help="split of --data (default train)")
    parser.add_argument("--recipe-root", dest="recipe_root", type=Path, help="${DATA} of a recipe")
    parser.add_argument("--limit", type=int, help="decode at most this many images")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_decode)
