"""Dataset validation (`dualtoken data validate`): every problem of a dataset, found before training on it.

PATH is a shapes-world dataset directory (the layout of `data_recipes.shapes_dataset`), a single file of one
of the real formats (LLaVA JSON, COCO captions JSON, VQAv2 questions or annotations JSON, prompts JSONL,
webdataset tar shard) or an image folder. Record-level rules are the loaders' own (`data_recipes.loaders`,
run with `on_bad_sample="skip"`), so a dataset that validates cleanly is one the loaders read without a skip.
On top of them the checks (`checks`: shared bookkeeping and the image checks; `formats`: one method per real
format; `shapes`: the shapes world) add what a single loader cannot see:

- every referenced image exists and fully decodes (`data_recipes.image_io.probe_image`), each file once;
- shapes world: manifest and class list, scenes.jsonl (fields, types, scenes, ids named by their image files),
  that every image file belongs to a scene and every record refers to a scene of its split, VQA questions and
  annotations one to one, image ids disjoint across splits, no held-out pair in train/val, manifest counts and
  image sizes as declared.

Each defect is a `Problem(file, record, kind, message)`; the message says what was expected. Kinds include
missing_file, malformed_json, missing_field, wrong_type, placeholder_mismatch, empty_answer, empty_caption,
empty_prompt, empty_question, duplicate_id, unknown_id, missing_annotation, missing_record, missing_image,
unreadable_image, size_mismatch, unlisted_image, inconsistent, invalid_scene, heldout_leak, count_mismatch
(loader kinds such as bad_turn_order pass through unchanged).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from data_recipes.image_io import DEFAULT_MAX_PIXELS
from data_recipes.loaders.base import DataError
from data_recipes.validate.checks import DEFAULT_PROBLEMS_SHOWN, FORMATS, ValidationReport, detect_format
from data_recipes.validate.shapes import ShapesValidation


def validate_dataset(
    path: str | os.PathLike,
    fmt: str = "auto",
    *,
    annotations: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    image_pattern: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: bool = True,
    progress: bool = True,
) -> ValidationReport:
    """Check every file and record of the dataset at `path` (see the module docstring).

    `fmt` is one of FORMATS ("auto" detects it). `annotations` pairs a VQAv2 annotations file with the
    questions file `path`; `image_pattern` (a format string over image_id, e.g.
    "val2014/COCO_val2014_{image_id:012d}.jpg") locates VQAv2 images; `image_root` is where relative image
    paths resolve (default: the file's directory). With `check_images=False` images are checked for existence
    only. Raises ValueError for unusable arguments (unknown format, missing path); every defect of the data
    itself is a Problem in the report.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root}: no such file or directory; expected a dataset directory or file")
    if annotations is not None and not Path(annotations).exists():
        raise ValueError(f"--annotations {annotations}: no such file; expected a VQAv2 annotations JSON file")
    validation = ShapesValidation(root, fmt, max_pixels, check_images, progress)
    if fmt == "auto":
        try:
            fmt = "vqav2" if annotations is not None else detect_format(root)
        except DataError as error:  # cannot even be parsed: that is the (only) problem to report
            validation.add_error(error)
            return validation.report
        validation.report.format = fmt
    if annotations is not None and fmt != "vqav2":
        raise ValueError(f"--annotations pairs VQAv2 files; {root} is checked as {fmt}")
    images_from = Path(image_root) if image_root is not None else None
    if fmt == "shapes":
        validation.shapes(root)
        return validation.report
    if fmt == "llava":
        validation.llava(root, images_from)
    elif fmt == "coco_captions":
        validation.coco_captions(root, images_from)
    elif fmt == "vqav2":
        validation.vqav2(root, Path(annotations) if annotations else None, images_from, image_pattern)
    elif fmt == "prompts":
        validation.prompts(root, images_from)
    elif fmt == "image_folder":
        validation.image_folder(root)
    else:
        validation.webdataset(root)
    validation.check_referenced_images()
    return validation.report


def _run_cli(args) -> int:
    try:
        report = validate_dataset(
            args.path,
            args.format,
            annotations=args.annotations,
            image_root=args.image_root,
            image_pattern=args.image_pattern,
            max_pixels=args.max_pixels,
            check_images=not args.no_images,
            progress=not args.no_progress,
        )
    except ValueError as error:
        print(f"dualtoken data validate: error: {error}", file=sys.stderr)
        return 2
    print(report.render(max_problems=args.max_problems_shown))
    return 0 if report.ok else 1


def register(data_subparsers) -> None:
    """Add `dualtoken data validate`."""
    parser = data_subparsers.add_parser(
        "validate",
        help="check a dataset (shapes world, LLaVA, COCO captions, VQAv2, prompts, image folder)",
        description="Report every problem of a dataset with its file, record and what was expected; "
        "exit 1 when there is any, 0 when there is none (2: bad arguments).",
    )
    parser.add_argument("path", type=Path, help="dataset directory or file")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="format of PATH (default: auto)")
    parser.add_argument(
        "--annotations",
        type=Path,
        metavar="FILE",
        help="VQAv2 annotations JSON to pair with the questions PATH",
    )
    parser.add_argument(
        "--image-root",
        type=Path,
        metavar="DIR",
        help="where relative image paths resolve (default: PATH's dir)",
    )
    parser.add_argument(
        "--image-pattern",
        metavar="PATTERN",
        help="VQAv2 image path over image_id, e.g. 'val2014/{image_id:012d}.jpg'",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        default=DEFAULT_MAX_PIXELS,
        help=f"decompression-bomb limit (default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--no-images", action="store_true", help="check that images exist, without decoding them"
    )
    parser.add_argument(
        "--max-problems-shown",
        type=int,
        metavar="N",
        default=DEFAULT_PROBLEMS_SHOWN,
        help=f"problems printed before the summary (default {DEFAULT_PROBLEMS_SHOWN})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_cli)
