"""DualTokenMLLM forward pass: cache consistency, depth-head causality, loss masking, visual loss scope,
understanding-token modes and the pixel-head-only ablation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mllm_testing import build_micro, micro_text_config, random_codes, train_text_tokenizer
from transformers.cache_utils import DynamicCache

from mllm.cell_embedding import grid_regions, grid_sincos
from mllm.decoding import DecodeState, decode_step, stacked_heads
from mllm.depth_head import DepthHead, StackedDepthHeads
from mllm.modeling import DualTokenMLLM
from mllm.processor import DualTokenProcessor
from mllm.sampling import RowGenerators, cfg_mix
from mllm.sequence import positions_from_mask

ASK = [
    {"role": "user", "content": "<image>\nwhat color is the square"},
    {"role": "assistant", "content": "the answer is green"},
]
DRAW = [
    {"role": "user", "content": "<image>\ndraw a purple square"},
    {"role": "assistant", "content": "there are three shapes<image>"},
]


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    return train_text_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def micro(text_tokenizer):
    return build_micro(text_tokenizer)


def _batch(model, processor, padding_side="right"):
    examples = [
        processor.training_example(DRAW, [random_codes(model, 1), random_codes(model, 2)]),
        processor.training_example(ASK, [random_codes(model, 3)]),
    ]
    return processor.collate(examples, padding_side=padding_side)


@torch.no_grad()
def test_cached_decoding_matches_full_forward_on_text_and_image_positions(micro):
    model, processor = micro
    batch = _batch(model, processor, padding_side="left")
    full = model(**batch, logits_to_keep=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = model.embed_inputs(ids, batch["pixel_codes"], batch["semantic_codes"], batch["image_is_output"])
    split = int((mask == 0).sum(1).max()) + 2  # every row has real tokens in the prefix
    assert (ids[:, split:] == model.config.img_token_id).any() and (
        ids[:, :split] == model.config.img_token_id
    ).any()
    position_ids = positions_from_mask(mask[:, :split])
    prefix = model(
        inputs_embeds=embeds[:, :split],
        attention_mask=mask[:, :split],
        position_ids=position_ids,
        past_key_values=DynamicCache(config=model.language_model.config),
        use_cache=True,
    )
    state = DecodeState(prefix.past_key_values, mask[:, :split], position_ids[:, -1] + 1)
    states = [prefix.last_hidden_state[:, -1]]
    for t in range(split, ids.shape[1]):
        states.append(decode_step(model, state, embeds[:, t]))
    cached = torch.stack(states, dim=1)  # hidden states at positions split-1 .. T-1
    real = mask[:, split - 1 :].bool()
    reference = full.last_hidden_state[:, split - 1 :]
    assert torch.allclose(cached[real], reference[real], atol=1e-5)
    cached_logits = model.text_logits(cached)
    assert torch.allclose(cached_logits[real], full.logits[:, split - 1 :][real], atol=1e-4)

    # Depth-head logits of the output image, from cached states vs the full forward with labels.
    labelled = model(**batch)
    cells = (ids == model.config.img_token_id).nonzero().view(-1, model.config.num_image_positions, 2)
    out_cells = cells[batch["image_is_output"]].reshape(-1, 2)
    prev = out_cells[:, 1] - (split - 1) - 1
    targets = batch["pixel_codes"][batch["image_is_output"]].reshape(-1, model.config.rq_depth)
    head = model.pixel_head(cached[out_cells[:, 0], prev], targets, model.pixel_code_embedding)
    assert labelled.pixel_logits.shape == head.shape
    assert torch.allclose(head, labelled.pixel_logits, atol=1e-4)


def _random_head() -> DepthHead:
    head = DepthHead(llm_hidden=16, code_dim=8, codebook_size=32, depth=4, width=16, layers=2, heads=2).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
    return head


def test_depth_head_is_causal_over_depth():
    torch.manual_seed(0)
    head = _random_head()
    table = torch.randn(32, 8)
    hidden = torch.randn(5, 16)
    codes = torch.randint(0, 32, (5, 4))
    base = head(hidden, codes, table)
    for d in range(4):
        changed = codes.clone()
        changed[:, d] = (changed[:, d] + 7) % 32
        logits = head(hidden, changed, table)
        assert torch.allclose(logits[:, : d + 1], base[:, : d + 1], atol=1e-6), f"depth <= {d} saw code {d}"
        if d + 1 < 4:
            assert not torch.allclose(logits[:, d + 1], base[:, d + 1]), f"depth {d + 1} ignores code {d}"


def test_depth_head_sampling_follows_teacher_forced_logits_with_cfg():
    torch.manual_seed(1)
    head = _random_head()
    table = torch.randn(32, 8)
    cond, uncond = torch.randn(3, 16), torch.randn(3, 16)
    codes = head.sample(torch.cat([cond, uncond]), table, cfg_scale=2.5, temperature=0.0)
    with torch.no_grad():
        guided = cfg_mix(torch.cat([head(cond, codes, table), head(uncond, codes, table)]), 2.5)
    assert torch.equal(guided.argmax(-1), codes)


def test_depth_head_sampling_without_the_depth_cache_gives_the_same_codes():
    torch.manual_seed(3)
    head = _random_head()
    table = torch.randn(32, 8)
    hidden = torch.randn(6, 16)
    for kwargs in ({"temperature": 0.0}, {"cfg_scale": 3.0, "temperature": 0.0}):
        cached = head.sample(hidden, table, **kwargs)
        recomputed = head.sample(hidden, table, use_cache=False, **kwargs)
        assert torch.equal(cached, recomputed), kwargs
        assert cached.shape == (3 if "cfg_scale" in kwargs else 6, 4)
    sampled = [
        head.sample(
            hidden, table, temperature=1.0, generator=torch.Generator().manual_seed(5), use_cache=flag
        )
        for flag in (True, False)
    ]
    assert torch.equal(*sampled)


def test_stacked_heads_decode_each_head_as_it_would_alone():
    torch.manual_seed(4)
    pixel, semantic = _random_head(), _random_head()
    pixel_table, semantic_table = torch.randn(32, 8), torch.randn(32, 8)
    cond, uncond = torch.randn(3, 16), torch.randn(3, 16)
    hidden = torch.cat([cond, uncond])
    stack = StackedDepthHeads([pixel, semantic], [pixel_table, semantic_table])
    # Greedy with CFG: every head's codes are the argmax of its own teacher-forced guided logits.
    for use_cache in (True, False):
        greedy = stack.sample(hidden, cfg_scale=2.0, temperature=0.0, use_cache=use_cache)
        for head, table, codes in zip((pixel, semantic), (pixel_table, semantic_table), greedy):
            with torch.no_grad():
                guided = cfg_mix(torch.cat([head(cond, codes, table), head(uncond, codes, table)]), 2.0)
            assert torch.equal(guided.argmax(-1), codes)
    # Sampled: a row draws the pixel depths first, so the pixel head matches the pixel head sampled alone.
    kwargs = {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 20}
    both = stack.sample(hidden, generator=RowGenerators.from_seed(11, 3), **kwargs)
    alone = pixel.sample(hidden, pixel_table, generator=RowGenerators.from_seed(11, 3), **kwargs)
    assert torch.equal(both[0], alone)
    assert not torch.equal(
        both[1], semantic.sample(hidden, semantic_table, generator=RowGenerators.from_seed(11, 3), **kwargs)
    )


def test_stacked_heads_are_reused_until_a_head_weight_changes(text_tokenizer):
    model, _ = build_micro(text_tokenizer)
    hidden = torch.randn(2, model.config.hidden_size)
    first = stacked_heads(model)
    assert stacked_heads(model) is first
    greedy = first.sample(hidden, temperature=0.0)
    with torch.no_grad():  # an in-place update, as an optimizer step makes
        model.semantic_head.blocks[0].mlp[0].weight.mul_(-3.0)
        model.semantic_head.hidden_in.bias.add_(1.0)
    second = stacked_heads(model)
    assert second is not first
    changed = second.sample(hidden, temperature=0.0)
    assert torch.equal(changed[0], greedy[0]) and not torch.equal(changed[1], greedy[1])
    with torch.no_grad():
        expected = model.semantic_head.sample(hidden, model.semantic_code_embedding, temperature=0.0)
    assert torch.equal(changed[1], expected)
    model.double()  # a new dtype (the storage changes under the same Parameter objects)
    third = stacked_heads(model)
    assert third is not second and third.hidden_in.weight.dtype == torch.float64


def test_cfg_scale_one_equals_conditional_only_sampling():
    torch.manual_seed(2)
    head = _random_head()
    table = torch.randn(32, 8)
    cond, uncond = torch.randn(4, 16), 5 * torch.randn(4, 16)
    kwargs = {"temperature": 1.0, "top_k": 20, "top_p": 0.9}
    with_uncond = head.sample(
        torch.cat([cond, uncond]), table, cfg_scale=1.0, generator=RowGenerators.from_seed(7, 4), **kwargs
    )
    alone = head.sample(cond, table, cfg_scale=None, generator=RowGenerators.from_seed(7, 4), **kwargs)
    guided = head.sample(
        torch.cat([cond, uncond]), table, cfg_scale=4.0, generator=RowGenerators.from_seed(7, 4), **kwargs
    )
    assert torch.equal(with_uncond, alone)
    assert not torch.equal(guided, alone)


def test_text_loss_covers_answer_tokens_only(micro):
    model, processor = micro
    batch = _batch(model, processor)
    out = model(**batch, logits_to_keep=0)
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != -100
    manual = F.cross_entropy(out.logits[:, :-1][keep], targets[keep])
    assert torch.allclose(out.loss_text, manual, atol=1e-5)

    # Labels written on <img> positions are ignored (image cells are trained by the heads only).
    noisy = labels.clone()
    noisy[batch["input_ids"] == model.config.img_token_id] = 5
    assert torch.equal(model(**{**batch, "labels": noisy}).loss_text, out.loss_text)

    # Changing one answer label changes the loss.
    answer_positions = (labels != -100).nonzero()
    b, t = answer_positions[0].tolist()
    changed = labels.clone()
    changed[b, t] = (changed[b, t] + 1) % model.config.visual_token_offset
    assert not torch.allclose(model(**{**batch, "labels": changed}).loss_text, out.loss_text)

    # Prompt tokens carry no label, so swapping a prompt word for another leaves the label set unchanged.
    other = [{"role": "user", "content": "<image>\nhow many shapes are there"}, ASK[1]]
    ex_a = processor.training_example(ASK, [random_codes(model, 3)])
    ex_b = processor.training_example(other, [random_codes(model, 3)])
    answer_a = [label for label in ex_a.labels if label != -100]
    answer_b = [label for label in ex_b.labels if label != -100]
    assert answer_a == answer_b and ex_a.input_ids != ex_b.input_ids


def test_visual_loss_covers_output_images_only(micro):
    model, processor = micro
    batch = _batch(model, processor)
    cells = model.config.num_image_positions
    out = model(**batch)
    assert batch["image_is_output"].tolist() == [False, True, False]
    assert out.pixel_logits.shape[0] == cells and out.semantic_logits.shape[0] == cells
    target = batch["pixel_codes"][1].reshape(-1, model.config.rq_depth)
    manual = F.cross_entropy(out.pixel_logits.flatten(0, 1), target.flatten())
    assert torch.allclose(out.loss_pixel, manual, atol=1e-5)

    # No output image: the visual terms are exact zeros.
    understanding_only = {**batch, "image_is_output": torch.zeros(3, dtype=torch.bool)}
    out_none = model(**understanding_only)
    assert out_none.loss_pixel.item() == 0.0 and out_none.loss_semantic.item() == 0.0
    assert torch.allclose(out_none.loss, out_none.loss_text)

    # Marking the first (user) image as output adds its cells to the visual loss.
    both = batch["image_is_output"].clone()
    both[0] = True
    assert model(**{**batch, "image_is_output": both}).pixel_logits.shape[0] == 2 * cells

    # Loss terms are separate and sum to the total with unit weights.
    assert torch.allclose(out.loss, out.loss_text + out.loss_pixel + out.loss_semantic)


def test_forward_and_backward_run_under_bf16_autocast(micro):
    """The Trainer's `--bf16` wraps the forward in autocast: fp32 weights, bf16 matmul outputs. Input and output
    cells must both reach the sequence (a dtype mismatch there used to stop every bf16 run on its first batch)."""
    model, processor = micro
    batch = _batch(model, processor)
    reference = model(**batch)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - reference.loss.item()) < 0.05 * reference.loss.item()
    assert model.pixel_projector.fc1.weight.grad is not None
    assert model.understanding_projector is None or any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.understanding_projector.parameters()
    )
    model.zero_grad()


@pytest.mark.parametrize("mode", ["semantic", "semantic+pixel"])
def test_understanding_token_modes(text_tokenizer, mode):
    model, processor = build_micro(text_tokenizer, understanding_tokens=mode)
    pixel, semantic = random_codes(model, 4)
    other_pixel, _ = random_codes(model, 5)
    conv = [{"role": "user", "content": "<image>\nwhat color is the square"}]
    with torch.no_grad():
        logits = [
            model(
                **processor.collate([processor.inference_prompt(conv, [(p, semantic)])]), logits_to_keep=1
            ).logits
            for p in (pixel, other_pixel)
        ]
    pixel_matters = not torch.allclose(logits[0], logits[1])
    assert pixel_matters == (mode == "semantic+pixel")
    assert (model.understanding_projector is None) == (mode == "semantic+pixel")


def test_pixel_head_only_ablation(text_tokenizer):
    model, processor = build_micro(text_tokenizer, use_semantic_head=False, output_position_embedding=False)
    assert model.semantic_head is None
    batch = _batch(model, processor)
    out = model(**batch)
    assert out.loss_semantic is None and out.semantic_logits is None
    assert torch.allclose(out.loss, out.loss_text + out.loss_pixel)
    embedding = model.output_cell_embedding(batch["pixel_codes"][1].reshape(-1, 4), None)
    half = model.config.hidden_size // 2
    assert torch.count_nonzero(embedding[:, half:]) == 0 and torch.count_nonzero(embedding[:, :half]) > 0


def test_grid_regions_partition_an_8x8_grid_by_cell_centres():
    # 3x3 regions of an 8x8 grid: cell centres 4, 12, 20 px of 64 lie in the first third, 28 and 36 in the second.
    rows = grid_regions(8, 3).view(8, 8)
    assert rows[:, 0].tolist() == [0, 0, 0, 3, 3, 6, 6, 6]
    assert rows[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert grid_regions(4, 4).tolist() == list(range(16))


def test_image_position_regions_start_the_cells_of_one_region_alike(text_tokenizer):
    model, _ = build_micro(text_tokenizer, image_position_embedding=True, image_position_regions=2)
    grid, hidden = model.config.grid_size, model.config.hidden_size
    added = model.image_cell_position.detach() - grid_sincos(grid, hidden)
    index = grid_regions(grid, 2)
    same = index[:, None] == index[None, :]
    close = torch.cdist(added, added) < 1e-5
    assert torch.equal(close, same) and len(set(index.tolist())) == 4
    assert 0.3 < added.pow(2).mean().sqrt() < 0.7
    plain, _ = build_micro(text_tokenizer, image_position_embedding=True, image_position_regions=0)
    assert torch.allclose(plain.image_cell_position, grid_sincos(grid, hidden))
    for bad, match in (
        ({"image_position_regions": grid + 1}, "in \\[0"),
        ({"image_position_regions": -1}, "in \\[0"),
    ):
        with pytest.raises(ValueError, match=match):
            build_micro(text_tokenizer, image_position_embedding=True, **bad)
    with pytest.raises(ValueError, match="needs image_position_embedding"):
        build_micro(text_tokenizer, image_position_embedding=False, image_position_regions=2)


def test_image_cell_positions_shift_input_cells_only_and_survive_save_load(text_tokenizer, tmp_path):
    model, processor = build_micro(
        text_tokenizer, image_position_embedding=True, image_position_regions=0, input_cell_norm=True
    )
    cells = model.config.grid_size**2
    assert model.image_cell_position.shape == (cells, model.config.hidden_size)
    # 2-D sine-cosine start: every cell distinct, cells of one row share the row half, of one column the other.
    start = model.image_cell_position.detach().view(model.config.grid_size, model.config.grid_size, -1)
    half = model.config.hidden_size // 2
    assert torch.cdist(start.flatten(0, 1), start.flatten(0, 1)).add(torch.eye(cells)).min() > 0
    assert torch.equal(start[1, 0, :half], start[1, 2, :half]) and not torch.equal(
        start[1, 0, half:], start[1, 2, half:]
    )
    assert torch.equal(start[0, 1, half:], start[2, 1, half:]) and not torch.equal(
        start[0, 1, :half], start[2, 1, :half]
    )
    with torch.no_grad():
        model.image_cell_position.copy_(torch.randn_like(model.image_cell_position))
    pixel, semantic = random_codes(model, 6)
    codes = (pixel[None], semantic[None])
    output = torch.tensor([True])
    with torch.no_grad():
        understood = model.image_embeddings(*codes, ~output)[0]
        plain = model.understanding_cell_embedding(pixel.reshape(cells, -1), semantic.reshape(cells, -1))
        drawn = model.image_embeddings(*codes, output)[0]
    # Input cells: centred on the image's mean cell, layer-normalised, then the position added.
    centred = model.input_cell_norm(plain - plain.mean(dim=0, keepdim=True))
    assert torch.allclose(understood, centred + model.image_cell_position, atol=1e-5)
    assert torch.allclose(centred.mean(dim=-1), torch.zeros(cells), atol=1e-5)
    # Output cells: not centred; their own position table added, cell by cell in raster order.
    with torch.no_grad():
        model.output_cell_position.copy_(torch.randn_like(model.output_cell_position))
        drawn = model.image_embeddings(*codes, output)[0]
        pixel_part = model.pixel_projector(
            model._code_sum(model.pixel_code_embedding, pixel.reshape(cells, -1))
        )
        semantic_part = model.semantic_projector(
            model._code_sum(model.semantic_code_embedding, semantic.reshape(cells, -1))
        )
    unplaced = torch.cat([pixel_part, semantic_part], dim=-1)
    assert torch.allclose(drawn, unplaced + model.output_cell_position, atol=1e-5)
    assert torch.allclose(
        drawn,
        model.output_cell_embedding(
            pixel.reshape(cells, -1), semantic.reshape(cells, -1), torch.arange(cells)
        ),
    )
    with pytest.raises(ValueError, match="cell_index"):
        model.output_cell_embedding(pixel.reshape(cells, -1), semantic.reshape(cells, -1))
    bare = build_micro(
        text_tokenizer, image_position_embedding=False, image_position_regions=0, input_cell_norm=False
    )[0]
    assert bare.image_cell_position is None and bare.input_cell_norm is None
    with torch.no_grad():
        assert torch.allclose(
            bare.image_embeddings(*codes, ~output)[0],
            bare.understanding_cell_embedding(pixel.reshape(cells, -1), semantic.reshape(cells, -1)),
        )
    model.save_pretrained(tmp_path / "model")
    reloaded = type(model).from_pretrained(tmp_path / "model")
    assert torch.equal(reloaded.image_cell_position, model.image_cell_position)
    assert torch.equal(reloaded.output_cell_position, model.output_cell_position)
    assert torch.equal(reloaded.input_cell_norm.weight, model.input_cell_norm.weight)


def test_bad_inputs_raise_clear_errors(micro):
    model, processor = micro
    batch = _batch(model, processor)
    with pytest.raises(ValueError, match="<img> positions"):
        model(
            **{
                **batch,
                "pixel_codes": batch["pixel_codes"][:2],
                "semantic_codes": batch["semantic_codes"][:2],
            }
        )
    bad = batch["pixel_codes"].clone()
    bad[0, 0, 0, 0] = model.config.codebook_size
    with pytest.raises(ValueError, match="must lie in"):
        model(**{**batch, "pixel_codes": bad})
    with pytest.raises(ValueError, match="set_code_embeddings"):
        model.set_code_embeddings(torch.zeros(3, 3), torch.zeros(3, 3))


@torch.no_grad()
def test_code_priors_start_the_heads_at_the_code_frequencies(text_tokenizer):
    model, processor = build_micro(text_tokenizer)
    depth, k, grid = model.config.rq_depth, model.config.codebook_size, model.config.grid_size
    generator = torch.Generator().manual_seed(0)
    # Skewed codes: depth d uses only the first 2 + d codes, code 0 most of the time.
    probs = torch.zeros(depth, k)
    for d in range(depth):
        probs[d, : 2 + d] = torch.tensor([8.0] + [1.0] * (1 + d))
    probs /= probs.sum(dim=1, keepdim=True)

    def draw_codes(n):
        flat = torch.stack(
            [torch.multinomial(probs[d], n * grid * grid, True, generator=generator) for d in range(depth)],
            -1,
        )
        return flat.reshape(n, grid, grid, depth)

    def image_losses():
        grids = draw_codes(4)
        examples = [processor.t2i_example("a red circle", (g, g)) for g in grids]
        out = model(**processor.collate(examples))
        return out.loss_pixel.item(), out.loss_semantic.item()

    before = image_losses()
    counts = draw_codes(200).reshape(-1, depth)
    counts = torch.stack([torch.bincount(counts[:, d], minlength=k) for d in range(depth)])
    model.set_code_priors(counts, counts)
    for head in (model.pixel_head, model.semantic_head):
        prior = head.classifier_bias.softmax(dim=-1)
        expected = 0.9 * counts / counts.sum(dim=1, keepdim=True) + 0.1 / k
        assert torch.allclose(prior, expected.float(), atol=1e-6)
    after = image_losses()
    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean())
    for loss_before, loss_after in zip(before, after):
        assert loss_before > 0.9 * torch.log(torch.tensor(float(k)))  # uniform-ish at init
        assert loss_after < entropy + 0.5 < loss_before  # the heads start at the data's frequencies
    with pytest.raises(ValueError, match=r"counts must be \(depth, codebook\)"):
        model.pixel_head.set_code_prior(counts[:, :-1])


def test_query_key_init_std_draws_only_the_query_and_key_projections_of_a_fresh_llm(text_tokenizer, tmp_path):
    def weight_std(model, part):
        weights = [w for n, w in model.language_model.named_parameters() if f"{part}.weight" in n]
        return torch.cat([w.flatten() for w in weights]).std().item()

    text_config = {**micro_text_config("qwen2", len(text_tokenizer) + 8), "initializer_range": 0.1}
    processor = DualTokenProcessor(text_tokenizer, grid_size=3, rq_depth=4)
    fields = {"codebook_size": 64, "code_dim": 8, "grid_size": 3, "rq_depth": 4}
    split = DualTokenMLLM.from_llm(text_config, processor, llm_query_key_init_std=0.02, **fields)
    plain = DualTokenMLLM.from_llm(text_config, processor, **fields)
    for part in ("q_proj", "k_proj"):
        assert abs(weight_std(split, part) - 0.02) < 0.002
        assert abs(weight_std(plain, part) - 0.1) < 0.01
    for part in ("v_proj", "o_proj", "gate_proj", "down_proj"):
        assert abs(weight_std(split, part) - 0.1) < 0.01
    # A pretrained LLM keeps its weights: the field only applies to random initialisation.
    plain.language_model.save_pretrained(tmp_path / "llm")
    loaded = DualTokenMLLM.from_llm(tmp_path / "llm", processor, llm_query_key_init_std=0.02, **fields)
    for part in ("q_proj", "k_proj"):
        assert weight_std(loaded, part) == pytest.approx(weight_std(plain, part))
    with pytest.raises(ValueError, match="llm_query_key_init_std must be a positive number"):
        DualTokenMLLM.from_llm(text_config, processor, llm_query_key_init_std=-0.02, **fields)


def test_output_semantic_dropout_zeroes_whole_semantic_halves_of_output_images_in_training(text_tokenizer):
    model, _ = build_micro(text_tokenizer, output_semantic_dropout=0.5)
    width = model.config.hidden_size // 2

    def half(embeds):  # the semantic half of output cell embeddings, less the cells' position embedding
        return embeds[..., width:] - model.output_cell_position[:, width:]

    grids = [random_codes(model, seed) for seed in range(32)]
    pixel, semantic = torch.stack([g[0] for g in grids]), torch.stack([g[1] for g in grids])
    outputs = torch.ones(len(grids), dtype=torch.bool)
    with torch.no_grad():
        assert (half(model.image_embeddings(pixel, semantic, outputs)).abs().sum(-1) > 0).all()  # eval: kept
        model.train()
        torch.manual_seed(0)
        dropped = half(model.image_embeddings(pixel, semantic, outputs)).abs().sum(-1) == 0  # (images, cells)
        model.eval()
    assert (dropped.all(dim=1) | ~dropped.any(dim=1)).all()  # one draw per image
    assert 6 <= int(dropped[:, 0].sum()) <= 26  # about half of 32 images
    model.config.output_semantic_dropout = 1.0
    with torch.no_grad():
        assert (half(model.image_embeddings(pixel, semantic, outputs)) == 0).all()  # decoding too
        understood = model.image_embeddings(pixel, semantic, ~outputs)
    assert (understood[..., width:].abs().sum(-1) > 0).all()  # understanding inputs are never touched
    with pytest.raises(ValueError, match=r"output_semantic_dropout must lie in \[0, 1\]"):
        build_micro(text_tokenizer, output_semantic_dropout=1.5)
