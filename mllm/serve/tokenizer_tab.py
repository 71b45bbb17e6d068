"""The web demo's tokenizer tab: an image's DualToken reconstruction and its pixel / semantic code grids as heat
maps."""

from __future__ import annotations

from typing import Any

from mllm.serve.engine import MODEL_EVENTS, DemoEngine
from mllm.serve.limits import UserInputError, error_text


def _enlarge(image: Any, side: int = 256) -> Any:
    """Nearest-neighbour upscale of a small image for display (tokenizer images are often 64 px)."""
    from PIL import Image

    factor = max(1, side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def tokenizer_tab(engine: DemoEngine) -> None:
    """Lay out the tokenizer tab inside the open Blocks and wire its events."""
    import gradio as gr

    def on_tokenize(upload):
        if not upload:
            return None, None, None, None, error_text(UserInputError("Upload an image first"))
        path = upload if isinstance(upload, str) else upload.get("path")
        try:
            view = engine.tokenize(path)
        except UserInputError as error:
            return None, None, None, None, error_text(error)
        return (
            _enlarge(view.model_input),
            _enlarge(view.reconstruction),
            view.pixel_heatmap,
            view.semantic_heatmap,
            view.summary,
        )

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
        rebuilt = gr.Image(label="Reconstruction (pixel codes)", elem_id="tok-reconstruction", **picture)
    gr.Markdown("**Code grids**: colour = code id / K, one panel per residual depth.")
    pixel_map = gr.Image(label="pixel codes", **picture)
    semantic_map = gr.Image(label="semantic codes", **picture)
    tok_outputs = [seen, rebuilt, pixel_map, semantic_map, tok_status]
    tokenize.click(on_tokenize, [upload], tok_outputs, **MODEL_EVENTS)
    upload.upload(on_tokenize, [upload], tok_outputs, **MODEL_EVENTS)
