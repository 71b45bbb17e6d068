"""The web demo's text-to-image tab: prompt, count, CFG, temperature, top-k, top-p, seed; gallery, progress bar,
PNG downloads."""

from __future__ import annotations

from mllm.serve.engine import MODEL_EVENTS, DemoEngine
from mllm.serve.limits import ImageOptions, UserInputError, error_text


def t2i_tab(engine: DemoEngine) -> None:
    """Lay out the text-to-image tab inside the open Blocks and wire its events."""
    import gradio as gr

    limits = engine.limits
    defaults = engine.defaults

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
            return gr.skip(), gr.skip(), error_text(error)
        gallery = [(image.path, f"seed {image.seed}") for image in images]
        seeds = f"seed {images[0].seed}" if len(images) == 1 else f"seeds {images[0].seed}-{images[-1].seed}"
        return gallery, [image.path for image in images], f"{len(images)} image(s), {seeds}"

    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="t2i-prompt")
            count = gr.Slider(1, limits.max_images_per_request, value=4, step=1, label="number of images")
            cfg = gr.Slider(0.0, 10.0, value=defaults.cfg_scale, step=0.5, label="CFG scale (1 = off)")
            image_temperature = gr.Slider(
                0.0,
                2.0,
                value=defaults.image_temperature,
                step=0.05,
                label="temperature (0 = greedy)",
            )
            image_top_k = gr.Number(defaults.image_top_k, precision=0, minimum=0, label="top-k (0 = off)")
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
    draw.click(on_generate, draw_inputs, [gallery, downloads, t2i_status], **MODEL_EVENTS)
    prompt.submit(on_generate, draw_inputs, [gallery, downloads, t2i_status], **MODEL_EVENTS)
