"""Text about shapes-world scenes: captions, VQA items, LLaVA chats, zero-shot class labels and GenEval-style
text-to-image prompt specs (with `prompt_satisfied`, the check the T2I evaluation runs on parsed scenes).

Every answer is computed from the scene itself, so it is correct by construction. Functions that choose among
phrasings take a `random.Random`, so text is deterministic by seed.

Prompt specs follow GenEval's metadata layout: {"prompt", "tag", "include": [{"class", "count", "color"?,
"position"?: [relation, index]}], "exclude": [{"class", "count", "color"?}]}. An include item needs at least
`count` matching objects, an exclude item fewer than `count`; a position item needs one matching object standing in
`relation` ("left of", "right of", "above", "below", on the 3x3 grid) to an object matching include[index].
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from data_recipes.shapes import (
    COLOR_NAMES,
    GRID,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    normalize_pairs,
)

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
PLURALS: dict[str, str] = {shape: shape + ("es" if shape.endswith(("s", "x")) else "s") for shape in SHAPES}
CAPTION_REQUESTS: tuple[str, ...] = (
    "Describe the image.",
    "Write a short caption for this image.",
    "What does this picture show?",
    "Give a brief description of the image.",
    "Describe the shapes in this image and where they are.",
)
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
ANSWER_TYPES: dict[str, str] = {
    "color": "other",
    "shape": "other",
    "count": "number",
    "position": "other",
    "existence": "yes/no",
}


# ---------------------------------------------------------------------------------------------------- phrasing
def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def bare_phrase(obj: ShapeObject, size: bool = True, color: bool = True) -> str:
    """'small red circle' (attributes optional)."""
    return " ".join(([obj.size] if size else []) + ([obj.color] if color else []) + [obj.shape])


def noun_phrase(obj: ShapeObject, size: bool = True, color: bool = True) -> str:
    """'a small red circle' (attributes optional)."""
    return with_article(bare_phrase(obj, size, color))


def counted(count: int, words: str, shape: str) -> str:
    """'a red circle' / 'three red circles': `words` is the attributes before the shape name (may be '')."""
    head = f"{words} " if words else ""
    if count == 1:
        return with_article(head + shape)
    return f"{NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else count} {head}{PLURALS[shape]}"


def join_list(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


def class_labels() -> list[str]:
    """Zero-shot class names, one per (color, shape), color-major: 'a red circle', ..., 'an orange circle', ..."""
    return [with_article(f"{color} {shape}") for color in COLOR_NAMES for shape in SHAPES]


# ---------------------------------------------------------------------------------------------------- captions
def _grouped(objects: Sequence[ShapeObject], size: bool) -> list[str]:
    keys = Counter((obj.size if size else "", obj.color, obj.shape) for obj in objects)
    ordered = sorted(keys, key=lambda key: (key[2], key[1], key[0]))
    return [counted(keys[key], " ".join(w for w in key[:2] if w), key[2]) for key in ordered]


def captions(scene: Scene) -> list[str]:
    """Six distinct captions of `scene` with different templates and object orders (row-major, reverse,
    left-to-right, bottom-up, grouped by kind)."""
    objects = list(scene.objects)
    if not objects:
        return [
            "An empty light background.",
            "A blank image with no shapes.",
            "There are no shapes in this image.",
            "Nothing but a plain light background.",
            "An image without any objects.",
            "A plain, empty canvas.",
        ]
    n = len(objects)
    shapes_word = f"{NUMBER_WORDS[n]} shape" + ("" if n == 1 else "s")
    placed = [f"{noun_phrase(o)} {POSITION_PHRASES[o.position]}" for o in objects]
    reverse = [f"{POSITION_PHRASES[o.position]} there is {noun_phrase(o)}" for o in reversed(objects)]
    left_to_right = sorted(objects, key=lambda o: (o.col, o.row))
    bottom_up = sorted(objects, key=lambda o: (-o.row, o.col))
    postposed = [
        f"{with_article(o.shape)}, {o.size} and {o.color}, {POSITION_PHRASES[o.position]}" for o in bottom_up
    ]
    variants = [
        sentence(join_list(placed)),
        sentence(", and ".join(reverse) if n > 1 else reverse[0]),
        sentence(f"{shapes_word} on a light background: {join_list(_grouped(objects, size=False))}"),
        sentence(
            "from left to right, "
            + join_list([f"{noun_phrase(o)} {POSITION_PHRASES[o.position]}" for o in left_to_right])
            if n > 1
            else f"a single {bare_phrase(objects[0])} {POSITION_PHRASES[objects[0].position]}"
        ),
        sentence(join_list(postposed)),
        sentence(
            f"there {'is' if n == 1 else 'are'} {shapes_word} in this image: {join_list(_grouped(objects, True))}"
        ),
    ]
    return variants


# ---------------------------------------------------------------------------------------------------- VQA
def _item(question: str, answer: str, question_type: str, sentence_answer: str) -> dict[str, str]:
    return {
        "question": question,
        "answer": answer,
        "question_type": question_type,
        "answer_type": ANSWER_TYPES[question_type],
        "sentence": sentence(sentence_answer),
    }


def _unique(objects: Sequence[ShapeObject], key) -> list[ShapeObject]:
    counts = Counter(key(o) for o in objects)
    return [o for o in objects if counts[key(o)] == 1]


def _color_items(objects: Sequence[ShapeObject]) -> list[dict[str, str]]:
    items = [
        _item(
            f"What color is the shape {POSITION_PHRASES[o.position]}?",
            o.color,
            "color",
            f"the shape {POSITION_PHRASES[o.position]} is {o.color}",
        )
        for o in objects
    ]
    items += [
        _item(f"What color is the {o.shape}?", o.color, "color", f"the {o.shape} is {o.color}")
        for o in _unique(objects, lambda o: o.shape)
    ]
    return items


def _shape_items(objects: Sequence[ShapeObject]) -> list[dict[str, str]]:
    items = [
        _item(
            f"What shape is {POSITION_PHRASES[o.position]}?",
            o.shape,
            "shape",
            f"{with_article(o.shape)} is {POSITION_PHRASES[o.position]}",
        )
        for o in objects
    ]
    items += [
        _item(
            f"What shape is the {o.color} object?",
            o.shape,
            "shape",
            f"the {o.color} object is {with_article(o.shape)}",
        )
        for o in _unique(objects, lambda o: o.color)
    ]
    return items


def _count_items(objects: Sequence[ShapeObject], rng: random.Random) -> list[dict[str, str]]:
    def answer(count: int, phrase: str) -> str:
        if count == 0:
            return f"there are no {phrase}"
        return f"there {'is' if count == 1 else 'are'} {NUMBER_WORDS[count]} {phrase}"

    n = len(objects)
    items = [_item("How many shapes are there?", str(n), "count", answer(n, "shape" if n == 1 else "shapes"))]
    shape = rng.choice([o.shape for o in objects] + [rng.choice(SHAPES)])
    k = sum(o.shape == shape for o in objects)
    items.append(
        _item(
            f"How many {PLURALS[shape]} are there?",
            str(k),
            "count",
            answer(k, shape if k == 1 else PLURALS[shape]),
        )
    )
    color = rng.choice([o.color for o in objects] + [rng.choice(COLOR_NAMES)])
    k = sum(o.color == color for o in objects)
    items.append(
        _item(
            f"How many {color} shapes are there?",
            str(k),
            "count",
            answer(k, f"{color} shape" + ("" if k == 1 else "s")),
        )
    )
    return items


def _position_items(objects: Sequence[ShapeObject]) -> list[dict[str, str]]:
    items = [
        _item(
            f"Where is the {o.color} {o.shape}?",
            o.position,
            "position",
            f"the {o.color} {o.shape} is {POSITION_PHRASES[o.position]}",
        )
        for o in _unique(objects, lambda o: o.pair)
    ]
    items += [
        _item(
            f"Where is the {o.shape}?",
            o.position,
            "position",
            f"the {o.shape} is {POSITION_PHRASES[o.position]}",
        )
        for o in _unique(objects, lambda o: o.shape)
    ]
    return items


def existence_item(
    scene: Scene,
    rng: random.Random,
    answer_yes: bool,
    allowed_pairs: Collection[tuple[str, str]] | None = None,
) -> dict[str, str] | None:
    """An 'Is there a red circle?' question whose answer is `answer_yes` (None when impossible: a 'yes' about an
    empty scene, or a 'no' when the scene holds every allowed pair). 'No' questions only name allowed pairs."""
    if answer_yes:
        if not scene.objects:
            return None
        obj = rng.choice(scene.objects)
        return _item(
            f"Is there {noun_phrase(obj, size=False)}?",
            "yes",
            "existence",
            f"yes, there is {noun_phrase(obj, size=False)} {POSITION_PHRASES[obj.position]}",
        )
    absent = [pair for pair in normalize_pairs(allowed_pairs, "allowed_pairs") if pair not in scene.pairs()]
    if not absent:
        return None
    color, shape = rng.choice(absent)
    phrase = with_article(f"{color} {shape}")
    return _item(f"Is there {phrase}?", "no", "existence", f"no, there is no {color} {shape}")


def vqa_items(
    scene: Scene, rng: random.Random, allowed_pairs: Collection[tuple[str, str]] | None = None
) -> list[dict[str, str]]:
    """One question per type (color, shape, count, position when some object is unambiguous) plus one 'yes' and
    one 'no' existence question, so yes/no answers are balanced. Each item: question, answer (short, VQAv2
    style: digits for counts), question_type, answer_type, and `sentence` (a full-sentence answer for chats)."""
    objects = list(scene.objects)
    items: list[dict[str, str]] = []
    if objects:
        for candidates in (
            _color_items(objects),
            _shape_items(objects),
            _count_items(objects, rng),
            _position_items(objects),
        ):
            if candidates:
                items.append(rng.choice(candidates))
    else:
        items.append(_item("How many shapes are there?", "0", "count", "there are no shapes"))
    for answer_yes in (True, False):
        item = existence_item(scene, rng, answer_yes, allowed_pairs)
        if item is not None:
            items.append(item)
    return items


def distinct_vqa_items(
    scene: Scene, rng: random.Random, rounds: int, allowed_pairs: Collection[tuple[str, str]] | None = None
) -> list[dict[str, str]]:
    """The distinct questions (first occurrence kept) of `rounds` `vqa_items` rounds about `scene`, shuffled:
    dense supervision for one image (every question type, both existence answers)."""
    seen: set[str] = set()
    items = []
    for _ in range(rounds):
        for item in vqa_items(scene, rng, allowed_pairs):
            if item["question"] not in seen:
                seen.add(item["question"])
                items.append(item)
    rng.shuffle(items)
    return items


# ---------------------------------------------------------------------------------------------------- chats
def caption_request(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    """A single-turn LLaVA conversation asking for a caption."""
    return [
        {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_REQUESTS)},
        {"from": "gpt", "value": rng.choice(captions(scene))},
    ]


def vqa_dialogue(items: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """A multi-turn LLaVA conversation asking every item in turn for a short answer: one image supervises several
    answers (the image is read once, every question about it is learned from that one sequence)."""
    if not items:
        raise ValueError("vqa_dialogue: no VQA items")
    conversation: list[dict[str, str]] = []
    for index, item in enumerate(items):
        prefix = "<image>\n" if index == 0 else ""
        conversation.append({"from": "human", "value": prefix + item["question"] + SHORT_ANSWER_SUFFIX})
        conversation.append({"from": "gpt", "value": item["answer"]})
    return conversation


def chat(
    scene: Scene, rng: random.Random, allowed_pairs: Collection[tuple[str, str]] | None = None
) -> list[dict[str, str]]:
    """A 2-4 exchange LLaVA conversation about one image (the first human turn starts with '<image>\\n'):
    optionally a description request, then questions answered in full sentences."""
    items = vqa_items(scene, rng, allowed_pairs)
    rng.shuffle(items)
    exchanges = rng.randint(2, 4)
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.5:
        turns.append((rng.choice(CAPTION_REQUESTS), rng.choice(captions(scene))))
    turns += [(item["question"], item["sentence"]) for item in items]
    conversation: list[dict[str, str]] = []
    for index, (question, answer) in enumerate(turns[:exchanges]):
        conversation.append({"from": "human", "value": ("<image>\n" if index == 0 else "") + question})
        conversation.append({"from": "gpt", "value": answer})
    return conversation


# ---------------------------------------------------------------------------------------------------- T2I prompts
def _matches(obj: ShapeObject, item: Mapping[str, Any]) -> bool:
    return obj.shape == item["class"] and ("color" not in item or obj.color == item["color"])


def _related(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    return a.row > b.row  # "below"


def _check_item(item: Any, where: str, n_include: int | None) -> None:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    if item.get("class") not in SHAPES:
        raise ValueError(f"{where}.class: {item.get('class')!r} is not one of {', '.join(SHAPES)}")
    count = item.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{where}.count: expected a non-negative integer, got {count!r}")
    if "color" in item and item["color"] not in COLOR_NAMES:
        raise ValueError(f"{where}.color: {item['color']!r} is not one of {', '.join(COLOR_NAMES)}")
    if "position" in item:
        position = item["position"]
        if n_include is None:
            raise ValueError(f"{where}.position: only include items may carry a position")
        if (
            not isinstance(position, Sequence)
            or isinstance(position, str)
            or len(position) != 2
            or position[0] not in RELATIONS
            or isinstance(position[1], bool)
            or not isinstance(position[1], int)
            or not 0 <= position[1] < n_include
        ):
            raise ValueError(
                f"{where}.position: expected [relation, include index] with relation one of "
                f"{', '.join(RELATIONS)} and index < {n_include}, got {position!r}"
            )


def validate_spec(spec: Any) -> None:
    """Raise ValueError naming the field when `spec` is not a prompt spec that `prompt_satisfied` can check."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"prompt spec: expected an object, got {type(spec).__name__}")
    if spec.get("tag") not in TAGS:
        raise ValueError(f"prompt spec.tag: {spec.get('tag')!r} is not one of {', '.join(TAGS)}")
    include = spec.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError("prompt spec.include: expected a non-empty list")
    for index, item in enumerate(include):
        _check_item(item, f"prompt spec.include[{index}]", len(include))
    exclude = spec.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError("prompt spec.exclude: expected a list")
    for index, item in enumerate(exclude):
        _check_item(item, f"prompt spec.exclude[{index}]", None)


def prompt_satisfied(spec: Mapping[str, Any], scene: Scene) -> bool:
    """Whether `scene` (typically parsed from a generated image) satisfies the prompt spec, GenEval-style."""
    validate_spec(spec)
    objects = scene.objects
    include = spec["include"]
    for item in include:
        if sum(_matches(o, item) for o in objects) < item["count"]:
            return False
    for item in spec.get("exclude", []):
        if sum(_matches(o, item) for o in objects) >= item["count"]:
            return False
    for item in include:
        if "position" in item:
            relation, index = item["position"]
            anchors = [o for o in objects if _matches(o, include[index])]
            movers = [o for o in objects if _matches(o, item)]
            if not any(_related(a, b, relation) and a != b for a in movers for b in anchors):
                return False
    return True


def _pick_pairs(
    rng: random.Random,
    k: int,
    pool: Sequence[tuple[str, str]],
    required: Sequence[tuple[str, str]],
    distinct_shapes: bool = False,
    distinct_colors: bool = False,
) -> list[tuple[str, str]]:
    """k distinct pairs from `pool` (one of them from `required` when given), in random order."""
    chosen: list[tuple[str, str]] = []
    while len(chosen) < k:
        source = required if required and not chosen else pool
        candidates = [
            p
            for p in source
            if p not in chosen
            and not (distinct_shapes and any(p[1] == q[1] for q in chosen))
            and not (distinct_colors and any(p[0] == q[0] for q in chosen))
        ]
        if not candidates:
            raise ValueError(
                f"allowed_pairs: too few (color, shape) pairs to pick {k} that differ as required"
            )
        chosen.append(rng.choice(candidates))
    rng.shuffle(chosen)
    return chosen


def _place(rng: random.Random, pairs: Sequence[tuple[str, str]], cells: Sequence[int]) -> Scene:
    return Scene(
        tuple(
            ShapeObject(shape, color, rng.choice(SIZES), cell // GRID, cell % GRID)
            for (color, shape), cell in zip(pairs, cells)
        )
    )


def _related_cells_ok(a: int, b: int, relation: str) -> bool:
    probe = ShapeObject("circle", "red", "small", a // GRID, a % GRID)
    return _related(probe, ShapeObject("circle", "red", "small", b // GRID, b % GRID), relation)


def _related_cells(rng: random.Random, relation: str) -> tuple[int, int]:
    """Cells (mover, anchor) with the mover standing in `relation` to the anchor."""
    options = [
        (a, b)
        for a in range(GRID * GRID)
        for b in range(GRID * GRID)
        if a != b and _related_cells_ok(a, b, relation)
    ]
    return rng.choice(options)


def make_prompt(
    rng: random.Random,
    tag: str,
    allowed_pairs: Collection[tuple[str, str]] | None = None,
    required_pairs: Collection[tuple[str, str]] | None = None,
) -> tuple[dict[str, Any], Scene]:
    """A prompt spec of GenEval category `tag` and a scene that satisfies it (holding only the prompted objects).

    Objects use `allowed_pairs` (default: all); with `required_pairs`, one prompted object uses one of those
    (used for held-out test prompts).
    """
    if tag not in TAGS:
        raise ValueError(f"tag: {tag!r} is not one of {', '.join(TAGS)}")
    pool = normalize_pairs(allowed_pairs, "allowed_pairs")
    required = normalize_pairs(required_pairs, "required_pairs") if required_pairs is not None else []
    if tag == "single_object":
        (pair,) = _pick_pairs(rng, 1, pool, required)
        spec = {"prompt": with_article(pair[1]), "include": [{"class": pair[1], "count": 1}]}
        scene = _place(rng, [pair], rng.sample(range(GRID * GRID), 1))
    elif tag == "colors":
        (pair,) = _pick_pairs(rng, 1, pool, required)
        spec = {
            "prompt": with_article(f"{pair[0]} {pair[1]}"),
            "include": [{"class": pair[1], "count": 1, "color": pair[0]}],
        }
        scene = _place(rng, [pair], rng.sample(range(GRID * GRID), 1))
    elif tag == "counting":
        (pair,) = _pick_pairs(rng, 1, pool, required)
        count = rng.randint(2, 4)
        spec = {
            "prompt": counted(count, pair[0], pair[1]),
            "include": [{"class": pair[1], "count": count, "color": pair[0]}],
            "exclude": [{"class": pair[1], "count": count + 1, "color": pair[0]}],
        }
        scene = _place(rng, [pair] * count, rng.sample(range(GRID * GRID), count))
    elif tag == "two_object":
        pairs = _pick_pairs(rng, 2, pool, required, distinct_shapes=True)
        spec = {
            "prompt": f"{with_article(pairs[0][1])} and {with_article(pairs[1][1])}",
            "include": [{"class": shape, "count": 1} for _, shape in pairs],
        }
        scene = _place(rng, pairs, rng.sample(range(GRID * GRID), 2))
    elif tag == "color_attr":
        pairs = _pick_pairs(rng, 2, pool, required, distinct_shapes=True, distinct_colors=True)
        spec = {
            "prompt": " and ".join(with_article(f"{color} {shape}") for color, shape in pairs),
            "include": [{"class": shape, "count": 1, "color": color} for color, shape in pairs],
        }
        scene = _place(rng, pairs, rng.sample(range(GRID * GRID), 2))
    else:  # position
        mover, anchor = _pick_pairs(rng, 2, pool, required)
        relation = rng.choice(list(RELATIONS))
        mover_cell, anchor_cell = _related_cells(rng, relation)
        spec = {
            "prompt": f"{with_article(f'{mover[0]} {mover[1]}')} {RELATIONS[relation]} "
            f"{with_article(f'{anchor[0]} {anchor[1]}')}",
            "include": [
                {"class": anchor[1], "count": 1, "color": anchor[0]},
                {"class": mover[1], "count": 1, "color": mover[0], "position": [relation, 0]},
            ],
        }
        scene = _place(rng, [mover, anchor], [mover_cell, anchor_cell])
    spec = {"prompt": spec["prompt"], "tag": tag, **{k: v for k, v in spec.items() if k != "prompt"}}
    spec.setdefault("exclude", [])
    return spec, scene


def spec_pairs(spec: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The (color, shape) pairs a prompt spec names explicitly (items without a color name none)."""
    return {(item["color"], item["class"]) for item in spec["include"] if "color" in item}
