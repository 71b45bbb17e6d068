"""The text-to-image diagnostics: per-depth image losses under controlled inputs, and code entropies."""

import math

import pytest
import torch
from mllm_testing import build_micro, random_codes, train_text_tokenizer

from eval.t2i_diagnostics import code_entropies, image_loss_diagnostics


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    text_tokenizer = train_text_tokenizer(tmp_path_factory.mktemp("tok"))
    return build_micro(text_tokenizer)


def test_per_depth_losses_average_to_the_models_own_loss(micro):
    model, processor = micro
    captions = ["a red circle", "two blue squares", "a green star"]
    codes = [random_codes(model, seed) for seed in range(3)]
    result = image_loss_diagnostics(model, processor, captions, codes, batch_size=2)
    batch = processor.collate([processor.t2i_example(c, x) for c, x in zip(captions, codes)])
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    for head in ("pixel", "semantic"):
        own = result[head]["own_caption"]
        assert len(own) == model.config.rq_depth
        assert sum(own) / len(own) == pytest.approx(float(getattr(out, f"loss_{head}")), rel=1e-5)
        # A random model's heads read the LLM state: zeroing it changes the losses.
        assert result[head]["zero_state"] != pytest.approx(own, abs=1e-6)
        assert result[head]["own_caption"] != pytest.approx(result[head]["shifted_caption"], abs=1e-7)
    same = image_loss_diagnostics(model, processor, ["a red circle"] * 3, codes, batch_size=2)
    assert same["pixel"]["own_caption"] == pytest.approx(same["pixel"]["shifted_caption"], abs=1e-6)
    with pytest.raises(ValueError, match=">= 2 captions"):
        image_loss_diagnostics(model, processor, ["a red circle"], codes[:1])


def test_code_entropies_separate_what_the_scene_predicts_from_noise():
    generator = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 4, (50, 4, 4), generator=generator)
    noise = torch.randint(0, 8, (50, 4, 4), generator=generator)
    # depth 0 is a function of the cell's content; depth 1 is independent noise.
    codes = torch.stack([classes * 3 + 1, noise], dim=-1)
    result = code_entropies({"pixel": codes}, classes)["pixel"]
    marginal = -sum(
        p * math.log(p) for p in (torch.bincount(classes.flatten()).double() / classes.numel()).tolist()
    )
    assert result["marginal"][0] == pytest.approx(marginal)
    assert result["given_content"][0] == pytest.approx(0.0, abs=1e-9)
    assert result["given_place_and_content"][0] == pytest.approx(0.0, abs=1e-9)
    # Noise keeps (nearly) all its entropy given the content; the plug-in estimate can only drop.
    assert result["given_content"][1] > 0.9 * result["marginal"][1]
    assert result["given_place_and_content"][1] <= result["given_content"][1] <= result["marginal"][1]
    with pytest.raises(ValueError, match="do not match"):
        code_entropies({"pixel": codes[:10]}, classes)


def test_cell_classes_round_trip_through_scenes():
    import random

    from data_recipes.cell_truth import NUM_CELL_CLASSES, cell_class_grid, scene_from_cell_classes
    from data_recipes.shapes import sample_scene

    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        grid = cell_class_grid(scene)
        assert int(grid.max()) < NUM_CELL_CLASSES
        assert (grid > 0).sum() >= len(scene.objects)
        assert scene_from_cell_classes(grid) == scene
    assert len(scene_from_cell_classes(torch.zeros(8, 8, dtype=torch.long)).objects) == 0


def test_centre_cell_grids_hold_each_object_once_at_its_slot_centre():
    import random

    from data_recipes.cell_truth import cell_class_grid, centre_cell_grid, object_class
    from data_recipes.shapes import sample_scene

    rng = random.Random(1)
    for _ in range(100):
        scene = sample_scene(rng)
        grid = centre_cell_grid(scene)
        assert int((grid > 0).sum()) == len(scene.objects)
        centre = (1, 4, 6)  # the 8x8 cell under each 3x3 slot's centre in the 64 px render
        for obj in scene.objects:
            assert int(grid[centre[obj.row], centre[obj.col]]) == object_class(obj)
        assert bool(((grid > 0) <= (cell_class_grid(scene) > 0)).all())


def test_the_report_tabulates_the_diagnostics_per_depth(tmp_path):
    import json

    from eval.report import _t2i_section

    per_depth = {"own_caption": [4.98341, 1.0], "shifted_caption": [4.98345, 1.5], "zero_state": [5.0, 2.0],
                 "shuffled_state": [4.99, 1.9]}  # fmt: skip
    entropy = {"marginal": [2.3, 5.9], "given_place": [2.2, 5.4], "given_content": [1.9, 5.5],
               "given_place_and_content": [1.7, 4.8]}  # fmt: skip
    summary = {"overall": 0.5, "per_tag": {"single_object": 0.5}, "num_samples": 2}
    metrics = {"all": summary, "reference": {"real": summary, "caption_use": {"pixel": per_depth},
                                             "code_entropy": {"cells": 128, "pixel": entropy}}}  # fmt: skip
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "t2i_metrics.json").write_text(json.dumps(metrics))
    text = "\n".join(_t2i_section(tmp_path))
    # Own and shifted captions stay apart at full precision (4 decimals printed both as 4.9834).
    assert "| pixel | own caption | 4.983410 | 1.000000 |" in text
    assert "| pixel | another prompt's caption | 4.983450 | 1.500000 |" in text
    assert "| pixel | LLM state zeroed | 5.000000 | 2.000000 |" in text
    assert "| pixel | given both | 1.700 | 4.800 |" in text
    assert "over 128 cells" in text
