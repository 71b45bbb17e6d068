"""Text-to-image verification: verdicts, per-tag accuracy, task-mean overall, held-out split, input errors."""

from __future__ import annotations

import json
import random

import pytest

from eval.t2i_scoring import T2I_TAGS, load_prompt_specs, score_t2i, summarize_verdicts


def _spec(prompt_id: str, tag: str, heldout: bool = False, wanted: str = "ok") -> dict:
    return {
        "prompt_id": prompt_id,
        "prompt": f"prompt {prompt_id}",
        "tag": tag,
        "heldout": heldout,
        "wanted": wanted,
    }


def _parse(image: dict) -> dict:
    return {"objects": image["objects"]}


def _check(spec: dict, scene: dict) -> bool:
    return spec["wanted"] in scene["objects"]


def test_per_tag_accuracy_and_task_mean():
    specs = [
        _spec("p0", "counting"),
        _spec("p1", "counting"),
        _spec("p2", "counting"),
        _spec("p3", "counting", heldout=True),
        _spec("p4", "colors", heldout=True),
    ]
    images = [{"objects": ["ok"]}, {"objects": ["ok"]}, {"objects": ["ok"]}, {"objects": []}, {"objects": []}]
    result = score_t2i(specs, images, parse_fn=_parse, check_fn=_check, show_progress=False)
    assert [v["satisfied"] for v in result["per_sample"]] == [True, True, True, False, False]
    assert result["per_sample"][3] == {
        "prompt_id": "p3", "prompt": "prompt p3", "tag": "counting", "heldout": True, "satisfied": False,
    }  # fmt: skip
    summary = result["all"]
    assert summary["per_tag"] == {"counting": 0.75, "colors": 0.0}
    assert summary["overall"] == pytest.approx(0.375)  # mean over tags, not over the 5 samples (0.6)
    assert summary["samples_per_tag"] == {"counting": 4, "colors": 1}
    assert summary["missing_tags"] == ["single_object", "two_object", "position", "color_attr"]
    assert result["heldout"]["per_tag"] == {"counting": 0.0, "colors": 0.0}
    assert result["heldout"]["num_samples"] == 2
    assert result["seen"]["overall"] == 1.0


def test_all_tags_and_empty_groups():
    specs = [_spec(f"p{i}", tag) for i, tag in enumerate(T2I_TAGS)]
    images = [{"objects": ["ok"] if i % 2 else []} for i in range(len(specs))]
    result = score_t2i(specs, images, parse_fn=_parse, check_fn=_check, show_progress=False)
    assert result["all"]["overall"] == pytest.approx(0.5)
    assert result["all"]["missing_tags"] == []
    assert result["heldout"] is None
    assert summarize_verdicts([]) is None


def test_score_t2i_input_errors():
    good = _spec("p0", "colors")
    with pytest.raises(ValueError, match="1 prompt specs but 2 images"):
        score_t2i([good], [{}, {}], parse_fn=_parse, check_fn=_check)
    with pytest.raises(ValueError, match=r"specs\[0\]: field 'tag' is 'shapes'"):
        score_t2i([_spec("p0", "shapes")], [{"objects": []}], parse_fn=_parse, check_fn=_check)
    missing = dict(good)
    del missing["heldout"]
    with pytest.raises(ValueError, match="lacks the field 'heldout'"):
        score_t2i([missing], [{"objects": []}], parse_fn=_parse, check_fn=_check)
    with pytest.raises(ValueError, match="expected a bool"):
        score_t2i([good], [{"objects": []}], parse_fn=_parse, check_fn=lambda spec, scene: None)


def test_load_prompt_specs(tmp_path):
    path = tmp_path / "prompts.jsonl"
    specs = [_spec("p0", "position"), _spec("p1", "color_attr", heldout=True)]
    path.write_text("\n".join(json.dumps(s) for s in specs) + "\n\n")
    assert load_prompt_specs(path) == specs
    path.write_text(json.dumps(specs[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: not valid JSON"):
        load_prompt_specs(path)
    path.write_text(json.dumps({**specs[0], "heldout": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: field 'heldout' must be true or false"):
        load_prompt_specs(path)
    with pytest.raises(ValueError, match="prompt file not found"):
        load_prompt_specs(tmp_path / "missing.jsonl")


def test_ground_truth_renders_score_one():
    shapes = pytest.importorskip("data_recipes.shapes")
    shapes_prompts = pytest.importorskip("data_recipes.shapes_prompts")
    pytest.importorskip("data_recipes.scene_parser")
    rng = random.Random(0)
    held_out_pairs = [("red", "star"), ("blue", "circle")]
    specs, images = [], []
    for tag in T2I_TAGS:
        for index in range(6):
            heldout = index % 3 == 0
            spec, scene = shapes_prompts.make_prompt(
                rng, tag, required_pairs=held_out_pairs if heldout else None
            )
            specs.append({**spec, "prompt_id": f"{tag}-{index}", "heldout": heldout})
            images.append(shapes.render(scene, size=64))
    result = score_t2i(specs, images, show_progress=False)
    assert result["all"]["missing_tags"] == []
    assert result["all"]["per_tag"] == {tag: 1.0 for tag in T2I_TAGS}
    assert result["all"]["overall"] == 1.0
    assert result["heldout"]["overall"] == 1.0 and result["heldout"]["num_samples"] == 12
    # The same renders do not satisfy other prompts' specs: the verifier is not vacuous.
    shifted = score_t2i(specs, images[1:] + images[:1], show_progress=False)
    assert shifted["all"]["overall"] < 0.5
