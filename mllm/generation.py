"""Decoding loops of the unified model: chat/understanding (text, optionally interleaved with images) and
text-to-image, both over an HF `DynamicCache` with an explicit prefill / decode split.

- **Prefill** (`mllm.decoding`, with the decode step and the cell sampler) runs the left-padded prompt batch once
  (position ids from the cumulative attention mask) and returns the last hidden state of every row. **Decode** feeds one embedding per row per step: a text token's
  embedding, or an image cell's ``[MLP_pix ; MLP_sem]`` embedding built from the codes just sampled.
  `GenerationSettings.use_cache=False` keeps no KV cache: every decode step runs the model over all inputs so
  far (prompt + generated) and the depth heads rerun their depth prefix at every depth; it gives the same
  results and exists as the baseline of `bench/generate.py`.
- **Randomness** is per row (`mllm.sampling.RowGenerators`): row r of a call with seed s uses stream s + r (in
  text-to-image, row ``i * n + j`` is image j of prompt i), so a row gives the same result alone or in a batch.
- **Text-to-image** puts the unconditional rows (the chat-formatted unconditional caption, " ") in the same
  batch after the conditional ones and mixes the logits inside the depth heads at every depth (`cfg_scale`;
  1.0 drops the unconditional rows entirely).
- **Interleaved chat**: with `allow_image_output`, a row that samples ``<boi>`` switches to image mode for h*w
  cells (no CFG there, since a chat turn has no unconditional twin), gets ``<eoi>`` appended, and continues text.

Defaults follow VILA-U at paper scale (`GenerationSettings.paper()`: cfg 3.0, top-k 900, top-p 0.96).
`GenerationSettings.tiny()` keeps cfg 3.0 and top-p 0.96 but uses top-k 64: the tiny codebook has ~1k codes,
and 64/1024 keeps about the same share of the codebook as 900/16384.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mllm.decoding import _to, check_compatible, decode_step, prefill, sample_cell, stacked_heads
from mllm.depth_head import StackedDepthHeads
from mllm.modeling import DualTokenMLLM
from mllm.processor import DualTokenProcessor
from mllm.sampling import RowGenerators, sample_logits
from mllm.sequence import IMAGE_PLACEHOLDER, pad_sequences

ProgressCallback = Callable[[int, int], None]


@dataclass
class GenerationSettings:
    """Sampling settings per modality. Text `temperature <= 0` is greedy; image `image_temperature <= 0` too."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    cfg_scale: float = 3.0
    # With CFG, sample only codes whose conditional probability is >= this share of the best one (0: off).
    cfg_plausibility: float = 0.0
    image_temperature: float = 1.0
    image_top_k: int = 900
    image_top_p: float = 0.96
    images_per_prompt: int = 1
    allow_image_output: bool = False
    max_images_per_reply: int = 1
    seed: int = 0
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationSettings.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("top_p", "image_top_p"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"GenerationSettings.{name} must lie in (0, 1], got {getattr(self, name)}")
        for name in ("top_k", "image_top_k", "max_images_per_reply"):
            if getattr(self, name) < 0:
                raise ValueError(f"GenerationSettings.{name} must be >= 0, got {getattr(self, name)}")
        if self.images_per_prompt < 1:
            raise ValueError(
                f"GenerationSettings.images_per_prompt must be >= 1, got {self.images_per_prompt}"
            )
        if self.cfg_scale < 0:
            raise ValueError(f"GenerationSettings.cfg_scale must be >= 0, got {self.cfg_scale}")
        if not 0.0 <= self.cfg_plausibility < 1.0:
            raise ValueError(
                f"GenerationSettings.cfg_plausibility must lie in [0, 1), got {self.cfg_plausibility}"
            )
        self.stop_strings = tuple(self.stop_strings)

    @classmethod
    def paper(cls, **overrides: Any) -> GenerationSettings:
        return cls(**{"cfg_scale": 3.0, "image_top_k": 900, "image_top_p": 0.96, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> GenerationSettings:
        return cls(
            **{
                "cfg_scale": 3.0,
                "cfg_plausibility": 0.01,
                "image_top_k": 64,
                "image_top_p": 0.96,
                **overrides,
            }
        )

    @classmethod
    def for_codebook(cls, codebook_size: int, **overrides: Any) -> GenerationSettings:
        """`paper()` for a paper-sized codebook (>= 16,384 codes), `tiny()` for smaller ones."""
        return cls.paper(**overrides) if codebook_size >= 16384 else cls.tiny(**overrides)

    def with_overrides(self, **overrides: Any) -> GenerationSettings:
        return replace(self, **overrides)


@dataclass
class ChatReply:
    """One generated assistant turn. `content` keeps `<image>` where the model drew an image (ready to append to
    the conversation with `as_message()` and `codes` as its images); `text` is the text alone."""

    text: str
    content: str
    token_ids: list[int]
    codes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    segments: list[Any] = field(default_factory=list)

    def as_message(self) -> dict:
        return {"role": "assistant", "content": self.content}


@dataclass
class ImageGenerationResult:
    """Images per prompt ([prompt][n] PIL, None without an image tokenizer) and the sampled code grids
    (P, n, h, w, D); `timings` holds prefill and decode seconds, the part of decode spent in the depth heads
    (`heads_s`; host wall-clock, unsynchronised on CUDA) and the decode step count."""

    images: list[list[Any]] | None
    pixel_codes: torch.Tensor
    semantic_codes: torch.Tensor | None
    timings: dict[str, float]


# ---------------------------------------------------------------------- text-to-image


@torch.no_grad()
def generate_images(
    model: DualTokenMLLM,
    processor: DualTokenProcessor,
    captions: Sequence[str],
    settings: GenerationSettings | None = None,
    progress: ProgressCallback | None = None,
    decode: bool = True,
) -> ImageGenerationResult:
    """Draw `settings.images_per_prompt` images for every caption (see the module docstring for CFG/seeds)."""
    settings = settings or GenerationSettings()
    if not captions:
        raise ValueError("generate_images: no captions given")
    check_compatible(model, processor)
    device = model.device
    n = settings.images_per_prompt
    rows = len(captions) * n
    prompts = [processor.t2i_prompt(caption) for caption in captions for _ in range(n)]
    use_cfg = settings.cfg_scale != 1.0
    if use_cfg:
        prompts += [processor.unconditional_prompt()] * rows
    input_ids, attention_mask = pad_sequences(prompts, model.config.pad_token_id, side="left")
    generator = _row_generators(settings.seed, rows, device) if settings.image_temperature > 0 else None
    cells = model.config.num_image_positions
    with eval_mode(model):
        start = time.perf_counter()
        hidden, state = prefill(
            model, input_ids.to(device), attention_mask.to(device), use_cache=settings.use_cache
        )
        prefill_seconds = time.perf_counter() - start
        pixel_cells, semantic_cells = [], []
        heads = stacked_heads(model)
        start = time.perf_counter()
        heads_seconds = 0.0
        for cell in range(cells):
            heads_start = time.perf_counter()
            pixel, semantic = sample_cell(
                heads, hidden, settings, generator, settings.cfg_scale if use_cfg else None
            )
            heads_seconds += time.perf_counter() - heads_start
            pixel_cells.append(pixel)
            semantic_cells.append(semantic)
            if cell + 1 < cells:
                embeds = model.output_cell_embedding(pixel, semantic, cell)
                hidden = decode_step(model, state, torch.cat([embeds, embeds]) if use_cfg else embeds)
            if progress is not None:
                progress(cell + 1, cells)
        decode_seconds = time.perf_counter() - start
    grid = (len(captions), n, model.config.grid_size, model.config.grid_size, model.config.rq_depth)
    pixel_codes = torch.stack(pixel_cells, dim=1).reshape(grid).cpu()
    semantic_codes = None
    if model.semantic_head is not None:
        semantic_codes = torch.stack(semantic_cells, dim=1).reshape(grid).cpu()
    images = None
    if decode and processor.image_tokenizer is not None:
        flat = decode_codes(processor, pixel_codes.reshape(-1, *grid[2:]))
        images = [flat[i * n : (i + 1) * n] for i in range(len(captions))]
    timings = {
        "prefill_s": prefill_seconds,
        "decode_s": decode_seconds,
        "heads_s": heads_seconds,
        "decode_steps": float(cells),
    }
    return ImageGenerationResult(images, pixel_codes, semantic_codes, timings)


@torch.no_grad()
def decode_codes(processor: DualTokenProcessor, pixel_codes: torch.Tensor) -> list[Any]:
    """(N, h, w, D) pixel codes -> N PIL images through the DualToken pixel decoder."""
    if processor.image_tokenizer is None:
        raise ValueError("decode_codes: the processor has no image tokenizer to decode pixel codes")
    tokenizer = processor.image_tokenizer
    device = next(tokenizer.parameters()).device
    pixels = tokenizer.decode(pixel_codes.to(device))
    return [tensor_to_pil(image) for image in pixels]


def tensor_to_pil(image: torch.Tensor) -> Any:
    """(3, H, W) in [-1, 1] -> RGB PIL image."""
    from PIL import Image

    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), mode="RGB")


# ---------------------------------------------------------------------- chat / understanding

_TEXT, _IMAGE, _CLOSE_IMAGE, _DONE = range(4)


@torch.no_grad()
def generate_chat(
    model: DualTokenMLLM,
    processor: DualTokenProcessor,
    conversations: Sequence[Sequence[dict]],
    images: Sequence[Sequence[Any]] | None = None,
    settings: GenerationSettings | None = None,
    progress: ProgressCallback | None = None,
) -> list[ChatReply]:
    """Generate the next assistant turn for each conversation (batched, left padded).

    `images[i]` are the images of conversation i in placeholder order (PIL or codes). Decoding stops per row at
    the end-of-turn or eos token, a stop string (cut from the reply), or `max_new_tokens` text tokens; an image
    being drawn is always finished first.
    """
    settings = settings or GenerationSettings()
    if not conversations:
        raise ValueError("generate_chat: no conversations given")
    if images is not None and len(images) != len(conversations):
        raise ValueError(f"generate_chat: {len(conversations)} conversations but {len(images)} image lists")
    config = model.config
    check_compatible(model, processor)
    device = model.device
    examples = [
        processor.inference_prompt(conv, images[i] if images is not None else None)
        for i, conv in enumerate(conversations)
    ]
    batch = processor.collate(examples, padding_side="left")
    rows = len(examples)
    needs_random = settings.temperature > 0 or (
        settings.allow_image_output and settings.image_temperature > 0
    )
    generator = _row_generators(settings.seed, rows, device) if needs_random else None
    stop_ids = {i for i in (config.eos_token_id, config.turn_end_token_id) if i is not None}
    banned = _banned_text_ids(config)
    cells = config.num_image_positions
    embed = model.get_input_embeddings()
    budget = settings.max_new_tokens  # decode steps at most: text tokens, plus cells and <eoi> per image
    if settings.allow_image_output:
        budget += (cells + 1) * settings.max_images_per_reply

    mode = [_TEXT] * rows
    generated: list[list[int]] = [[] for _ in range(rows)]
    text_count = [0] * rows
    drawn: list[list[tuple[list[torch.Tensor], list[torch.Tensor | None]]]] = [[] for _ in range(rows)]
    heads: StackedDepthHeads | None = None  # built when the first image starts
    with eval_mode(model):
        hidden, state = prefill(
            model,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            _to(batch.get("pixel_codes"), device),
            _to(batch.get("semantic_codes"), device),
            _to(batch.get("image_is_output"), device),
            use_cache=settings.use_cache,
        )
        step = 0
        while True:
            current = list(mode)
            next_ids = [config.pad_token_id] * rows
            text_rows = [r for r in range(rows) if current[r] == _TEXT]
            image_rows = [r for r in range(rows) if current[r] == _IMAGE]
            for r in range(rows):
                if current[r] == _CLOSE_IMAGE:
                    generated[r].append(config.eoi_token_id)
                    next_ids[r] = config.eoi_token_id
                    mode[r] = _DONE if text_count[r] >= settings.max_new_tokens else _TEXT
            if text_rows:
                tokens = _sample_text(model, hidden[text_rows], settings, banned, generator, text_rows, drawn)
                for r, token in zip(text_rows, tokens):
                    if token in stop_ids:
                        mode[r] = _DONE
                        continue
                    generated[r].append(token)
                    text_count[r] += 1
                    next_ids[r] = token
                    if token == config.boi_token_id:
                        mode[r] = _IMAGE
                        drawn[r].append(([], []))
                    elif _hit_stop_string(
                        processor, generated[r], settings.stop_strings, config.img_token_id
                    ):
                        mode[r] = _DONE
                    elif text_count[r] >= settings.max_new_tokens:
                        mode[r] = _DONE
            embeds = embed(torch.tensor(next_ids, device=device))
            if image_rows:
                row_generator = generator.select(image_rows) if generator is not None else None
                if heads is None:
                    heads = stacked_heads(model)
                pixel, semantic = sample_cell(heads, hidden[image_rows], settings, row_generator, None)
                index = [len(drawn[r][-1][0]) for r in image_rows]
                embeds[image_rows] = model.output_cell_embedding(pixel, semantic, index).to(embeds.dtype)
                for i, r in enumerate(image_rows):
                    pixels, semantics = drawn[r][-1]
                    pixels.append(pixel[i])
                    semantics.append(semantic[i] if semantic is not None else None)
                    generated[r].append(config.img_token_id)
                    if len(pixels) == cells:
                        mode[r] = _CLOSE_IMAGE
            step += 1
            if progress is not None:
                progress(step, budget)
            if all(m == _DONE for m in mode):
                break
            hidden = decode_step(model, state, embeds)
    return [
        _build_reply(model, processor, generated[r], drawn[r], settings.stop_strings) for r in range(rows)
    ]


def generate_text(
    model: DualTokenMLLM,
    processor: DualTokenProcessor,
    prompts: Sequence[str],
    images: Sequence[Sequence[Any]] | None = None,
    settings: GenerationSettings | None = None,
) -> list[str]:
    """Single-turn convenience: one user message per prompt (with its `<image>` placeholders) -> reply text."""
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    return [reply.text for reply in generate_chat(model, processor, conversations, images, settings)]


def _sample_text(
    model: DualTokenMLLM,
    hidden: torch.Tensor,
    settings: GenerationSettings,
    banned: list[int],
    generator: RowGenerators | None,
    rows: list[int],
    drawn: list[list[Any]],
) -> list[int]:
    """Next text token for the given rows: banned ids masked, `<boi>` allowed only for interleaved output while
    the row has images left in its budget."""
    boi = model.config.boi_token_id
    logits = model.text_logits(hidden).float()
    logits[:, banned] = float("-inf")
    for i, r in enumerate(rows):
        if not settings.allow_image_output or len(drawn[r]) >= settings.max_images_per_reply:
            logits[i, boi] = float("-inf")
    return sample_logits(
        logits,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        generator=generator.select(rows) if generator is not None else None,
    ).tolist()


def _build_reply(
    model: DualTokenMLLM,
    processor: DualTokenProcessor,
    ids: list[int],
    drawn: list[tuple[list[torch.Tensor], list[torch.Tensor | None]]],
    stop_strings: tuple[str, ...],
) -> ChatReply:
    config = model.config
    grid = (config.grid_size, config.grid_size, config.rq_depth)
    pieces: list[list[int]] = [[]]
    for token in ids:
        if token == config.boi_token_id:
            pieces.append([])
        elif token not in (config.img_token_id, config.eoi_token_id):
            pieces[-1].append(token)
    texts = [_cut_at_stop(processor.decode(piece), stop_strings) for piece in pieces]
    codes = []
    for pixels, semantics in drawn:
        if len(pixels) != config.num_image_positions:
            continue
        pixel = torch.stack(pixels).reshape(grid).cpu()
        semantic = (
            torch.stack(semantics).reshape(grid).cpu()
            if semantics[0] is not None
            else torch.zeros_like(pixel)
        )
        codes.append((pixel, semantic))
    images = (
        decode_codes(processor, torch.stack([c[0] for c in codes]))
        if codes and processor.image_tokenizer
        else []
    )
    segments: list[Any] = []
    for i, text in enumerate(texts):
        if text:
            segments.append(text)
        if i < len(codes):
            segments.append(images[i] if images else codes[i])
    content = IMAGE_PLACEHOLDER.join(texts[: len(codes) + 1])
    return ChatReply("".join(texts), content, list(ids), codes, images, segments)


def _hit_stop_string(
    processor: DualTokenProcessor, ids: list[int], stops: tuple[str, ...], img_id: int
) -> bool:
    if not stops:
        return False
    text = processor.decode([t for t in ids if t != img_id])
    return any(stop in text for stop in stops)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index >= 0:
            cut = min(cut, index)
    return text[:cut]


def _banned_text_ids(config: Any) -> list[int]:
    """Ids the text sampler must never produce: image cells, the placeholder, `<eoi>` (always forced) and
    padding when it is not also an end token."""
    banned = [config.img_token_id, config.image_token_id, config.eoi_token_id]
    if config.pad_token_id not in (config.eos_token_id, config.turn_end_token_id):
        banned.append(config.pad_token_id)
    return [i for i in banned if i is not None]


def _row_generators(seed: int, rows: int, device: torch.device) -> RowGenerators:
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    return RowGenerators.from_seed(seed, rows, gen_device)


class eval_mode:
    """Context manager: eval mode inside (no dropout), the previous mode restored after."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
