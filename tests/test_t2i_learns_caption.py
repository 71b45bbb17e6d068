"""Generation reads the caption: a micro model trained a few hundred steps on a two-prompt world (the same place,
two different objects) must draw, for each prompt, images that the scene parser verifies as that prompt far more
often than as the other one. Images are clean cell codes (`data_recipes.cell_truth`) rendered back to pictures, so
the test covers the processor, the model's loss, the depth heads and CFG sampling, not the DualToken tokenizer."""

import torch
from mllm_testing import build_micro, train_text_tokenizer

from data_recipes.cell_truth import cell_class_grid, scene_from_cell_classes
from data_recipes.shapes import Scene, ShapeObject, render
from eval.t2i_scoring import score_t2i
from mllm.generation import GenerationSettings, generate_images

WORLD = {
    "a red circle": ShapeObject(shape="circle", color="red", size="large", row=1, col=1),
    "a blue square": ShapeObject(shape="square", color="blue", size="large", row=1, col=1),
}


def spec(prompt: str, index: int) -> dict:
    obj = WORLD[prompt]
    include = [{"class": obj.shape, "count": 1, "color": obj.color}]
    return {"prompt_id": index, "prompt": prompt, "tag": "single_object", "heldout": False, "include": include,
            "exclude": []}  # fmt: skip


def train(model, processor, steps: int, batch: int = 16) -> None:
    depth = model.config.rq_depth
    grids = {}
    for prompt, obj in WORLD.items():
        codes = torch.zeros(3, 3, depth, dtype=torch.long)
        codes[..., 0] = cell_class_grid(Scene(objects=(obj,)), grid=3)
        grids[prompt] = (codes, codes)
    prompts = list(WORLD)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(prompts), (batch,), generator=generator).tolist()
        dropped = (torch.rand(batch, generator=generator) < 0.15).tolist()
        examples = [
            processor.t2i_example(prompts[i], grids[prompts[i]], drop_caption=drop)
            for i, drop in zip(picks, dropped)
        ]
        loss = model(**processor.collate(examples)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()


def test_a_micro_model_draws_what_its_caption_asks_for(tmp_path):
    model, processor = build_micro(
        train_text_tokenizer(tmp_path / "tok"), use_semantic_head=False, codebook_size=128
    )
    train(model, processor, steps=400)
    prompts = list(WORLD)
    draws = 12
    result = generate_images(
        model, processor, prompts, GenerationSettings.tiny(images_per_prompt=draws, seed=1), decode=False
    )
    own, other = 0, 0
    for i, prompt in enumerate(prompts):
        images = [render(scene_from_cell_classes(grid[..., 0])) for grid in result.pixel_codes[i]]
        other_prompt = prompts[1 - i]
        own += score_t2i([spec(prompt, i)] * draws, images, show_progress=False)["all"]["overall"] * draws
        other += (
            score_t2i([spec(other_prompt, i)] * draws, images, show_progress=False)["all"]["overall"] * draws
        )
    total = draws * len(prompts)
    assert own / total >= 0.75, (own, other)
    assert own - other >= total // 2, (own, other)


def test_cfg_plausibility_keeps_guidance_among_codes_the_caption_allows():
    from mllm.depth_head import plausible_only
    from mllm.sampling import cfg_mix

    # Code 0 = background, 1 = the captioned object, 2 = the other object. The unconditional branch is sure that
    # an object goes here; the conditional one is sure which.
    conditional = torch.tensor([[-5.42, -0.01, -5.65]])
    unconditional = torch.tensor([[-9.33, -0.27, -1.44]])
    guided = cfg_mix(torch.cat([conditional, unconditional]), 3.0)
    assert int(guided.argmax()) == 0  # plain CFG boosts the background past the object
    kept = plausible_only(guided.clone(), conditional, 0.01)
    assert int(kept.argmax()) == 1
    assert torch.isinf(kept[0, 0]) and torch.isinf(kept[0, 2])
    assert torch.equal(plausible_only(guided.clone(), conditional, 1e-4), guided)  # all three are plausible
