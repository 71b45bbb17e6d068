"""Shapes-world text: captions, VQA, chats, class labels, T2I prompt specs and `prompt_satisfied`."""

from __future__ import annotations

import json
import random
import re

import pytest

from data_recipes.scene_parser import parse_scene
from data_recipes.shapes import (
    ALL_PAIRS,
    COLOR_NAMES,
    POSITIONS,
    SHAPES,
    Scene,
    ShapeObject,
    render,
    sample_scene,
)
from data_recipes.shapes_prompts import make_prompt, prompt_satisfied, spec_pairs, validate_spec
from data_recipes.shapes_text import (
    POSITION_PHRASES,
    QUESTION_FORMS,
    TAGS,
    captions,
    chat,
    class_labels,
    distinct_vqa_items,
    echoed_answer,
    question_form,
    question_reference,
    strip_reference,
    vqa_items,
)

PHRASE_CELLS = {phrase: cell for cell, name in POSITIONS.items() for phrase in [POSITION_PHRASES[name]]}
SINGULAR = {shape + ("es" if shape.endswith(("s", "x")) else "s"): shape for shape in SHAPES}


def _expected_answer(question: str, scene: Scene) -> str:
    """Answer a generated question from the scene, independently of the generator's code."""
    objects = scene.objects
    if m := re.fullmatch(r"What color is the shape (.+)\?", question):
        return scene.at(*PHRASE_CELLS[m[1]]).color
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (obj,) = [o for o in objects if o.shape == m[1]]
        return obj.color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (obj,) = [o for o in objects if o.color == m[1]]
        return obj.shape
    if m := re.fullmatch(r"What shape is (.+)\?", question):
        return scene.at(*PHRASE_CELLS[m[1]]).shape
    if question == "How many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(o.color == m[1] for o in objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(o.shape == SINGULAR[m[1]] for o in objects))
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (obj,) = [o for o in objects if (o.color, o.shape) == (m[1], m[2])]
        return obj.position
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        (obj,) = [o for o in objects if o.shape == m[1]]
        return obj.position
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if (m[1], m[2]) in scene.pairs() else "no"
    raise AssertionError(f"unexpected question form: {question}")


def test_caption_variants_differ_and_describe_every_object():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        variants = captions(scene)
        assert len(variants) >= 5 and len(set(variants)) == len(variants)
        first_words = {variant.split()[0] for variant in variants}
        assert len(first_words) >= 3  # different templates, not one template re-punctuated
        for variant in variants:
            for obj in scene.objects:
                assert obj.shape in variant and obj.color in variant
        placed = variants[0]
        for obj in scene.objects:
            assert f"{obj.size} {obj.color} {obj.shape} {POSITION_PHRASES[obj.position]}" in placed
    multi = Scene((ShapeObject("star", "red", "small", 0, 0), ShapeObject("circle", "blue", "large", 2, 2)))
    texts = captions(multi)
    assert texts[0].index("star") < texts[0].index("circle") and texts[1].index("circle") < texts[1].index(
        "star"
    )


def test_vqa_answers_are_correct_for_every_question_type():
    rng = random.Random(1)
    seen_types = set()
    for _ in range(500):
        scene = sample_scene(rng)
        items = vqa_items(scene, rng)
        assert [i["answer"] for i in items if i["question_type"] == "existence"] == ["yes", "no"]
        for item in items:
            assert item["answer"] == _expected_answer(item["question"], scene), item
            seen_types.add((item["question_type"], item["answer_type"]))
    assert seen_types == {
        ("color", "other"),
        ("shape", "other"),
        ("count", "number"),
        ("position", "other"),
        ("existence", "yes/no"),
    }


def test_every_vqa_question_has_the_form_of_its_type_and_other_text_none():
    rng = random.Random(2)
    forms = set()
    for _ in range(400):
        for item in vqa_items(sample_scene(rng), rng):
            form = question_form(item["question"])
            assert form is not None and form.split(",")[0] == item["question_type"], item
            forms.add(form)
    assert forms == set(QUESTION_FORMS)
    assert question_form("What shape is the red object?") == "shape, named by color"
    assert question_form("What color is the shape in the top left corner?") == "color, named by place"
    assert question_form("What color is the cross?") == "color, named by shape"
    assert question_form("What is the man holding?") is None
    assert question_form("What shape is the mauve object?") is None


def test_dense_vqa_keeps_existence_answers_balanced():
    """'No' questions name any absent pair and rarely repeat, 'yes' questions only the scene's objects: the distinct
    questions of several rounds must still hold as many 'no' as 'yes' answers (else a model learns to say 'no')."""
    rng = random.Random(3)
    answers = {"yes": 0, "no": 0}
    for _ in range(300):
        scene = sample_scene(rng)
        items = distinct_vqa_items(scene, rng, 4)
        existence = [i["answer"] for i in items if i["question_type"] == "existence"]
        assert 1 <= existence.count("no") <= max(1, existence.count("yes"))
        assert len({i["question"] for i in items}) == len(items)
        for item in items:
            assert item["answer"] == _expected_answer(item["question"], scene), item
        for answer in existence:
            answers[answer] += 1
    assert answers["yes"] > 500 and 0.9 * answers["yes"] <= answers["no"] <= answers["yes"]


@pytest.mark.parametrize(
    "question, reference",
    [
        ("What color is the cross?", "cross"),
        ("What color is the shape in the top left corner?", "top left"),
        ("What shape is at the bottom?", "bottom"),
        ("What shape is the red object?", "red object"),
        ("How many shapes are there?", "shapes"),
        ("How many crosses are there?", "crosses"),
        ("How many cyan shapes are there?", "cyan shapes"),
        ("Where is the blue cross?", "blue cross"),
        ("Is there an orange diamond?", "orange diamond"),
    ],
)
def test_question_reference_keeps_the_words_that_pick_the_object(question, reference):
    assert question_reference(question) == reference


def test_echoed_answers_put_the_reference_before_the_answer_and_strip_back():
    """Every question type of `vqa_items`: the echoed answer names the asked object (its attribute or place) right
    before the answer, and stripping the reference gives the short answer back; a reply that does not start with
    the reference is scored whole."""
    rng = random.Random(5)
    for _ in range(200):
        scene = sample_scene(rng)
        for item in vqa_items(scene, rng):
            echoed = echoed_answer(item["question"], item["answer"])
            reference = question_reference(item["question"])
            assert echoed.endswith(" " + item["answer"]) and echoed.startswith(reference)
            assert set(reference.split()) <= set(item["question"].lower().rstrip("?").split())
            assert strip_reference(item["question"], echoed) == item["answer"]
            assert strip_reference(item["question"], " " + echoed.upper() + " ") == item["answer"].upper()
    assert strip_reference("What color is the cross?", "circle red") == "circle red"
    assert strip_reference("What color is the cross?", "crosses red") == "crosses red"


def test_no_questions_name_only_allowed_pairs():
    rng = random.Random(2)
    allowed = [pair for pair in ALL_PAIRS if pair != ("red", "star")]
    scene = Scene(tuple(ShapeObject(s, c, "small", i // 3, i % 3) for i, (c, s) in enumerate(allowed[:4])))
    for _ in range(200):
        no_item = vqa_items(scene, rng, allowed)[-1]
        assert no_item["answer"] == "no" and no_item["question"] != "Is there a red star?"


def test_chats_are_llava_conversations_of_two_to_four_exchanges():
    rng = random.Random(3)
    lengths = set()
    for _ in range(200):
        conversation = chat(sample_scene(rng), rng)
        assert len(conversation) % 2 == 0 and 2 <= len(conversation) // 2 <= 4
        assert [turn["from"] for turn in conversation] == ["human", "gpt"] * (len(conversation) // 2)
        assert conversation[0]["value"].startswith("<image>\n")
        assert all("<image>" not in turn["value"] for turn in conversation[1:])
        lengths.add(len(conversation) // 2)
    assert lengths == {2, 3, 4}


def test_class_labels_cover_every_color_and_shape():
    labels = class_labels()
    assert len(labels) == len(set(labels)) == len(COLOR_NAMES) * len(SHAPES)
    assert "a red circle" in labels and "an orange star" in labels


def _perturb(tag: str, scene: Scene, spec: dict) -> Scene:
    """A scene that breaks the prompt in the way its tag is about."""
    objects = list(scene.objects)
    first = objects[0]
    if tag in ("single_object", "two_object"):
        wanted = {item["class"] for item in spec["include"]}
        other = next(s for s in SHAPES if s not in wanted)
        objects[0] = ShapeObject(other, first.color, first.size, first.row, first.col)
    elif tag == "colors":
        other = next(c for c in COLOR_NAMES if c != first.color)
        objects[0] = ShapeObject(first.shape, other, first.size, first.row, first.col)
    elif tag == "counting":
        free = next(cell for cell in POSITIONS if scene.at(*cell) is None)
        objects.append(ShapeObject(first.shape, first.color, "small", *free))
    elif tag == "position":
        a, b = objects
        objects = [
            ShapeObject(a.shape, a.color, a.size, b.row, b.col),
            ShapeObject(b.shape, b.color, b.size, a.row, a.col),
        ]
    else:  # color_attr: swap the colors
        a, b = objects
        objects = [
            ShapeObject(a.shape, b.color, a.size, a.row, a.col),
            ShapeObject(b.shape, a.color, b.size, b.row, b.col),
        ]
    return Scene(tuple(objects))


@pytest.mark.parametrize("tag", TAGS)
def test_prompt_satisfied_accepts_its_scene_and_rejects_a_perturbed_one(tag):
    rng = random.Random(TAGS.index(tag))
    for _ in range(50):
        spec, scene = make_prompt(rng, tag)
        spec = json.loads(json.dumps(spec))
        assert spec["tag"] == tag and spec["prompt"] and spec["include"]
        assert prompt_satisfied(spec, scene)
        assert not prompt_satisfied(spec, _perturb(tag, scene, spec)), (spec, scene)
        assert not prompt_satisfied(spec, Scene())


def test_counting_is_exact_and_fewer_objects_fail():
    spec, scene = make_prompt(random.Random(4), "counting")
    assert not prompt_satisfied(spec, Scene(scene.objects[1:]))
    assert re.fullmatch(r"(two|three|four) \w+ \w+", spec["prompt"])


def test_position_prompts_read_naturally():
    spec = {
        "prompt": "a red circle to the left of a blue square",
        "tag": "position",
        "include": [
            {"class": "square", "count": 1, "color": "blue"},
            {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]},
        ],
    }
    left = Scene((ShapeObject("circle", "red", "small", 2, 0), ShapeObject("square", "blue", "large", 0, 2)))
    right = Scene((ShapeObject("circle", "red", "small", 0, 2), ShapeObject("square", "blue", "large", 0, 0)))
    assert prompt_satisfied(spec, left) and not prompt_satisfied(spec, right)


def test_make_prompt_respects_allowed_and_required_pairs():
    heldout = [("red", "star"), ("blue", "triangle")]
    allowed = [pair for pair in ALL_PAIRS if pair not in heldout]
    rng = random.Random(5)
    for index in range(120):
        tag = TAGS[index % len(TAGS)]
        spec, scene = make_prompt(rng, tag, allowed)
        assert not scene.pairs() & set(heldout) and not spec_pairs(spec) & set(heldout)
        spec, scene = make_prompt(rng, tag, ALL_PAIRS, required_pairs=heldout)
        assert scene.pairs() & set(heldout) and prompt_satisfied(spec, scene)


def test_ground_truth_renders_of_prompts_verify_after_parsing():
    rng = random.Random(6)
    for index in range(90):
        spec, scene = make_prompt(rng, TAGS[index % len(TAGS)])
        assert prompt_satisfied(spec, parse_scene(render(scene, 64))), spec


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"tag": "shapes", "include": [{"class": "star", "count": 1}]}, "tag"),
        ({"tag": "colors", "include": []}, "include"),
        ({"tag": "colors", "include": [{"class": "blob", "count": 1}]}, r"include\[0\].class"),
        ({"tag": "colors", "include": [{"class": "star", "count": -1}]}, r"include\[0\].count"),
        (
            {"tag": "colors", "include": [{"class": "star", "count": 1, "color": "teal"}]},
            r"include\[0\].color",
        ),
        (
            {"tag": "position", "include": [{"class": "star", "count": 1, "position": ["near", 0]}]},
            "position",
        ),
    ],
)
def test_invalid_specs_are_rejected_by_field(spec, field):
    with pytest.raises(ValueError, match=field):
        validate_spec(spec)
    with pytest.raises(ValueError, match=field):
        prompt_satisfied(spec, Scene())
