"""The model behind the web demo (`DemoEngine`): the loaded model and processor behind one lock, safe image
reading, and the three operations (a streamed chat reply, text-to-image, an image's tokenization).

Streaming: `generate_chat` has no token callback, so `_TextTap` wraps the processor for one call and passes a stop
string that never occurs; `generate_chat` then decodes the reply so far after every text token (its stop-string
check) and the tap forwards each longer text. If that internal detail changes, the answer still arrives, whole.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_recipes.atomic_io import atomic_save_png
from mllm.sequence import IMAGE_PLACEHOLDER
from mllm.serve.limits import ChatOptions, ImageOptions, ServeLimits, UserInputError, check_text, read_upload
from mllm.serve.session import ChatReplyRecord, ChatSession, ChatTurn

STREAM_SENTINEL = "\x00\x00dualtoken-stream\x00\x00"  # a stop string no decoded text contains (see _TextTap)
THUMBNAIL_SIDE = 512
# Gradio event options of every handler that calls the model: one call at a time, across tabs and sessions.
MODEL_EVENTS = {"concurrency_limit": 1, "concurrency_id": "model"}


class _TextTap:
    """The processor for one `generate_chat` call, reporting the reply text each time it grows.

    `generate_chat` decodes a row's tokens after every text token to look for stop strings; with
    `STREAM_SENTINEL` as the only stop string nothing is cut and every decode passes through here. Decodes that
    do not extend the last reported text (the final per-segment decodes) are not reported.
    """

    def __init__(self, processor: Any, listener: Callable[[str], None]):
        self._processor = processor
        self._listener = listener
        self._reported = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self._processor.decode(ids, skip_special_tokens=skip_special_tokens)
        if len(text) > len(self._reported) and text.startswith(self._reported):
            self._reported = text
            self._listener(text)
        return text


# ---------------------------------------------------------------------- the engine


@dataclass
class GeneratedImage:
    path: str
    seed: int


@dataclass
class TokenizerView:
    """What the tokenizer tab shows for one image."""

    model_input: Any
    reconstruction: Any
    pixel_heatmap: Any
    semantic_heatmap: Any
    summary: str


def code_heatmap(codes: Any, codebook_size: int, panel_side: int = 128) -> Any:
    """(h, w, D) code ids -> one RGB image: a viridis panel per depth (code id / K), labelled, side by side."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    grid = np.asarray(codes.cpu() if hasattr(codes, "cpu") else codes)
    if grid.ndim != 3:
        raise ValueError(f"code_heatmap: expected an (h, w, D) grid, got shape {grid.shape}")
    height, width, depth = grid.shape
    scale = max(1, panel_side // max(height, width))
    label, gap = 14, 6
    canvas = Image.new(
        "RGB", (depth * width * scale + (depth - 1) * gap, label + height * scale), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    colormap = colormaps["viridis"]
    for d in range(depth):
        values = grid[..., d].astype(np.float64) / max(1, codebook_size - 1)
        rgb = (colormap(values)[..., :3] * 255).round().astype(np.uint8)
        panel = Image.fromarray(rgb).resize((width * scale, height * scale), Image.Resampling.NEAREST)
        x = d * (width * scale + gap)
        canvas.paste(panel, (x, label))
        draw.text((x + 2, 1), f"depth {d + 1}", fill=(0, 0, 0))
    return canvas


def _thumbnail(image: Any) -> Any:
    copy = image.copy()
    copy.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return copy


class DemoEngine:
    """The model, processor and limits behind the app; every model call holds one lock."""

    def __init__(self, model: Any, processor: Any, limits: ServeLimits | None = None, workdir=None):
        from mllm.generation import GenerationSettings

        self.model = model
        self.processor = processor
        self.limits = limits or ServeLimits()
        self.defaults = GenerationSettings.for_codebook(model.config.codebook_size)
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dualtoken-serve-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        specials = getattr(processor.tokenizer, "all_special_tokens", [])
        self.reserved = tuple(sorted({*specials, IMAGE_PLACEHOLDER}, key=len, reverse=True))

    @classmethod
    def from_directory(
        cls, directory, device=None, dtype: str = "float32", limits: ServeLimits | None = None, workdir=None
    ) -> DemoEngine:
        from mllm.checkpoint import load_checkpoint

        model, processor = load_checkpoint(directory, device=device, dtype=dtype)
        return cls(model, processor, limits, workdir)

    @property
    def has_image_tokenizer(self) -> bool:
        return self.processor.image_tokenizer is not None

    def session_dir(self, session: ChatSession) -> Path:
        return self.workdir / "sessions" / session.session_id

    def forget_session(self, session: ChatSession | None) -> None:
        """Remove a session's files (its state goes with the browser session)."""
        if session is not None:
            shutil.rmtree(self.session_dir(session), ignore_errors=True)

    # ------------------------------------------------------------------ chat

    def start_turn(self, session: ChatSession, text: str | None, uploads: list[str]) -> ChatTurn:
        """Check and read a user message (text + uploaded image paths), encode its images and add the turn."""
        limits = self.limits
        session.check_room(limits)
        text = check_text(text, limits, reserved=self.reserved)
        if not text and not uploads:
            raise UserInputError("Type a message or attach an image")
        if len(uploads) > limits.max_images_per_message:
            raise UserInputError(
                f"{len(uploads)} images attached; a message may carry at most {limits.max_images_per_message}"
            )
        images = [read_upload(path, limits) for path in uploads]
        if images and not self.has_image_tokenizer:
            raise UserInputError("This checkpoint has no image tokenizer, so it cannot read images")
        codes: list[tuple[Any, Any]] = []
        if images:
            with self._lock:
                pixel, semantic = self.processor.encode_images(images)
            codes = [(pixel[i], semantic[i]) for i in range(len(images))]
        index = len(session.turns)
        paths = [
            str(atomic_save_png(_thumbnail(image), self.session_dir(session) / f"user{index:03d}_{k}.png"))
            for k, image in enumerate(images)
        ]
        turn = ChatTurn(text, paths, codes)
        session.add_user_turn(turn, limits)
        return turn

    def _check_context(self, messages: list[dict], codes: list, settings: Any) -> None:
        limit = getattr(self.model.language_model.config, "max_position_embeddings", None)
        if not limit:
            return
        prompt = len(self.processor.inference_prompt(messages, codes).input_ids)
        budget = settings.max_new_tokens
        if settings.allow_image_output:
            budget += (self.model.config.num_image_positions + 1) * settings.max_images_per_reply
        if prompt + budget > limit:
            raise UserInputError(
                f"The conversation is too long for the model: {prompt} prompt tokens + up to {budget} new ones "
                f"exceed its context of {limit}; press Clear to start a new conversation"
            )

    def stream_reply(self, session: ChatSession, options: ChatOptions) -> Iterator[str]:
        """Answer the session's pending turn, yielding the reply text so far; the finished reply (with its
        images saved as PNGs) is stored in the session. Errors leave the turn pending."""
        from mllm.generation import generate_chat

        turn = session.pending()
        if turn is None:
            raise UserInputError("There is no message waiting for an answer")
        settings = options.settings(self.defaults, self.limits)
        settings = settings.with_overrides(
            seed=settings.seed + session.seed_offset(), stop_strings=(STREAM_SENTINEL,)
        )
        if not self.has_image_tokenizer:
            settings = settings.with_overrides(allow_image_output=False)
        messages, codes = session.conversation()
        self._check_context(messages, codes, settings)
        updates: queue.Queue = queue.Queue()
        done = object()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with self._lock:
                    tap = _TextTap(self.processor, updates.put)
                    (outcome["reply"],) = generate_chat(self.model, tap, [messages], [codes], settings)
            except Exception as error:  # handed to the request thread below
                outcome["error"] = error
            finally:
                updates.put(done)

        worker = threading.Thread(target=work, name=f"chat-{session.session_id[:8]}", daemon=True)
        worker.start()
        finished = False
        while not finished:
            items = [updates.get()]
            while not updates.empty():
                items.append(updates.get_nowait())
            finished = any(item is done for item in items)
            texts = [item for item in items if item is not done]
            if texts and not finished:
                yield texts[-1]
        worker.join()
        if "error" in outcome:
            error = outcome["error"]
            if isinstance(error, ValueError):
                raise UserInputError(f"The model could not answer: {error}") from error
            raise error
        reply = outcome["reply"]
        index = len(session.turns) - 1
        segments: list[tuple[str, str]] = []
        drawn = 0
        for segment in reply.segments:
            if isinstance(segment, str):
                segments.append(("text", segment))
            elif hasattr(segment, "save"):  # a decoded PIL image
                name = f"reply{index:03d}_{turn.attempt}_{drawn}.png"
                segments.append(("image", str(atomic_save_png(segment, self.session_dir(session) / name))))
                drawn += 1
        turn.reply = ChatReplyRecord(reply.content, list(reply.codes), segments)
        yield reply.text

    # ------------------------------------------------------------------ text to image

    def generate(
        self, prompt: str | None, options: ImageOptions, progress: Callable[[int, int], None] | None = None
    ) -> list[GeneratedImage]:
        """Draw `options.n` images for `prompt`; PNGs are written under the work directory."""
        from mllm.generation import generate_images

        prompt = check_text(prompt, self.limits, "prompt", self.reserved)
        if not prompt:
            raise UserInputError("Type a prompt describing the image")
        if not self.has_image_tokenizer:
            raise UserInputError("This checkpoint has no image tokenizer to turn generated codes into images")
        settings = options.settings(self.defaults, self.limits)
        with self._lock:
            result = generate_images(self.model, self.processor, [prompt], settings, progress=progress)
        out = self.workdir / "t2i" / uuid.uuid4().hex
        return [
            GeneratedImage(
                str(atomic_save_png(image, out / f"image{j}_seed{settings.seed + j}.png")), settings.seed + j
            )
            for j, image in enumerate(result.images[0])
        ]

    # ------------------------------------------------------------------ tokenizer

    def tokenize(self, path: str | os.PathLike) -> TokenizerView:
        """Read an uploaded image safely, encode it with the DualToken tokenizer and decode its pixel codes."""
        import torch

        from tokenizer.image_processing import preprocess, to_pil

        if not self.has_image_tokenizer:
            raise UserInputError("This checkpoint has no image tokenizer")
        image = read_upload(path, self.limits)
        tokenizer = self.processor.image_tokenizer
        parameter = next(tokenizer.parameters())
        pixels = preprocess([image], image_size=int(tokenizer.config.image_size))
        with self._lock, torch.no_grad():
            codes = tokenizer.encode(pixels.to(device=parameter.device, dtype=parameter.dtype))
            reconstruction = tokenizer.decode(codes.pixel).float().cpu()
        model_input = to_pil(pixels)[0]
        rebuilt = to_pil(reconstruction)[0]
        error = ((reconstruction.clamp(-1, 1) - pixels) / 2).pow(2).mean().item()  # in [0, 1] units
        psnr = 10 * torch.log10(torch.tensor(1.0 / max(error, 1e-12))).item()
        pixel, semantic = codes.pixel[0].cpu(), codes.semantic[0].cpu()
        size = int(tokenizer.config.codebook_size)
        height, width, depth = pixel.shape

        def distinct(grid) -> str:
            return ", ".join(str(len(torch.unique(grid[..., d]))) for d in range(depth))

        summary = (
            f"{image.width}x{image.height} image, tokenized at {model_input.width}x{model_input.height}: "
            f"{height}x{width} grid, depth {depth}, codebook {size} per branch. "
            f"Distinct codes per depth: pixel {distinct(pixel)}; semantic {distinct(semantic)}. "
            f"Reconstruction PSNR {psnr:.1f} dB."
        )
        return TokenizerView(
            model_input, rebuilt, code_heatmap(pixel, size), code_heatmap(semantic, size), summary
        )
