"""The web demo's Gradio app: the Blocks holding one tab per module (`chat_tab`, `t2i_tab`, `tokenizer_tab`) and
`launch` (bounded queue, one model call at a time)."""

from __future__ import annotations

import os
from typing import Any

from mllm.serve.chat_tab import chat_tab
from mllm.serve.engine import DemoEngine
from mllm.serve.t2i_tab import t2i_tab
from mllm.serve.tokenizer_tab import tokenizer_tab

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def build_app(engine: DemoEngine) -> Any:
    """The Gradio Blocks of the demo (queue and limits are applied by `launch`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    # delete_cache: Gradio's copies of uploads and outputs older than an hour go, checked every 30 minutes
    with gr.Blocks(title="DualToken MLLM", analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        gr.Markdown(
            "## DualToken MLLM\nOne model that reads and draws images with dual (pixel + semantic) visual tokens."
        )
        with gr.Tab("Chat", id="chat"):
            chat_tab(engine)
        with gr.Tab("Text to image", id="t2i"):
            t2i_tab(engine)
        with gr.Tab("Tokenizer", id="tokenizer"):
            tokenizer_tab(engine)
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
