"""`dualtoken ask | chat | generate | serve | mllm ...`: the MLLM's command-line inference and utility subcommands.

All three inference commands load a checkpoint directory written by `DualTokenMLLM.save_pretrained(dir,
processor=...)` (`mllm.checkpoint.load_checkpoint`) and read images with `data_recipes.image_io.load_image`; an
unusable image or checkpoint prints one clear error line and exits with status 2.

- `ask`: one question about one image (or none); prints the answer.
- `chat`: a multi-turn REPL on stdin (so it can be piped). A line is the next user turn; commands:
  ``/image PATH`` attaches an image to the next turn, ``/draw CAPTION`` draws an image (text-to-image with CFG)
  into the conversation, ``/reset``, ``/save FILE`` writes the conversation JSON, ``/help``, ``/quit``. The model
  may also open an image itself (`<boi>`, interleaved mode). Every generated image is saved as a PNG under
  ``--out`` and its path printed. The conversation JSON is ``{"messages": [{"role", "content"}...], "images":
  [{"path", "source": "user"|"model"}...]}`` with images in `<image>` placeholder order.
- `generate`: text-to-image for ``--prompt`` (repeatable) or ``--prompts-file`` (JSONL objects with a "prompt"
  field, other fields are copied to the output rows). Writes ``images/<index>_<j>.png``, ``codes/<index>
  .safetensors`` (pixel and semantic code grids, (n, h, w, D) each), ``generations.jsonl`` (one row per prompt:
  index, prompt, files, codes, seeds) and ``settings.json``. Image j of prompt i always uses seed
  ``--seed + i*n + j``, so the output does not depend on ``--batch-size``.
- `serve`: the browser demo (`mllm.serve`, Gradio).
- `mllm`: utilities, each registered from the module that owns it (see `MLLM_SUBCOMMANDS`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from data_recipes.atomic_io import atomic_save_png
from mllm.serve.command import register as register_serve

# `dualtoken mllm <name>`: (name, module, function taking the `mllm` subparsers). A module that is absent from
# this checkout leaves a stub that explains so; add further utilities (e.g. merge-lora) as one line each.
MLLM_SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    ("text-tokenizer", "mllm.cli_text_tokenizer", "register"),
    ("merge-lora", "train.lora", "register_merge"),
)

CHAT_HELP = """commands:
  /image PATH     attach an image to your next message
  /draw CAPTION   draw an image for CAPTION into the conversation
  /reset          start a new conversation
  /save FILE      write the conversation (messages + image paths) as JSON
  /quit           leave"""


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


# ---------------------------------------------------------------------- shared helpers


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory (model + processor)")
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype"
    )


def _add_text_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="text temperature (0 = greedy)")
    parser.add_argument("--top-k", dest="top_k", type=int, default=0, help="text top-k (0 = off)")
    parser.add_argument("--top-p", dest="top_p", type=float, default=1.0, help="text top-p (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-pixels", dest="max_pixels", type=int, default=None, help="refuse larger input images"
    )


def _load(args: argparse.Namespace):
    from mllm.checkpoint import load_checkpoint

    try:
        return load_checkpoint(args.model, device=args.device, dtype=args.dtype)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise CliError(f"cannot load the checkpoint {args.model}: {error}") from error


def _load_image(path: str, max_pixels: int | None):
    from data_recipes.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

    try:
        return load_image(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    except ImageLoadError as error:
        raise CliError(f"cannot read image: {error}") from error


def _settings(codebook_size: int | None = None, **fields: Any):
    """GenerationSettings (the preset defaults for `codebook_size` when given); bad values become CliError."""
    from mllm.generation import GenerationSettings

    try:
        if codebook_size is None:
            return GenerationSettings(**fields)
        return GenerationSettings.for_codebook(codebook_size, **fields)
    except ValueError as error:
        raise CliError(str(error)) from error


def _run(name: str, function, args: argparse.Namespace) -> int:
    try:
        return function(args)
    except CliError as error:
        print(f"dualtoken {name}: error: {error}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------- ask


def _ask(args: argparse.Namespace) -> int:
    from mllm.generation import generate_chat
    from mllm.sequence import IMAGE_PLACEHOLDER

    image = _load_image(args.image, args.max_pixels) if args.image else None
    model, processor = _load(args)
    question = args.question
    images = []
    if image is not None:
        images = [image]
        if IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
    settings = _settings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    try:
        (reply,) = generate_chat(
            model, processor, [[{"role": "user", "content": question}]], [images], settings
        )
    except ValueError as error:  # e.g. placeholder/image count mismatch, no image tokenizer
        raise CliError(str(error)) from error
    print(reply.text)
    return 0


# ---------------------------------------------------------------------- chat


class ChatSession:
    """The REPL's state: messages, their images (as code pairs, in placeholder order) and where each came from."""

    def __init__(self, model, processor, args: argparse.Namespace, out):
        self.model, self.processor, self.args, self.out = model, processor, args, out
        self.settings = _settings(
            model.config.codebook_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            allow_image_output=not args.no_image_output,
            cfg_scale=args.cfg,
            **_image_overrides(args),
        )
        self.image_dir = Path(args.out)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.images: list[tuple[Any, Any]] = []
        self.records: list[dict] = []
        self.pending: list[tuple[tuple[Any, Any], dict]] = []
        self.turn = 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def handle(self, line: str) -> bool:
        """Process one input line; False means quit."""
        if not line.strip():
            return True
        if not line.startswith("/"):
            self.user_turn(line)
            return True
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            self.reset()
            self.say("(new conversation)")
        elif command == "/help":
            self.say(CHAT_HELP)
        elif command in ("/image", "/save", "/draw") and not argument:
            self.say(f"error: {command} needs an argument (see /help)")
        elif command == "/image":
            self.attach(argument)
        elif command == "/save":
            self.save(Path(argument))
        elif command == "/draw":
            self.draw(argument)
        else:
            self.say(f"error: unknown command {command} (see /help)")
        return True

    def attach(self, path: str) -> None:
        try:
            image = _load_image(path, self.args.max_pixels)
            pixel, semantic = self.processor.encode_images([image])
        except (CliError, ValueError) as error:
            self.say(f"error: {error}")
            return
        self.pending.append(((pixel[0], semantic[0]), {"path": str(path), "source": "user"}))
        self.say(f"(image attached: {path})")

    def user_turn(self, text: str) -> None:
        from mllm.generation import generate_chat
        from mllm.sequence import IMAGE_PLACEHOLDER

        content = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in self.pending) + text
        messages = [*self.messages, {"role": "user", "content": content}]
        images = [*self.images, *(codes for codes, _ in self.pending)]
        settings = self.settings.with_overrides(seed=self.settings.seed + self.turn)
        try:
            (reply,) = generate_chat(self.model, self.processor, [messages], [images], settings)
        except ValueError as error:
            self.say(f"error: {error}")
            return
        self.messages = [*messages, reply.as_message()]
        self.images = [*images, *reply.codes]
        self.records += [record for _, record in self.pending]
        self.pending = []
        paths = self._save_images(reply.images, len(reply.codes))
        pieces, index = [], 0
        for segment in reply.segments:
            if isinstance(segment, str):
                pieces.append(segment)
            else:
                pieces.append(f"[image: {paths[index]}]" if index < len(paths) else "[image]")
                index += 1
        self.say("assistant: " + " ".join(pieces))
        for path in paths:
            self.say(f"saved image: {path}")
        self.turn += 1

    def draw(self, caption: str) -> None:
        from mllm.generation import generate_images
        from mllm.sequence import IMAGE_PLACEHOLDER

        settings = self.settings.with_overrides(seed=self.settings.seed + self.turn, images_per_prompt=1)
        result = generate_images(self.model, self.processor, [caption], settings)
        codes = (result.pixel_codes[0, 0], _semantic_or_zeros(result)[0, 0])
        self.messages += [
            *self.processor.t2i_messages(caption),
            {"role": "assistant", "content": IMAGE_PLACEHOLDER},
        ]
        self.images.append(codes)
        paths = self._save_images(result.images[0] if result.images else [], 1)
        self.say("assistant: " + (f"[image: {paths[0]}]" if paths else "[image]"))
        for path in paths:
            self.say(f"saved image: {path}")
        self.turn += 1

    def _save_images(self, images: list[Any], count: int) -> list[str]:
        """Save the turn's decoded images; record one entry per drawn image (path None without a decoder)."""
        paths = []
        for k in range(count):
            path = None
            if k < len(images):
                target = self.image_dir / f"turn{self.turn:03d}_{k}.png"
                atomic_save_png(images[k], target)
                path = str(target)
                paths.append(path)
            self.records.append({"path": path, "source": "model"})
        return paths

    def save(self, path: Path) -> None:
        payload = {"messages": self.messages, "images": self.records}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            self.say(f"error: cannot write {path}: {error}")
            return
        self.say(f"(saved {path})")


def _semantic_or_zeros(result):
    import torch

    if result.semantic_codes is not None:
        return result.semantic_codes
    return torch.zeros_like(result.pixel_codes)


def _image_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {"image_temperature": args.image_temperature}
    if args.image_top_k is not None:
        overrides["image_top_k"] = args.image_top_k
    if args.image_top_p is not None:
        overrides["image_top_p"] = args.image_top_p
    if getattr(args, "cfg_plausibility", None) is not None:
        overrides["cfg_plausibility"] = args.cfg_plausibility
    return overrides


def _chat(args: argparse.Namespace) -> int:
    model, processor = _load(args)
    session = ChatSession(model, processor, args, sys.stdout)
    interactive = sys.stdin.isatty()
    if interactive:
        session.say("dualtoken chat: type a message, or /help for commands")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not session.handle(line.rstrip("\r\n")):
            break
    return 0


# ---------------------------------------------------------------------- generate


def _read_prompts(args: argparse.Namespace) -> list[dict]:
    if args.prompt:
        return [{"prompt": prompt} for prompt in args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise CliError(f"prompts file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise CliError(f"{path}:{number}: not valid JSON: {error}") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise CliError(f'{path}:{number}: expected a JSON object with a string "prompt" field')
            rows.append(row)
    if not rows:
        raise CliError(f"{path}: no prompts")
    return rows


def _generate(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file
    from tqdm import tqdm

    from mllm.generation import generate_images

    if args.n < 1 or args.batch_size < 1:
        raise CliError("--n and --batch-size must be >= 1")
    prompts = _read_prompts(args)
    model, processor = _load(args)
    if processor.image_tokenizer is None and not args.codes_only:
        raise CliError(
            f"{args.model} has no image tokenizer to decode PNGs; pass --codes-only to write code grids only"
        )
    settings = _settings(
        model.config.codebook_size,
        images_per_prompt=args.n,
        cfg_scale=args.cfg,
        seed=args.seed,
        **_image_overrides(args),
    )
    out = Path(args.out)
    (out / "codes").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in vars(settings).items() if k not in ("stop_strings",)}
    (out / "settings.json").write_text(
        json.dumps({"model": str(args.model), **record}, indent=2) + "\n", encoding="utf-8"
    )
    cells = model.config.num_image_positions
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    bar = tqdm(total=len(batches) * cells, desc="generate", unit="cell", disable=args.no_progress or None)
    with (out / "generations.jsonl").open("w", encoding="utf-8") as log:
        first = 0
        for batch in batches:
            result = generate_images(
                model,
                processor,
                [row["prompt"] for row in batch],
                settings.with_overrides(seed=args.seed + first * args.n),
                progress=lambda done, total: bar.update(1),
                decode=not args.codes_only,
            )
            semantic = _semantic_or_zeros(result)
            for offset, row in enumerate(batch):
                index = first + offset
                codes_name = f"codes/{index:05d}.safetensors"
                save_file(
                    {
                        "pixel": result.pixel_codes[offset].contiguous(),
                        "semantic": semantic[offset].contiguous(),
                    },
                    str(out / codes_name),
                )
                files = []
                for j, image in enumerate(result.images[offset] if result.images else []):
                    name = f"images/{index:05d}_{j}.png"
                    atomic_save_png(image, out / name)
                    files.append(name)
                seeds = [args.seed + index * args.n + j for j in range(args.n)]
                extra = {k: v for k, v in row.items() if k not in ("index", "files", "codes", "seeds")}
                entry = {"index": index, **extra, "files": files, "codes": codes_name, "seeds": seeds}
                log.write(json.dumps(entry) + "\n")
                log.flush()
            first += len(batch)
    bar.close()
    print(f"wrote {len(prompts) * args.n} images for {len(prompts)} prompts to {out}")
    return 0


# ---------------------------------------------------------------------- registration


def _register_optional(subparsers, name: str, module: str, function: str) -> None:
    """Register `dualtoken mllm <name>` from `module`; a module missing from this checkout gives a stub that
    fails with a clear message (other import errors propagate)."""
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        stub = subparsers.add_parser(name, help=f"(unavailable: {module} is missing)")

        def unavailable(args: argparse.Namespace) -> int:
            print(
                f"dualtoken mllm {name}: error: this command is unavailable because the module {module} is "
                "missing from this installation",
                file=sys.stderr,
            )
            return 2

        stub.set_defaults(func=unavailable)
        return
    getattr(loaded, function)(subparsers)


def register(subparsers) -> None:
    """Add `ask`, `chat`, `generate`, `serve` (the web demo, `mllm.serve`) and the `mllm` group to the `dualtoken`
    subcommands."""
    ask = subparsers.add_parser("ask", help="answer one question about an image")
    _add_model_args(ask)
    ask.add_argument("--image", default=None, help="image file (any size; resized to the tokenizer's)")
    ask.add_argument("--question", required=True)
    _add_text_sampling_args(ask, max_new_tokens=128)
    ask.set_defaults(func=lambda args: _run("ask", _ask, args))

    chat = subparsers.add_parser(
        "chat",
        help="multi-turn chat with images on stdin",
        description=CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(chat)
    chat.add_argument("--out", default="chat_images", help="directory for generated images")
    _add_text_sampling_args(chat, max_new_tokens=256)
    chat.add_argument(
        "--no-image-output",
        dest="no_image_output",
        action="store_true",
        help="never let the model open an image by itself (/draw still works)",
    )
    _add_image_sampling_args(chat)
    chat.set_defaults(func=lambda args: _run("chat", _chat, args))

    generate = subparsers.add_parser("generate", help="text-to-image: PNGs + code grids + a JSONL index")
    _add_model_args(generate)
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a caption (repeatable)")
    source.add_argument("--prompts-file", dest="prompts_file", help='JSONL with a "prompt" field per line')
    generate.add_argument("--n", type=int, default=4, help="images per prompt")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", required=True, help="output directory")
    generate.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="prompts per batch")
    generate.add_argument("--codes-only", dest="codes_only", action="store_true", help="skip PNG decoding")
    generate.add_argument("--no-progress", dest="no_progress", action="store_true", help="hide the tqdm bar")
    _add_image_sampling_args(generate, aliases=True)
    generate.set_defaults(func=lambda args: _run("generate", _generate, args))

    register_serve(subparsers)

    mllm = subparsers.add_parser("mllm", help="MLLM utilities")
    mllm_sub = mllm.add_subparsers(dest="mllm_command", metavar="SUBCOMMAND", required=True)
    for name, module, function in MLLM_SUBCOMMANDS:
        _register_optional(mllm_sub, name, module, function)


def _add_image_sampling_args(parser: argparse.ArgumentParser, aliases: bool = False) -> None:
    """Image sampling flags; `generate` names them --cfg/--top-k/--top-p/--temperature (its only modality)."""
    prefix = "" if aliases else "image-"
    parser.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument(
        "--cfg-plausibility",
        type=float,
        default=None,
        help="with CFG, sample only codes whose conditional probability is at least this share of the best one "
        "(default: 0.01 for the tiny codebook, off for a 16,384-code one; 0 = off)",
    )
    parser.add_argument(
        f"--{prefix}top-k",
        dest="image_top_k",
        type=int,
        default=None,
        help="image top-k (default: 900 for a 16,384-code codebook, 64 for the tiny one)",
    )
    parser.add_argument(
        f"--{prefix}top-p", dest="image_top_p", type=float, default=None, help="image top-p (default 0.96)"
    )
    parser.add_argument(
        f"--{prefix}temperature",
        dest="image_temperature",
        type=float,
        default=1.0,
        help="image temperature (0 = greedy)",
    )
