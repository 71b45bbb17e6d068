"""Decoding speed of the tiny MLLM preset: text tokens/s and images/s at batch 1 and 8, with the KV cache and
without it (the same model recomputing the whole prefix at every step), measured side by side in one run.

The model is the tiny preset (`mllm.presets.build("tiny")`: 4-layer 256-wide Qwen2, two 3-layer depth heads
128 wide, 8x8 grids of depth 4, K=1024) on the untrained tiny DualToken tokenizer's codebooks and a SentencePiece
text tokenizer trained here on shapes-world captions; weights are random, which does not change the cost of a step.

- text: `generate_chat` on conversations holding one image (64 cells) and a question, greedy, `--text-tokens` new
  tokens per row (an untrained model never stops early; tokens are counted, not assumed);
- images: `generate_images` with CFG 3.0 (so 2B rows), tiny sampling settings, codes only (the pixel decoder
  costs the same in both modes and is left out). The speed-up of the LLM part alone (decode time outside the
  depth heads, from `ImageGenerationResult.timings`) is printed too.

Each configuration runs cached and uncached back to back, `--repeats` times alternating, and keeps the best time
of each. The two modes must produce identical text tokens (greedy) and identical first image cells; later sampled
codes can drift apart by float noise at a top-p cut-off, and the share of identical codes is printed.

    .venv/bin/python bench/generate.py [--threads 2] [--repeats 2] [--text-tokens 32]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mllm import presets  # noqa: E402
from mllm.generation import GenerationSettings, generate_chat, generate_images  # noqa: E402
from mllm.sequence import SPECIAL_TOKENS  # noqa: E402
from tokenizer.text_tokenizer import train_text_tokenizer  # noqa: E402

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "gray", "white")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")
QUESTIONS = (
    "what color is the square?",
    "how many shapes are there?",
    "describe the image.",
    "is there a red circle on the left?",
)


def build(tmp: Path, **overrides):
    """(model, processor) of the tiny preset with random weights; `overrides` are preset fields."""
    from tokenizer.presets import build_tokenizer

    corpus = [f"a {c} {s} {p}" for c, s, p in itertools.product(COLORS, SHAPES, PLACES)] + list(QUESTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vocabulary is capped to what this small corpus supports
        text_tokenizer = train_text_tokenizer(
            corpus * 4, tmp / "text_tokenizer", vocab_size=1024, special_tokens=SPECIAL_TOKENS
        )
    torch.manual_seed(0)
    image_tokenizer = build_tokenizer("tiny").eval()
    model, processor = presets.build("tiny", text_tokenizer, image_tokenizer, **overrides)
    return model.eval(), processor


def random_codes(model, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (cfg.grid_size, cfg.grid_size, cfg.rq_depth)
    return [
        (
            torch.randint(0, cfg.codebook_size, shape, generator=generator),
            torch.randint(0, cfg.codebook_size, shape, generator=generator),
        )
        for _ in range(count)
    ]


def best_of(repeats: int, runs: dict):
    """Run each named callable `repeats` times, alternating; returns {name: (best seconds, last result)}."""
    best = {name: (float("inf"), None) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - start
            best[name] = (min(best[name][0], seconds), result)
    return best


def bench_text(model, processor, batch: int, tokens: int, repeats: int) -> tuple[float, float]:
    conversations = [
        [{"role": "user", "content": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"}] for i in range(batch)
    ]
    images = [[codes] for codes in random_codes(model, batch, seed=batch)]
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0.0)
    runs = {
        mode: (
            lambda s=settings.with_overrides(use_cache=mode == "cache"): generate_chat(
                model, processor, conversations, images, s
            )
        )
        for mode in ("cache", "no cache")
    }
    best = best_of(repeats, runs)
    (cached_time, cached), (plain_time, plain) = best["cache"], best["no cache"]
    if [r.token_ids for r in cached] != [r.token_ids for r in plain]:
        raise RuntimeError("cached and uncached text decoding disagree")
    count = sum(len(r.token_ids) for r in cached)
    return count / cached_time, count / plain_time


def bench_images(model, processor, batch: int, repeats: int) -> tuple[float, float, float, float]:
    """(images/s with the cache, images/s without, speed-up of the LLM part of decoding alone, share of
    identical pixel codes between the two modes)."""
    captions = [f"a {COLORS[i % 8]} {SHAPES[i % 6]} {PLACES[i % 5]}" for i in range(batch)]
    settings = GenerationSettings.tiny(cfg_scale=3.0, seed=1)
    runs = {
        mode: (
            lambda s=settings.with_overrides(use_cache=mode == "cache"): generate_images(
                model, processor, captions, s, decode=False
            )
        )
        for mode in ("cache", "no cache")
    }
    best = best_of(repeats, runs)
    (cached_time, cached), (plain_time, plain) = best["cache"], best["no cache"]
    # Sampled codes agree up to float noise, which a top-p cut-off over the untrained heads' near-flat
    # distributions can amplify (a token falls in or out of the nucleus); the first cell must match exactly.
    if not torch.equal(cached.pixel_codes[..., 0, 0, :], plain.pixel_codes[..., 0, 0, :]):
        raise RuntimeError("cached and uncached image generation disagree on the first cell")
    agreement = (cached.pixel_codes == plain.pixel_codes).float().mean().item()

    def llm_seconds(result) -> float:  # decode time outside the depth heads (LLM steps + cell embeddings)
        return result.timings["decode_s"] - result.timings["heads_s"]

    return batch / cached_time, batch / plain_time, llm_seconds(plain) / llm_seconds(cached), agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode; the best time counts")
    parser.add_argument("--text-tokens", dest="text_tokens", type=int, default=32, help="new tokens per row")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--depth-head-width",
        dest="depth_head_width",
        type=int,
        default=None,
        help="override the preset's depth-head width (128, half the LLM width) to see the heads' share of the cost",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"depth_head_width": args.depth_head_width} if args.depth_head_width else {}
        model, processor = build(Path(tmp), **overrides)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"tiny MLLM preset: {params:.1f}M parameters, {model.config.grid_size}x{model.config.grid_size} grid, "
        f"depth {model.config.rq_depth}, K={model.config.codebook_size}, depth heads "
        f"{model.config.depth_head_layers}x{model.config.head_width} wide; {torch.get_num_threads()} threads"
    )
    print(f"{'workload':<34}{'with cache':>14}{'without':>14}{'speed-up':>10}")
    for batch in args.batches:
        cached, plain = bench_text(model, processor, batch, args.text_tokens, args.repeats)
        label = f"text, batch {batch} (tokens/s)"
        print(f"{label:<34}{cached:>14.1f}{plain:>14.1f}{cached / plain:>9.2f}x", flush=True)
    llm_ratios = []
    for batch in args.batches:
        cached, plain, llm_ratio, agreement = bench_images(model, processor, batch, args.repeats)
        llm_ratios.append(f"batch {batch}: {llm_ratio:.2f}x ({100 * agreement:.1f}% of codes identical)")
        label = f"images, batch {batch}, cfg 3 (images/s)"
        print(f"{label:<34}{cached:>14.3f}{plain:>14.3f}{cached / plain:>9.2f}x", flush=True)
    print(
        "image decoding outside the depth heads (the part the KV cache changes; the heads run 2*D times per "
        f"cell either way): {', '.join(llm_ratios)}"
    )


if __name__ == "__main__":
    main()
