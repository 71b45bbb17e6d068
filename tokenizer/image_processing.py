"""PIL images <-> the tokenizer's pixel tensors: (N, 3, S, S) float in [-1, 1].

`preprocess` follows SigLIP's image processor (resize straight to S x S with PIL bicubic, no crop; rescale to
[0, 1]; normalise with mean = std = 0.5). It is written out rather than calling `SiglipImageProcessor` so the
result does not depend on whether torchvision is installed (the fast backend resizes with torchvision and its
numbers differ slightly) and so one function owns colour-mode conversion: every mode becomes RGB, and images with
transparency are composited onto white first. `postprocess` / `to_pil` invert the normalisation (clamped, rounded);
`reconstruction_grid` lays originals and their reconstructions out in row pairs (training samples, eval reports).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

MEAN = 0.5
STD = 0.5


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency (RGBA, LA, palette with a transparent index) is composited onto white."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        return Image.fromarray((array / peak * 255.0).round().clip(0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def preprocess(images: Sequence[Image.Image], image_size: int | None = None) -> torch.Tensor:
    """PIL images -> (N, 3, S, S) float32 in [-1, 1]. `image_size` None keeps the images' own (square, shared)
    size; pass the tokenizer's `config.image_size` to resize (bicubic) to it."""
    images = list(images)
    if not images:
        raise ValueError("preprocess: got no images")
    rgb = [to_rgb(image) for image in images]
    if image_size is None:
        sizes = {image.size for image in rgb}
        (size, *rest) = sorted(sizes)
        if rest or size[0] != size[1]:
            raise ValueError(
                f"preprocess: image_size=None needs square images of one size, got sizes {sorted(sizes)}; "
                "pass image_size (the tokenizer's config.image_size)"
            )
        image_size = size[0]
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"preprocess: image_size must be a positive integer, got {image_size!r}")
    arrays = []
    for image in rgb:
        if image.size[0] < 1 or image.size[1] < 1:
            raise ValueError(f"preprocess: zero-size image {image.size}")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (batch / 255.0 - MEAN) / STD


def postprocess(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (same layout), clamped and rounded."""
    return ((pixels.detach().float().clamp(-1, 1) * STD + MEAN) * 255.0).round().to(torch.uint8).cpu()


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) or (3, H, W) in [-1, 1] -> list of RGB PIL images."""
    array = postprocess(pixels if pixels.ndim == 4 else pixels[None])
    return [Image.fromarray(a.permute(1, 2, 0).contiguous().numpy()) for a in array]


def reconstruction_grid(
    originals: torch.Tensor, reconstructions: torch.Tensor, columns: int = 8, pad: int = 2
) -> Image.Image:
    """Pairs of rows (originals, then their reconstructions) of at most `columns` images, on white."""
    if originals.shape != reconstructions.shape or originals.ndim != 4:
        raise ValueError(
            f"reconstruction_grid: expected two (N, 3, H, W) batches of one shape, got {tuple(originals.shape)} "
            f"and {tuple(reconstructions.shape)}"
        )
    first, second = postprocess(originals), postprocess(reconstructions)
    n, _, height, width = first.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    canvas = Image.new("RGB", (columns * (width + pad) + pad, rows * 2 * (height + pad) + pad), "white")
    for index in range(n):
        row, column = divmod(index, columns)
        x = pad + column * (width + pad)
        for offset, batch in enumerate((first, second)):
            y = pad + (2 * row + offset) * (height + pad)
            canvas.paste(Image.fromarray(batch[index].permute(1, 2, 0).numpy()), (x, y))
    return canvas
