"""`dualtoken serve`: the browser demo of a saved MLLM (Gradio, the `demo` extra) and the logic behind it.

Three tabs: **chat** (upload images, multi-turn, streamed answers, regenerate / clear, images the model draws
inside a reply shown inline), **text to image** (prompt, count, CFG, temperature, top-k, top-p, seed; gallery,
progress bar, PNG downloads) and **tokenizer** (an image's DualToken reconstruction and its pixel / semantic code
grids as heat maps).

The modules, bottom up:
- `limits`: `ServeLimits` (upload bytes, pixels checked from the header before decoding, images per message,
  message length, turns, images per request, queue size), the request options of the tabs and the checks on them;
  a violation is a `UserInputError` whose text the UI shows.
- `session`: `ChatSession`, one browser session's conversation (per-session `gr.State`, so users never share
  history); it derives both the model's messages + image codes and the chatbot's display from its turns.
- `engine`: `DemoEngine`, the loaded model and processor behind a lock (one generation at a time, whatever the
  server's concurrency), safe image reading (`data_recipes.image_io.load_image`; a hostile file becomes a message,
  never a crash) and the three operations. Generated files live in a temporary work directory.
- `chat_tab`, `t2i_tab`, `tokenizer_tab`: one module per tab, its layout and event handlers.
- `app`: the Gradio Blocks holding the tabs, and `launch`.
- `command`: `dualtoken serve` (registered by `mllm.cli`).
"""
