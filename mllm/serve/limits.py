"""What one request to the web demo may carry (`ServeLimits`), the tabs' request options and the checks on them:
every refusal is a `UserInputError` whose message the UI shows as it is (`error_text`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ERROR_PREFIX = "⚠️ "


class UserInputError(ValueError):
    """A request the demo refuses or cannot serve; its message is shown to the user as it is."""


@dataclass(frozen=True)
class ServeLimits:
    """What one request may carry. Defaults suit a single-GPU (or CPU) demo machine."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 16_000_000
    max_images_per_message: int = 4
    max_message_chars: int = 2000
    max_turns: int = 24
    max_new_tokens: int = 512
    max_images_per_request: int = 8
    queue_size: int = 32

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServeLimits.{name} must be a positive integer, got {value!r}")


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def read_upload(path: str | os.PathLike, limits: ServeLimits, name: str | None = None) -> Any:
    """An uploaded file as an RGB PIL image through the project's safe loader, or UserInputError saying why not
    (too large, too many pixels, not an image, corrupt, ...)."""
    from data_recipes.image_io import ImageLoadError, load_image

    path = Path(path)
    label = name or path.name
    try:
        size = path.stat().st_size
    except OSError as error:
        raise UserInputError(f"Cannot read the upload {label}: {error.strerror or error}") from error
    if size > limits.max_upload_bytes:
        raise UserInputError(
            f"{label} is {megabytes(size)}; uploads are limited to {megabytes(limits.max_upload_bytes)}"
        )
    try:
        return load_image(path, max_pixels=limits.max_pixels, name=label)
    except ImageLoadError as error:
        raise UserInputError(f"Cannot use the image {error.source}: {error.reason}") from error


# ---------------------------------------------------------------------- request options


def _number(value: Any, name: str, kind: type, low: float, high: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError) as error:
        raise UserInputError(f"{name} must be a number, got {value!r}") from error
    if kind is int and float(value) != number:
        raise UserInputError(f"{name} must be a whole number, got {value!r}")
    if not low <= number <= high:
        raise UserInputError(f"{name} must lie in [{low}, {high}], got {number}")
    return number


@dataclass
class ChatOptions:
    """The chat tab's sampling controls."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    seed: int = 0
    allow_image_output: bool = True

    def settings(self, defaults: Any, limits: ServeLimits) -> Any:
        """GenerationSettings (image sampling from `defaults`), or UserInputError for out-of-range values."""
        return defaults.with_overrides(
            max_new_tokens=_number(self.max_new_tokens, "max new tokens", int, 1, limits.max_new_tokens),
            temperature=_number(self.temperature, "temperature", float, 0.0, 5.0),
            top_k=_number(self.top_k, "top-k", int, 0, 1_000_000),
            top_p=_number(self.top_p, "top-p", float, 0.01, 1.0),
            seed=_number(self.seed, "seed", int, 0, 2**31 - 1),
            allow_image_output=bool(self.allow_image_output),
            max_images_per_reply=1,
        )


@dataclass
class ImageOptions:
    """The text-to-image tab's controls (image j of a request uses seed + j)."""

    n: int = 4
    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.96
    seed: int = 0

    def settings(self, defaults: Any, limits: ServeLimits) -> Any:
        return defaults.with_overrides(
            images_per_prompt=_number(self.n, "number of images", int, 1, limits.max_images_per_request),
            cfg_scale=_number(self.cfg_scale, "CFG scale", float, 0.0, 20.0),
            image_temperature=_number(self.temperature, "temperature", float, 0.0, 5.0),
            image_top_k=_number(self.top_k, "top-k", int, 0, 1_000_000),
            image_top_p=_number(self.top_p, "top-p", float, 0.01, 1.0),
            seed=_number(self.seed, "seed", int, 0, 2**31 - 1),
        )


def check_text(
    text: str | None, limits: ServeLimits, what: str = "message", reserved: tuple[str, ...] = ()
) -> str:
    """The stripped text, or UserInputError when it is too long or holds a reserved marker (the tokenizer would
    read `<image>`, `<boi>` or a chat-turn marker typed by a user as the special token itself)."""
    text = (text or "").strip()
    if len(text) > limits.max_message_chars:
        raise UserInputError(
            f"The {what} has {len(text)} characters; the limit is {limits.max_message_chars}"
        )
    found = [marker for marker in reserved if marker in text]
    if found:
        raise UserInputError(
            f"The {what} contains the reserved marker {found[0]}; attach images with the paperclip and leave "
            "out special tokens"
        )
    return text


def error_text(error: Exception) -> str:
    return ERROR_PREFIX + str(error)
