"""`DualTokenProcessor`: the one place where prompts and training examples are formatted.

It pairs the text tokenizer (with the multimodal and chat special tokens added and a ChatML-style Jinja chat
template set on it) with the DualToken image tokenizer, and turns conversations into model inputs:

- messages are ``{"role": "system"|"user"|"assistant", "content": str}`` where the content holds ``<image>``
  placeholders (HF-style part lists ``[{"type": "image"}, {"type": "text", "text": ...}]`` are accepted too);
- images are matched to placeholders in order; an image inside an assistant turn is an *output* image;
- each ``<image>`` becomes ``<boi>`` + ``<img>`` x (h*w) + ``<eoi>`` at the id level;
- training labels keep only assistant answers (their text, the closing turn marker, and the ``<boi>``/``<eoi>``
  of output images); prompt tokens and every ``<img>`` position are -100.

The rendered conversation is tokenized segment by segment (prompt text / answer text alternate), so an inference
prompt (`add_generation_prompt=True`) is always exactly the token prefix that the training example of the same
conversation starts with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_recipes.atomic_io import atomic_directory_write
from mllm.sequence import (
    BOI,
    EOI,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMG,
    SPECIAL_TOKENS,
    TURN_END,
    TURN_START,
    pad_sequences,
)

PROCESSOR_CONFIG_NAME = "processor_config.json"
IMAGE_TOKENIZER_DIRNAME = "image_tokenizer"
ROLES = ("system", "user", "assistant")

# ChatML-style turns joined by a newline; the newline before a turn belongs to the prompt, so an assistant answer
# is exactly "<content><|im_end|>".
CHAT_TEMPLATE = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- set ns = namespace(first=true) -%}"
    "{%- if default_system and (not messages or messages[0]['role'] != 'system') -%}"
    "{{- '" + TURN_START + "system\\n' + default_system + '" + TURN_END + "' -}}"
    "{%- set ns.first = false -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not ns.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set ns.first = false -%}"
    "{{- '" + TURN_START + "' + message['role'] + '\\n' + message['content'] + '" + TURN_END + "' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if not ns.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '" + TURN_START + "assistant\\n' -}}"
    "{%- endif -%}"
)


def ensure_special_tokens(text_tokenizer: Any) -> int:
    """Add the multimodal and chat special tokens (and a pad token) that `text_tokenizer` lacks; returns how many."""
    vocab = text_tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    added = 0
    if missing:
        added += text_tokenizer.add_special_tokens(
            {"extra_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if text_tokenizer.pad_token is None:
        added += text_tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return added


def special_token_ids(text_tokenizer: Any) -> dict[str, int | None]:
    """The special ids `DualTokenMLLMConfig` records, read from a tokenizer prepared by `ensure_special_tokens`."""
    vocab = text_tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing or text_tokenizer.pad_token_id is None:
        raise ValueError(
            f"text tokenizer lacks special tokens {missing or ['pad']}; call ensure_special_tokens"
        )
    return {
        "image_token_id": vocab[IMAGE_PLACEHOLDER],
        "img_token_id": vocab[IMG],
        "boi_token_id": vocab[BOI],
        "eoi_token_id": vocab[EOI],
        "pad_token_id": text_tokenizer.pad_token_id,
        "eos_token_id": text_tokenizer.eos_token_id,
        "turn_end_token_id": vocab[TURN_END],
    }


@dataclass
class MultimodalExample:
    """One tokenized conversation: ids, labels (-100 = no loss) and the codes of its images in order."""

    input_ids: list[int]
    labels: list[int]
    pixel_codes: torch.Tensor | None  # (N, h, w, D) long
    semantic_codes: torch.Tensor | None
    image_is_output: list[bool] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.image_is_output)


@dataclass
class ProcessorSettings:
    """What processor_config.json stores."""

    grid_size: int | None = None
    rq_depth: int | None = None
    t2i_template: str = "{caption}"
    unconditional_caption: str = " "
    default_system: str | None = None
    image_tokenizer_path: str | None = None


class DualTokenProcessor:
    """Text tokenizer + DualToken image tokenizer + chat template (see the module docstring).

    `image_tokenizer` may be None when every image arrives as pre-computed codes (training from a code cache).
    `t2i_template` turns a caption into the user message of a text-to-image request; `unconditional_caption`
    (" " as in VILA-U) fills it for the unconditional CFG branch and for caption dropout.
    """

    image_tokenizer_dirname = IMAGE_TOKENIZER_DIRNAME

    def __init__(
        self,
        text_tokenizer: Any,
        image_tokenizer: Any | None = None,
        *,
        grid_size: int | None = None,
        rq_depth: int | None = None,
        t2i_template: str = "{caption}",
        unconditional_caption: str = " ",
        default_system: str | None = None,
    ):
        if "{caption}" not in t2i_template:
            raise ValueError(
                f"DualTokenProcessor: t2i_template must contain '{{caption}}', got {t2i_template!r}"
            )
        ensure_special_tokens(text_tokenizer)
        text_tokenizer.chat_template = CHAT_TEMPLATE
        self.tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer
        if image_tokenizer is not None:
            grid_size = grid_size or int(image_tokenizer.grid_size)
            rq_depth = rq_depth or int(image_tokenizer.config.rq_depth)
        self.settings = ProcessorSettings(
            grid_size=grid_size,
            rq_depth=rq_depth,
            t2i_template=t2i_template,
            unconditional_caption=unconditional_caption,
            default_system=default_system,
        )
        self.ids = special_token_ids(text_tokenizer)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the text tokenizer, processor_config.json and (when present) the image tokenizer subfolder."""

        def write(tmp: Path) -> None:
            self.tokenizer.save_pretrained(tmp)
            settings = asdict(self.settings)
            if self.image_tokenizer is not None:
                self.image_tokenizer.save_pretrained(tmp / IMAGE_TOKENIZER_DIRNAME)
                settings["image_tokenizer_path"] = IMAGE_TOKENIZER_DIRNAME
            (tmp / PROCESSOR_CONFIG_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")

        atomic_directory_write(save_directory, write)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, load_image_tokenizer: bool = True
    ) -> DualTokenProcessor:
        """Load what `save_pretrained` wrote (the image tokenizer from its recorded path, relative or absolute)."""
        from transformers import AutoTokenizer, PretrainedConfig

        directory = Path(directory)
        config_path = directory / PROCESSOR_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"DualTokenProcessor: no {PROCESSOR_CONFIG_NAME} in {directory}")
        try:
            raw = json.loads(config_path.read_text())
            settings = ProcessorSettings(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(
                f"DualTokenProcessor: {config_path} is not a valid processor config: {err}"
            ) from err
        # The directory's config.json (when the model was saved beside) is not an AutoConfig type; hand the
        # tokenizer loader an empty config so it goes by tokenizer_config.json alone.
        text_tokenizer = AutoTokenizer.from_pretrained(directory, config=PretrainedConfig())
        image_tokenizer = None
        if load_image_tokenizer and settings.image_tokenizer_path:
            path = Path(settings.image_tokenizer_path)
            path = path if path.is_absolute() else directory / path
            from tokenizer.modeling import DualTokenModel

            image_tokenizer = DualTokenModel.from_pretrained(path).eval()
        return cls(
            text_tokenizer,
            image_tokenizer,
            grid_size=settings.grid_size,
            rq_depth=settings.rq_depth,
            t2i_template=settings.t2i_template,
            unconditional_caption=settings.unconditional_caption,
            default_system=settings.default_system,
        )

    # ------------------------------------------------------------------ images

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images and/or pre-computed codes -> (pixel, semantic) code grids, each (N, h, w, D) long on CPU.

        Accepted code forms: an object with `.pixel`/`.semantic` (e.g. the tokenizer's DualCodes), a dict with
        "pixel"/"semantic", or a (pixel, semantic) pair; each grid (h,w,D) or (1,h,w,D).
        """
        grids: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        pil_index: list[int] = []
        for i, image in enumerate(images):
            codes = _as_code_pair(image)
            if codes is None:
                if not _is_pil(image):
                    raise ValueError(
                        f"DualTokenProcessor: image {i} is a {type(image).__name__}; expected a PIL image or codes "
                        "(pixel, semantic)"
                    )
                pil_index.append(i)
            grids.append(codes)
        if pil_index:
            if self.image_tokenizer is None:
                raise ValueError(
                    "DualTokenProcessor: PIL images need an image tokenizer; pass pre-computed codes"
                )
            from tokenizer.image_processing import preprocess

            param = next(self.image_tokenizer.parameters())
            size = int(self.image_tokenizer.config.image_size)  # any input size is resized to the tokenizer's
            pixels = preprocess([images[i] for i in pil_index], image_size=size)
            pixels = pixels.to(device=param.device, dtype=param.dtype)
            encoded = self.image_tokenizer.encode(pixels)
            for row, i in enumerate(pil_index):
                grids[i] = (encoded.pixel[row].cpu(), encoded.semantic[row].cpu())
        pixel = [g[0] for g in grids]
        semantic = [g[1] for g in grids]
        shapes = {tuple(t.shape) for t in (*pixel, *semantic)}
        if len(shapes) != 1:
            raise ValueError(
                f"DualTokenProcessor: all image code grids must share one (h, w, D) shape, got {shapes}"
            )
        (shape,) = shapes
        expected = (self.settings.grid_size, self.settings.grid_size, self.settings.rq_depth)
        if self.settings.grid_size is not None and self.settings.rq_depth is not None and shape != expected:
            raise ValueError(
                f"DualTokenProcessor: image code grids are {shape}, this processor expects {expected}"
            )
        return torch.stack(pixel).long(), torch.stack(semantic).long()

    # ------------------------------------------------------------------ conversations

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """Render messages to text with the chat template (placeholders stay as `<image>`)."""
        return self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            default_system=self.settings.default_system,
        )

    def encode_conversation(
        self,
        messages: Sequence[dict],
        images: Sequence[Any] | None = None,
        add_generation_prompt: bool = False,
    ) -> MultimodalExample:
        """Conversation (+ its images in placeholder order) -> ids, labels and codes (see the module docstring)."""
        messages = [_normalize_message(m, i) for i, m in enumerate(messages)]
        images = list(images or [])
        segments = self._segments(messages, add_generation_prompt)
        ids: list[int] = []
        answer: list[bool] = []
        for text, is_answer in segments:
            if text:
                piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids.extend(piece)
                answer.extend([is_answer] * len(piece))
        placeholder = self.ids["image_token_id"]
        count = ids.count(placeholder)
        if count != len(images):
            raise ValueError(
                f"DualTokenProcessor: the conversation has {count} {IMAGE_PLACEHOLDER} placeholders but "
                f"{len(images)} images were given"
            )
        pixel = semantic = None
        if images:
            pixel, semantic = self.encode_images(images)
        cells = pixel.shape[1] * pixel.shape[2] if pixel is not None else 0
        out_ids: list[int] = []
        labels: list[int] = []
        is_output: list[bool] = []
        for token, is_answer in zip(ids, answer):
            if token != placeholder:
                out_ids.append(token)
                labels.append(token if is_answer else IGNORE_INDEX)
                continue
            is_output.append(is_answer)
            boi, eoi = self.ids["boi_token_id"], self.ids["eoi_token_id"]
            out_ids.extend([boi, *([self.ids["img_token_id"]] * cells), eoi])
            delimiters = (boi, eoi) if is_answer else (IGNORE_INDEX, IGNORE_INDEX)
            labels.extend([delimiters[0], *([IGNORE_INDEX] * cells), delimiters[1]])
        return MultimodalExample(out_ids, labels, pixel, semantic, is_output)

    def _segments(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """Split the rendered conversation into (text, is_answer) pieces; answers are assistant contents."""
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            header = self.apply_chat_template(messages[:i], add_generation_prompt=True)
            full = self.apply_chat_template(messages[: i + 1])
            if not (header.startswith(done) and full.startswith(header)):
                raise ValueError(
                    "DualTokenProcessor: the chat template does not render conversation prefixes"
                )
            segments += [(header[len(done) :], False), (full[len(header) :], True)]
            done = full
        final = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        if not final.startswith(done):
            raise ValueError("DualTokenProcessor: the chat template does not render conversation prefixes")
        segments.append((final[len(done) :], False))
        return segments

    def training_example(
        self, messages: Sequence[dict], images: Sequence[Any] | None = None
    ) -> MultimodalExample:
        """A supervised example: loss on the assistant turns only."""
        return self.encode_conversation(messages, images, add_generation_prompt=False)

    def inference_prompt(
        self, messages: Sequence[dict], images: Sequence[Any] | None = None
    ) -> MultimodalExample:
        """A prompt ending with the assistant turn header, ready for decoding."""
        return self.encode_conversation(messages, images, add_generation_prompt=True)

    # ------------------------------------------------------------------ text-to-image

    def t2i_messages(self, caption: str) -> list[dict]:
        return [{"role": "user", "content": self.settings.t2i_template.format(caption=caption)}]

    def t2i_example(self, caption: str, image: Any, drop_caption: bool = False) -> MultimodalExample:
        """Caption -> assistant image training example; `drop_caption` uses the unconditional caption (CFG)."""
        text = self.settings.unconditional_caption if drop_caption else caption
        messages = [*self.t2i_messages(text), {"role": "assistant", "content": IMAGE_PLACEHOLDER}]
        return self.training_example(messages, [image])

    def t2i_prompt(self, caption: str) -> list[int]:
        """Prompt ids for text-to-image: the chat-formatted caption, the assistant header and `<boi>`."""
        return [*self.inference_prompt(self.t2i_messages(caption)).input_ids, self.ids["boi_token_id"]]

    def unconditional_prompt(self) -> list[int]:
        """The CFG unconditional branch: `t2i_prompt` of the empty caption."""
        return self.t2i_prompt(self.settings.unconditional_caption)

    # ------------------------------------------------------------------ batching and decoding

    def collate(
        self, examples: Sequence[MultimodalExample], padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """Pad examples into model inputs: input_ids, attention_mask, labels, and the batch's image codes in
        reading order (pixel_codes, semantic_codes, image_is_output) when any example has images."""
        input_ids, attention_mask = pad_sequences(
            [e.input_ids for e in examples], self.ids["pad_token_id"], padding_side
        )
        labels, _ = pad_sequences([e.labels for e in examples], IGNORE_INDEX, padding_side)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        with_images = [e for e in examples if e.num_images]
        if with_images:
            batch["pixel_codes"] = torch.cat([e.pixel_codes for e in with_images])
            batch["semantic_codes"] = torch.cat([e.semantic_codes for e in with_images])
            batch["image_is_output"] = torch.tensor([o for e in with_images for o in e.image_is_output])
        return batch

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _normalize_message(message: Any, index: int) -> dict:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"DualTokenProcessor: message {index} must be a dict with 'role' and 'content'")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ValueError(f"DualTokenProcessor: message {index} has role {role!r}; expected one of {ROLES}")
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                parts.append(IMAGE_PLACEHOLDER)
            elif kind == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise ValueError(f"DualTokenProcessor: message {index} has a content part {part!r}")
        content = "".join(parts)
    if not isinstance(content, str):
        raise ValueError(f"DualTokenProcessor: message {index} content must be a string or a list of parts")
    reserved = [t for t in (BOI, EOI, IMG, TURN_START, TURN_END) if t in content]
    if reserved:
        raise ValueError(
            f"DualTokenProcessor: message {index} contains reserved tokens {reserved}; write {IMAGE_PLACEHOLDER} "
            "for an image"
        )
    return {"role": role, "content": content}


def _is_pil(image: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(image, Image.Image)


def _as_code_pair(image: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    if hasattr(image, "pixel") and hasattr(image, "semantic"):
        pair = (image.pixel, image.semantic)
    elif isinstance(image, dict) and "pixel" in image and "semantic" in image:
        pair = (image["pixel"], image["semantic"])
    elif isinstance(image, (tuple, list)) and len(image) == 2:
        pair = (image[0], image[1])
    else:
        return None
    out = []
    for codes in pair:
        codes = torch.as_tensor(codes)
        if codes.dim() == 4 and codes.shape[0] == 1:
            codes = codes[0]
        if codes.dim() != 3:
            raise ValueError(f"DualTokenProcessor: image codes must be (h, w, D), got {tuple(codes.shape)}")
        out.append(codes.long().cpu())
    return out[0], out[1]
