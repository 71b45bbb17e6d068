"""Decoding loops: batched vs one-by-one equality (left padding, per-row seeds), cached generation vs the
teacher-forced forward, CFG, interleaved image output, stop conditions, and the samplers."""

from __future__ import annotations

import pytest
import torch
from mllm_testing import build_micro, random_codes, tiny_image_tokenizer, train_text_tokenizer
from torch import nn

from mllm.decoding import decode_step, prefill
from mllm.generation import GenerationSettings, generate_chat, generate_images
from mllm.sampling import RowGenerators, cfg_mix, filter_logits, sample_logits


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    return train_text_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def micro(text_tokenizer):
    return build_micro(text_tokenizer, seed=11)


def _conversations(model):
    convs = [
        [{"role": "user", "content": "<image>\nwhat color is the square"}],
        [{"role": "user", "content": "how many shapes are there"}],
        [
            {"role": "user", "content": "describe the image please"},
            {"role": "assistant", "content": "a red circle on the left"},
            {"role": "user", "content": "<image> and this one <image>"},
        ],
    ]
    images = [[random_codes(model, 1)], [], [random_codes(model, 2), random_codes(model, 3)]]
    return convs, images


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_understanding_equals_one_by_one(micro, temperature):
    model, processor = micro
    convs, images = _conversations(model)
    settings = GenerationSettings(max_new_tokens=8, temperature=temperature, top_k=50, top_p=0.95, seed=5)
    batched = generate_chat(model, processor, convs, images, settings)
    for i, (conv, imgs) in enumerate(zip(convs, images)):
        alone = generate_chat(model, processor, [conv], [imgs], settings.with_overrides(seed=5 + i))
        assert alone[0].token_ids == batched[i].token_ids, f"row {i}"
        assert alone[0].text == batched[i].text
    assert all(len(reply.token_ids) == 8 for reply in batched)  # untrained model: no early stop token


def test_batched_text_to_image_equals_one_by_one_under_a_seed(micro):
    model, processor = micro
    captions = ["a red circle on the left", "draw a purple square", "two"]
    settings = GenerationSettings.tiny(cfg_scale=3.0, images_per_prompt=2, image_top_k=20, seed=9)
    seen = []
    batched = generate_images(model, processor, captions, settings, progress=lambda k, n: seen.append((k, n)))
    cells = model.config.num_image_positions
    assert seen == [(k, cells) for k in range(1, cells + 1)]
    assert batched.pixel_codes.shape == (3, 2, 3, 3, 4) and batched.semantic_codes.shape == (3, 2, 3, 3, 4)
    for i, caption in enumerate(captions):
        alone = generate_images(model, processor, [caption], settings.with_overrides(seed=9 + 2 * i))
        assert torch.equal(alone.pixel_codes[0], batched.pixel_codes[i])
        assert torch.equal(alone.semantic_codes[0], batched.semantic_codes[i])
    assert not torch.equal(batched.pixel_codes[0, 0], batched.pixel_codes[0, 1])  # n images differ


def _with_output_positions(text_tokenizer, seed):
    """A micro model with output-cell position embeddings, set to random values large enough to change every
    drawn cell's state (a cached decode that added the wrong cell's position would then disagree)."""
    model, processor = build_micro(text_tokenizer, seed=seed, output_position_embedding=True)
    with torch.no_grad():
        model.output_cell_position.copy_(torch.randn_like(model.output_cell_position))
    return model, processor


@pytest.fixture(scope="module")
def micro_positioned(text_tokenizer):
    return _with_output_positions(text_tokenizer, seed=11)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("positioned", [False, True])
def test_greedy_text_to_image_matches_teacher_forced_heads(micro, micro_positioned, cfg_scale, positioned):
    model, processor = micro_positioned if positioned else micro
    caption = "a yellow star in the middle"
    settings = GenerationSettings(cfg_scale=cfg_scale, image_temperature=0.0)
    result = generate_images(model, processor, [caption], settings)
    pixel, semantic = result.pixel_codes[0, 0], result.semantic_codes[0, 0]

    def head_logits(text):
        batch = processor.collate([processor.t2i_example(text, (pixel, semantic))])
        with torch.no_grad():
            out = model(**batch)
        return out.pixel_logits, out.semantic_logits

    cond = head_logits(caption)
    if cfg_scale != 1.0:
        uncond = head_logits(processor.settings.unconditional_caption)
        cond = tuple(cfg_mix(torch.cat([c, u]), cfg_scale) for c, u in zip(cond, uncond))
    depth = model.config.rq_depth
    assert torch.equal(cond[0].argmax(-1), pixel.reshape(-1, depth))
    assert torch.equal(cond[1].argmax(-1), semantic.reshape(-1, depth))


def test_cfg_changes_the_images(micro):
    model, processor = micro
    plain = generate_images(
        model, processor, ["draw a purple square"], GenerationSettings(cfg_scale=1.0, seed=1)
    )
    guided = generate_images(
        model, processor, ["draw a purple square"], GenerationSettings(cfg_scale=5.0, seed=1)
    )
    assert not torch.equal(plain.pixel_codes, guided.pixel_codes)


@pytest.mark.parametrize("positioned", [False, True])
def test_interleaved_chat_draws_an_image_when_the_model_opens_one(text_tokenizer, positioned):
    if positioned:
        model, processor = _with_output_positions(text_tokenizer, seed=12)
    else:
        model, processor = build_micro(text_tokenizer, seed=12)
    config = model.config
    llm = model.language_model
    head = nn.Linear(config.hidden_size, llm.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(llm.lm_head.weight)
        head.bias.zero_()
        head.bias[config.boi_token_id] = 1e4  # the model always wants to open an image
    llm.lm_head = head
    conv = [{"role": "user", "content": "draw a purple square"}]
    settings = GenerationSettings(max_new_tokens=4, allow_image_output=True, image_temperature=0.0)
    (reply,) = generate_chat(model, processor, [conv], settings=settings)
    cells = config.num_image_positions
    ids = reply.token_ids
    assert ids[0] == config.boi_token_id
    assert ids[1 : 1 + cells] == [config.img_token_id] * cells and ids[1 + cells] == config.eoi_token_id
    assert config.boi_token_id not in ids[2 + cells :]  # one image per reply by default
    assert len(reply.codes) == 1 and reply.content.count("<image>") == 1
    assert len(ids) == 2 + cells + 3  # four text tokens in all: <boi> and three after the image
    (recomputed,) = generate_chat(model, processor, [conv], settings=settings.with_overrides(use_cache=False))
    assert recomputed.token_ids == ids and all(
        torch.equal(a, b) for a, b in zip(recomputed.codes[0], reply.codes[0])
    )

    # The cached interleaved decode agrees with a teacher-forced pass over the same sequence.
    prompt = processor.inference_prompt(conv).input_ids
    full_ids = torch.tensor([prompt + ids])
    pixel, semantic = reply.codes[0]
    with torch.no_grad():
        out = model(
            input_ids=full_ids,
            labels=torch.full_like(full_ids, -100),
            pixel_codes=pixel[None],
            semantic_codes=semantic[None],
            image_is_output=torch.tensor([True]),
            logits_to_keep=0,
        )
    assert torch.equal(out.pixel_logits.argmax(-1), pixel.reshape(cells, -1))
    assert torch.equal(out.semantic_logits.argmax(-1), semantic.reshape(cells, -1))
    after_image = len(prompt) + 1 + cells  # position of <eoi>; it predicts the next text token
    logits = out.logits[0, after_image].clone()
    for banned in (config.img_token_id, config.image_token_id, config.eoi_token_id, config.boi_token_id):
        logits[banned] = float("-inf")
    assert logits.argmax().item() == ids[2 + cells]


def test_decoding_without_the_kv_cache_gives_the_same_results(micro):
    model, processor = micro
    convs, images = _conversations(model)
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, top_k=50, seed=4)
    cached = generate_chat(model, processor, convs, images, settings)
    recomputed = generate_chat(model, processor, convs, images, settings.with_overrides(use_cache=False))
    assert [r.token_ids for r in cached] == [r.token_ids for r in recomputed]
    # No top-p here: float noise between the two modes may move a token across a nucleus cut-off.
    t2i = GenerationSettings.tiny(images_per_prompt=2, image_top_k=20, image_top_p=1.0, seed=2)
    cached = generate_images(model, processor, ["a red circle", "two"], t2i)
    recomputed = generate_images(
        model, processor, ["a red circle", "two"], t2i.with_overrides(use_cache=False)
    )
    assert torch.equal(cached.pixel_codes, recomputed.pixel_codes)
    assert torch.equal(cached.semantic_codes, recomputed.semantic_codes)

    # Without a cache every step runs over the whole sequence so far, and matches the cached step.
    batch = processor.collate([processor.inference_prompt(convs[1])], padding_side="left")
    length = batch["input_ids"].shape[1]
    embeds = torch.randn(3, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, state = prefill(model, batch["input_ids"], batch["attention_mask"], use_cache=False)
        _, cached_state = prefill(model, batch["input_ids"], batch["attention_mask"])
        assert state.cache is None and cached_state.cache is not None
        for step in range(3):
            recomputed_hidden = decode_step(model, state, embeds[step])
            assert state.inputs_embeds.shape[1] == length + step + 1
            assert torch.allclose(
                recomputed_hidden, decode_step(model, cached_state, embeds[step]), atol=1e-5
            )
    assert state.position_ids[0, -1].item() == length + 2


def test_stop_strings_and_token_budget(micro):
    model, processor = micro
    conv = [[{"role": "user", "content": "how many shapes are there"}]]
    (full,) = generate_chat(model, processor, conv, settings=GenerationSettings(max_new_tokens=10))
    assert len(full.token_ids) == 10
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert stop.strip()
    (stopped,) = generate_chat(
        model, processor, conv, settings=GenerationSettings(max_new_tokens=10, stop_strings=(stop,))
    )
    assert stopped.text == full.text[: full.text.find(stop)]
    assert len(stopped.token_ids) < 10
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]


def test_text_sampler_filters_and_rows_are_independent():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    top = logits.topk(5, dim=-1).indices
    draws = torch.stack(
        [sample_logits(logits, top_k=5, generator=RowGenerators.from_seed(s, 6)) for s in range(40)]
    )
    assert all(set(draws[:, r].tolist()) <= set(top[r].tolist()) for r in range(6))
    assert len(set(draws[:, 0].tolist())) > 1
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))

    # Top-p keeps the smallest prefix whose mass reaches p (always at least the best token).
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), 1.0, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(probs.log(), 1.0, 0, 0.1)).sum() == 1

    # A row draws the same token alone or inside a batch, given the same stream.
    gens = RowGenerators.from_seed(3, 6)
    batch = sample_logits(logits, generator=gens)
    single = sample_logits(logits[4:5], generator=RowGenerators.from_seed(7, 1))
    assert single.item() == batch[4].item()


def test_cfg_mix_formula():
    cond, uncond = torch.randn(2, 7), torch.randn(2, 7)
    mixed = cfg_mix(torch.cat([cond, uncond]), 3.0)
    assert torch.allclose(mixed, uncond + 3.0 * (cond - uncond))
    assert torch.equal(cfg_mix(torch.cat([cond, uncond]), 1.0), cond)
    with pytest.raises(ValueError, match="halves"):
        cfg_mix(torch.randn(3, 7), 2.0)


def test_mismatched_processor_is_rejected(micro, text_tokenizer):
    model, _ = micro
    from mllm.processor import DualTokenProcessor

    other_grid = DualTokenProcessor(text_tokenizer, grid_size=5, rq_depth=model.config.rq_depth)
    with pytest.raises(ValueError, match="grid_size"):
        generate_images(model, other_grid, ["a red circle"])


def test_generation_settings_validation():
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0.0)
    with pytest.raises(ValueError, match="images_per_prompt"):
        GenerationSettings(images_per_prompt=0)
    paper = GenerationSettings.paper()
    assert (paper.cfg_scale, paper.image_top_k, paper.image_top_p) == (3.0, 900, 0.96)


def test_text_to_image_decodes_through_the_image_tokenizer(text_tokenizer):
    image_tokenizer = tiny_image_tokenizer()
    if image_tokenizer is None:
        pytest.skip("tokenizer.presets is not available")
    from mllm.modeling import DualTokenMLLM
    from mllm.presets import build

    torch.manual_seed(0)
    model, processor = build(
        "tiny", text_tokenizer, image_tokenizer, depth_head_width=64, depth_head_heads=2, depth_head_layers=1
    )
    model.eval()
    assert isinstance(model, DualTokenMLLM)
    assert torch.equal(model.pixel_code_embedding, image_tokenizer.codebook("pixel").float())
    result = generate_images(model, processor, ["a red circle"], GenerationSettings.tiny(cfg_scale=2.0))
    (image,) = result.images[0]
    size = model.config.image_size
    assert image.size == (size, size) and image.mode == "RGB"

    # Understanding from a PIL image runs the tokenizer; its codes equal encoding the image directly.
    example = processor.inference_prompt([{"role": "user", "content": "<image>\nwhat color"}], [image])
    from tokenizer.image_processing import preprocess

    with torch.no_grad():
        codes = image_tokenizer.encode(preprocess([image]))
    assert torch.equal(example.pixel_codes, codes.pixel.cpu()) and torch.equal(
        example.semantic_codes, codes.semantic.cpu()
    )
    (reply,) = generate_chat(
        model,
        processor,
        [[{"role": "user", "content": "<image>\nwhat color"}]],
        [[image]],
        GenerationSettings(max_new_tokens=3),
    )
    assert len(reply.token_ids) <= 3


def test_top_k_fast_path_samples_exactly_the_filtered_distribution():
    from mllm.sampling import filter_logits, sample_logits

    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    for top_k, top_p, temperature in ((5, 1.0, 1.0), (40, 0.8, 0.7), (1, 0.5, 1.0)):
        fast = sample_logits(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=torch.Generator().manual_seed(1),
        )
        masked = filter_logits(logits, temperature, top_k, top_p)  # -inf outside the kept set, already scaled
        slow = sample_logits(masked, temperature=1.0, generator=torch.Generator().manual_seed(1))
        assert torch.equal(fast, slow), (top_k, top_p)
        kept = torch.isfinite(masked).gather(-1, fast[:, None])
        assert bool(kept.all())
