"""`dualtoken serve`: find the model directory, check the demo extra, load the engine and serve the app until
stopped (the temporary work directory is removed on exit)."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

from mllm.serve.app import DEFAULT_HOST, DEFAULT_PORT, build_app, launch
from mllm.serve.engine import DemoEngine
from mllm.serve.limits import ServeLimits

DEFAULT_MODEL_DIR = Path("runs/demo/mllm")
GRADIO_REQUIREMENT = "gradio==6.31.0"
HOW_TO_GET_A_MODEL = (
    "no model to serve: pass --model DIR (a directory written by DualTokenMLLM.save_pretrained(DIR, "
    f"processor=processor)), or train the demo model into {DEFAULT_MODEL_DIR} with `make demo` "
    "(`dualtoken demo --out runs/demo`)"
)


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
