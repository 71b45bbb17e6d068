"""The web demo's chat tab: upload images, multi-turn, streamed answers, regenerate / clear, images the model
draws inside a reply shown inline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mllm.serve.engine import MODEL_EVENTS, DemoEngine
from mllm.serve.limits import ChatOptions, UserInputError, error_text, megabytes
from mllm.serve.session import ChatSession


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


def chat_tab(engine: DemoEngine) -> None:
    """Lay out the chat tab inside the open Blocks and wire its events."""
    import gradio as gr

    limits = engine.limits
    defaults = engine.defaults

    def chat_options(*values) -> ChatOptions:
        return ChatOptions(*values)

    def run_reply(session: ChatSession, options: ChatOptions, on_error: Callable[[], None]):
        try:
            for text in engine.stream_reply(session, options):
                yield session.chatbot_messages(streaming=text), session, ""
        except UserInputError as error:
            on_error()
            yield session.chatbot_messages(), session, error_text(error)
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
            yield session.chatbot_messages(), gr.skip(), session, error_text(error)
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
            yield session.chatbot_messages(), session, error_text(error)
            return
        yield session.chatbot_messages(streaming=""), session, ""
        yield from run_reply(session, options, restore)

    def on_clear(session):
        engine.forget_session(session)
        return [], ChatSession(), None, ""

    def on_chatbot_cleared(session):  # the chatbot's own trash button
        engine.forget_session(session)
        return ChatSession(), ""

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
        f"Images: up to {megabytes(limits.max_upload_bytes)} and {limits.max_pixels:,} pixels each, "
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
        **MODEL_EVENTS,
    )
    regenerate.click(
        on_regenerate,
        [session_state, *chat_controls],
        [chatbot, session_state, chat_status],
        **MODEL_EVENTS,
    )
    chatbot.retry(
        on_regenerate,
        [session_state, *chat_controls],
        [chatbot, session_state, chat_status],
        **MODEL_EVENTS,
    )
    clear.click(on_clear, [session_state], [chatbot, session_state, message, chat_status], queue=False)
    chatbot.clear(on_chatbot_cleared, [session_state], [session_state, chat_status], queue=False)
