"""`dualtoken serve`: the browser demo of a saved MLLM (Gradio, the `demo` extra) and the logic behind it.

Three tabs: **chat** (upload images, multi-turn, streamed answers, regenerate / clear, images the model draws
inside a reply shown inline), **text to image** (prompt, count, CFG, temperature, top-k, top-p, seed; gallery,
progress bar, PNG downloads) and **tokenizer** (an image's DualToken reconstruction and its pixel / semantic code
grids as heat maps).

What this module owns, apart from the layout:
- `ServeLimits`: upload bytes, pixels (checked from the header before decoding), images per message, message
  length, turns, images per request and queue size; a violation is a `UserInputError` whose text the UI shows.
- `ChatSession`: one browser session's conversation (per-session `gr.State`, so users never share history); it
  derives both the model's messages + image codes and the chatbot's display from its turns.
- `DemoEngine`: the loaded model and processor behind a lock (one generation at a time, whatever the server's
  concurrency), safe image reading (`data_recipes.image_io.load_image`; a hostile file becomes a message, never
  a crash) and the three operations. Generated files live in a temporary work directory.

Streaming: `generate_chat` has no token callback, so `_TextTap` wraps the processor for one call and passes a stop
string that never occurs; `generate_chat` then decodes the reply so far after every text token (its stop-string
check) and the tap forwards each longer text. If that internal detail changes, the answer still arrives, whole.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_recipes.atomic_io import atomic_save_png

DEFAULT_MODEL_DIR = Path("runs/demo/mllm")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
GRADIO_REQUIREMENT = "gradio==6.31.0"
HOW_TO_GET_A_MODEL = (
    "no model to serve: pass --model DIR (a directory written by DualTokenMLLM.save_pretrained(DIR, "
    f"processor=processor)), or train the demo model into {DEFAULT_MODEL_DIR} with `make demo` "
    "(`dualtoken demo --out runs/demo`)"
)
STREAM_SENTINEL = "\x00\x00dualtoken-stream\x00\x00"  # a stop string no decoded text contains (see _TextTap)
IMAGE_PLACEHOLDER = "<image>"
THUMBNAIL_SIDE = 512


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


def _megabytes(size: int) -> str:
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
            f"{label} is {_megabytes(size)}; uploads are limited to {_megabytes(limits.max_upload_bytes)}"
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


# ---------------------------------------------------------------------- per-session chat state


@dataclass
class ChatReplyRecord:
    """An assistant turn: `content` with `<image>` where images were drawn, their (pixel, semantic) codes, and
    the display segments in order: ("text", str) or ("image", PNG path)."""

    content: str
    codes: list[tuple[Any, Any]]
    segments: list[tuple[str, str]]


@dataclass
class ChatTurn:
    text: str
    image_paths: list[str]
    image_codes: list[tuple[Any, Any]]
    reply: ChatReplyRecord | None = None
    attempt: int = 0  # how often the reply was regenerated (shifts the seed)


@dataclass
class ChatSession:
    """One browser session's conversation. Kept in a `gr.State`, so every session has its own."""

    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    turns: list[ChatTurn] = field(default_factory=list)

    def check_room(self, limits: ServeLimits) -> None:
        """Drop a turn left without reply (a failed or abandoned request); refuse a turn past `max_turns`."""
        self.drop_pending()
        if len(self.turns) >= limits.max_turns:
            raise UserInputError(
                f"This conversation has reached {limits.max_turns} turns; press Clear to start a new one"
            )

    def add_user_turn(self, turn: ChatTurn, limits: ServeLimits) -> None:
        self.check_room(limits)
        self.turns.append(turn)

    def pending(self) -> ChatTurn | None:
        """The last turn when it still waits for its reply."""
        return self.turns[-1] if self.turns and self.turns[-1].reply is None else None

    def drop_pending(self) -> None:
        if self.pending() is not None:
            self.turns.pop()

    def rewind_reply(self) -> Callable[[], None]:
        """Make the last turn pending again (regenerate: the seed shifts by 1000); returns the undo."""
        if not self.turns:
            raise UserInputError("Nothing to regenerate yet")
        turn = self.turns[-1]
        previous = turn.reply
        turn.reply = None
        turn.attempt += 1

        def restore() -> None:
            turn.reply = previous
            turn.attempt -= 1

        return restore

    def conversation(self) -> tuple[list[dict], list[tuple[Any, Any]]]:
        """The model's messages (with `<image>` placeholders) and the image codes in placeholder order."""
        messages: list[dict] = []
        codes: list[tuple[Any, Any]] = []
        for turn in self.turns:
            content = f"{IMAGE_PLACEHOLDER}\n" * len(turn.image_codes) + turn.text
            messages.append({"role": "user", "content": content})
            codes += turn.image_codes
            if turn.reply is not None:
                messages.append({"role": "assistant", "content": turn.reply.content})
                codes += turn.reply.codes
        return messages, codes

    def seed_offset(self) -> int:
        """Seed shift of the pending reply: one per turn, 1000 per regeneration."""
        return len(self.turns) - 1 + 1000 * (self.turns[-1].attempt if self.turns else 0)

    def chatbot_messages(self, streaming: str | None = None) -> list[dict]:
        """The Chatbot value: user images then text; assistant text and drawn images interleaved; a pending
        turn shows `streaming` (the reply so far) when given."""
        shown: list[dict] = []
        for index, turn in enumerate(self.turns):
            user: list[Any] = [{"path": p, "alt_text": "uploaded image"} for p in turn.image_paths]
            if turn.text:
                user.append(turn.text)
            shown.append({"role": "user", "content": user})
            if turn.reply is not None:
                parts = [
                    text if kind == "text" else {"path": text, "alt_text": "image drawn by the model"}
                    for kind, text in turn.reply.segments
                ]
                shown.append({"role": "assistant", "content": parts or ["*(empty reply)*"]})
            elif index == len(self.turns) - 1 and streaming is not None:
                shown.append({"role": "assistant", "content": streaming + " ▌"})
        return shown


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


# ---------------------------------------------------------------------- the Gradio app

ERROR_PREFIX = "⚠️ "


def _error_text(error: Exception) -> str:
    return ERROR_PREFIX + str(error)


def _message_parts(message: Any) -> tuple[str, list[str]]:
    """(text, file paths) of a MultimodalTextbox value."""
    if not message:
        return "", []
    if isinstance(message, str):
        return message, []
    files = []
    for item in message.get("files") or []:
        files.append(item if isinstance(item, str) else item.get("path"))
    return message.get("text") or "", [f for f in files if f]


def _enlarge(image: Any, side: int = 256) -> Any:
    """Nearest-neighbour upscale of a small image for display (tokenizer images are often 64 px)."""
    from PIL import Image

    factor = max(1, side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def build_app(engine: DemoEngine) -> Any:
    """The Gradio Blocks of the demo (queue and limits are applied by `launch`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    limits = engine.limits
    defaults = engine.defaults
    model_events = {"concurrency_limit": 1, "concurrency_id": "model"}

    def chat_options(*values) -> ChatOptions:
        return ChatOptions(*values)

    def run_reply(session: ChatSession, options: ChatOptions, on_error: Callable[[], None]):
        try:
            for text in engine.stream_reply(session, options):
                yield session.chatbot_messages(streaming=text), session, ""
        except UserInputError as error:
            on_error()
            yield session.chatbot_messages(), session, _error_text(error)
            return
        yield session.chatbot_messages(), session, ""

    def on_submit(message, session, *option_values):
        session = session or ChatSession()
        text, files = _message_parts(message)
        try:
            options = chat_options(*option_values)
            options.settings(defaults, limits)  # refuse bad options before the turn is added
            engine.start_turn(session, text, files)
        except UserInputError as error:
            yield session.chatbot_messages(), gr.skip(), session, _error_text(error)
            return
        yield session.chatbot_messages(streaming=""), None, session, ""
        for chatbot, state, status in run_reply(session, options, session.drop_pending):
            yield chatbot, gr.skip(), state, status

    def on_regenerate(session, *option_values):
        session = session or ChatSession()
        try:
            options = chat_options(*option_values)
            options.settings(defaults, limits)
            restore = session.rewind_reply()
        except UserInputError as error:
            yield session.chatbot_messages(), session, _error_text(error)
            return
        yield session.chatbot_messages(streaming=""), session, ""
        yield from run_reply(session, options, restore)

    def on_clear(session):
        engine.forget_session(session)
        return [], ChatSession(), None, ""

    def on_chatbot_cleared(session):  # the chatbot's own trash button
        engine.forget_session(session)
        return ChatSession(), ""

    def on_generate(prompt, n, cfg, temperature, top_k, top_p, seed, progress=gr.Progress()):
        try:
            options = ImageOptions(n, cfg, temperature, top_k, top_p, seed)
            progress((0, engine.model.config.num_image_positions), desc="sampling image tokens", unit="cells")
            images = engine.generate(
                prompt,
                options,
                progress=lambda done, total: progress(
                    (done, total), desc="sampling image tokens", unit="cells"
                ),
            )
        except UserInputError as error:
            return gr.skip(), gr.skip(), _error_text(error)
        gallery = [(image.path, f"seed {image.seed}") for image in images]
        seeds = f"seed {images[0].seed}" if len(images) == 1 else f"seeds {images[0].seed}-{images[-1].seed}"
        return gallery, [image.path for image in images], f"{len(images)} image(s), {seeds}"

    def on_tokenize(upload):
        if not upload:
            return None, None, None, None, _error_text(UserInputError("Upload an image first"))
        path = upload if isinstance(upload, str) else upload.get("path")
        try:
            view = engine.tokenize(path)
        except UserInputError as error:
            return None, None, None, None, _error_text(error)
        return (
            _enlarge(view.model_input),
            _enlarge(view.reconstruction),
            view.pixel_heatmap,
            view.semantic_heatmap,
            view.summary,
        )

    # delete_cache: Gradio's copies of uploads and outputs older than an hour go, checked every 30 minutes
    with gr.Blocks(title="DualToken MLLM", analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        gr.Markdown(
            "## DualToken MLLM\nOne model that reads and draws images with dual (pixel + semantic) visual tokens."
        )
        with gr.Tab("Chat", id="chat"):
            session_state = gr.State(None, delete_callback=engine.forget_session)
            chatbot = gr.Chatbot(
                label="Conversation", elem_id="chatbot", height=420, feedback_options=None, buttons=["copy"]
            )
            chat_status = gr.Markdown("", elem_id="chat-status")
            message = gr.MultimodalTextbox(
                placeholder=f"Ask about an image (attach up to {limits.max_images_per_message}) or just chat",
                file_types=["image"],
                file_count="multiple",
                sources=["upload"],
                elem_id="chat-input",
                show_label=False,
            )
            gr.Markdown(
                f"Images: up to {_megabytes(limits.max_upload_bytes)} and {limits.max_pixels:,} pixels each, "
                f"{limits.max_images_per_message} per message.",
                elem_id="chat-limits",
            )
            with gr.Row():
                regenerate = gr.Button("Regenerate", elem_id="chat-regenerate")
                clear = gr.Button("Clear", elem_id="chat-clear")
            with gr.Accordion("Sampling", open=False):
                max_new = gr.Slider(1, limits.max_new_tokens, value=128, step=1, label="max new tokens")
                chat_temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature (0 = greedy)")
                chat_top_k = gr.Number(0, precision=0, minimum=0, label="top-k (0 = off)")
                chat_top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.01, label="top-p")
                chat_seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="chat-seed")
                allow_images = gr.Checkbox(
                    engine.has_image_tokenizer, label="let the model draw images in its replies"
                )
            chat_controls = [max_new, chat_temperature, chat_top_k, chat_top_p, chat_seed, allow_images]
            message.submit(
                on_submit,
                [message, session_state, *chat_controls],
                [chatbot, message, session_state, chat_status],
                **model_events,
            )
            regenerate.click(
                on_regenerate,
                [session_state, *chat_controls],
                [chatbot, session_state, chat_status],
                **model_events,
            )
            chatbot.retry(
                on_regenerate,
                [session_state, *chat_controls],
                [chatbot, session_state, chat_status],
                **model_events,
            )
            clear.click(
                on_clear, [session_state], [chatbot, session_state, message, chat_status], queue=False
            )
            chatbot.clear(on_chatbot_cleared, [session_state], [session_state, chat_status], queue=False)

        with gr.Tab("Text to image", id="t2i"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="t2i-prompt")
                    count = gr.Slider(
                        1, limits.max_images_per_request, value=4, step=1, label="number of images"
                    )
                    cfg = gr.Slider(
                        0.0, 10.0, value=defaults.cfg_scale, step=0.5, label="CFG scale (1 = off)"
                    )
                    image_temperature = gr.Slider(
                        0.0,
                        2.0,
                        value=defaults.image_temperature,
                        step=0.05,
                        label="temperature (0 = greedy)",
                    )
                    image_top_k = gr.Number(
                        defaults.image_top_k, precision=0, minimum=0, label="top-k (0 = off)"
                    )
                    image_top_p = gr.Slider(0.05, 1.0, value=defaults.image_top_p, step=0.01, label="top-p")
                    image_seed = gr.Number(0, precision=0, minimum=0, label="seed (image j uses seed + j)")
                    draw = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(
                        label="Images",
                        elem_id="t2i-gallery",
                        columns=4,
                        format="png",
                        buttons=["download", "fullscreen"],
                    )
                    t2i_status = gr.Markdown("", elem_id="t2i-status")
                    downloads = gr.File(
                        label="Download PNGs",
                        file_count="multiple",
                        interactive=False,
                        elem_id="t2i-downloads",
                    )
            draw_inputs = [prompt, count, cfg, image_temperature, image_top_k, image_top_p, image_seed]
            draw.click(on_generate, draw_inputs, [gallery, downloads, t2i_status], **model_events)
            prompt.submit(on_generate, draw_inputs, [gallery, downloads, t2i_status], **model_events)

        with gr.Tab("Tokenizer", id="tokenizer"):
            upload = gr.File(label="Image", file_types=["image"], elem_id="tok-upload")
            tokenize = gr.Button("Tokenize", elem_id="tok-run")
            tok_status = gr.Markdown("", elem_id="tok-status")
            picture = {
                "type": "pil",
                "format": "png",
                "interactive": False,
                "buttons": ["download", "fullscreen"],
            }
            with gr.Row():
                seen = gr.Image(label="Model input", **picture)
                rebuilt = gr.Image(
                    label="Reconstruction (pixel codes)", elem_id="tok-reconstruction", **picture
                )
            gr.Markdown("**Code grids**: colour = code id / K, one panel per residual depth.")
            pixel_map = gr.Image(label="pixel codes", **picture)
            semantic_map = gr.Image(label="semantic codes", **picture)
            tok_outputs = [seen, rebuilt, pixel_map, semantic_map, tok_status]
            tokenize.click(on_tokenize, [upload], tok_outputs, **model_events)
            upload.upload(on_tokenize, [upload], tok_outputs, **model_events)
    return app


def launch(
    app: Any, engine: DemoEngine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True
):
    """Queue the app (bounded; one model call at a time) and serve it; `block=False` returns once it listens."""
    import gradio as gr

    app.queue(max_size=engine.limits.queue_size, default_concurrency_limit=1)
    system_fonts = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    return app.launch(
        server_name=host,
        server_port=port,
        max_file_size=engine.limits.max_upload_bytes,
        prevent_thread_lock=not block,
        share=False,
        ssr_mode=False,
        mcp_server=False,
        run_history=False,  # no per-browser run log and no option to send runs to a remote bucket
        show_error=False,
        quiet=True,
        theme=system_fonts,
    )


# ---------------------------------------------------------------------- `dualtoken serve`


def holds_model(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "processor_config.json").is_file()


def resolve_model_dir(model: str | None) -> Path | None:
    """--model as given, else `DEFAULT_MODEL_DIR` when it holds a saved model, else None."""
    if model:
        return Path(model)
    return DEFAULT_MODEL_DIR if holds_model(DEFAULT_MODEL_DIR) else None


def _serve(args: argparse.Namespace) -> int:
    directory = resolve_model_dir(args.model)
    if directory is None:
        print(f"dualtoken serve: {HOW_TO_GET_A_MODEL}", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print(
            f"dualtoken serve: Gradio is not installed; install the demo extra: pip install -e '.[demo]' "
            f"(or pip install '{GRADIO_REQUIREMENT}')",
            file=sys.stderr,
        )
        return 2
    try:
        limits = ServeLimits(
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_pixels=args.max_pixels,
            queue_size=args.queue_size,
        )
        engine = DemoEngine.from_directory(directory, device=args.device, dtype=args.dtype, limits=limits)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"dualtoken serve: cannot load the model {directory}: {error}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"dualtoken serve: warning: listening on {args.host}; the demo has no authentication and anyone "
            "who can reach this address can use the model",
            file=sys.stderr,
        )
    print(f"dualtoken serve: {directory} on http://{args.host}:{args.port} (Ctrl+C stops)", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `finally` removes the work directory
    try:
        launch(build_app(engine), engine, args.host, args.port, block=True)
    finally:
        shutil.rmtree(engine.workdir, ignore_errors=True)
    return 0


def register(subparsers) -> None:
    """Add `dualtoken serve`."""
    serve = subparsers.add_parser(
        "serve", help="browser demo: chat, text-to-image and the tokenizer (Gradio)"
    )
    serve.add_argument(
        "--model", default=None, help=f"checkpoint directory (default: {DEFAULT_MODEL_DIR} when it holds one)"
    )
    serve.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)"
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    serve.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    serve.add_argument(
        "--max-upload-mb", dest="max_upload_mb", type=float, default=ServeLimits.max_upload_bytes / 2**20
    )
    serve.add_argument(
        "--max-pixels", dest="max_pixels", type=int, default=ServeLimits.max_pixels, help="per uploaded image"
    )
    serve.add_argument(
        "--queue-size", dest="queue_size", type=int, default=ServeLimits.queue_size, help="waiting requests"
    )
    serve.set_defaults(func=_serve)
