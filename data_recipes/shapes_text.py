"""Text about shapes-world scenes: captions, VQA items, LLaVA chats and zero-shot class labels (the GenEval-style
text-to-image prompt specs live in `shapes_prompts`, which phrases its prompts with the helpers here).

Every answer is computed from the scene itself, so it is correct by construction. Functions that choose among
phrasings take a `random.Random`, so text is deterministic by seed.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

from data_recipes.shapes import (
    COLOR_NAMES,
    SHAPES,
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


_REFERENCE_FILLERS = frozenset(
    "what color is the shape in at on corner where how many are there a an ?".split()
)


def question_reference(question: str) -> str:
    """The words of a shapes-world VQA question that pick its object(s): 'What color is the cross?' -> 'cross',
    'What shape is in the top left corner?' -> 'top left', 'Is there a blue square?' -> 'blue square',
    'What shape is the red object?' -> 'red object', 'How many red shapes are there?' -> 'red shapes'. An echoed
    answer ("cross red") repeats them before the answer. The nouns 'object' and 'shapes' stay, so that an echo
    that names a color is followed by the question's word, never by a shape the model must read off the image."""
    words = question.lower().replace("?", " ?").split()
    return " ".join(w for w in words if w not in _REFERENCE_FILLERS)


def echoed_answer(question: str, answer: str) -> str:
    """The answer written after the question's reference words ('cross red'), so that a small model reads the
    answer right after the words that say which object to look at."""
    return f"{question_reference(question)} {answer}"


def strip_reference(question: str, reply: str) -> str:
    """The answer part of an echoed reply: the reply without the question's reference words in front (a reply
    that does not start with them is returned whole, and so scored as it is)."""
    reference = question_reference(question)
    text = reply.strip()
    if text.lower().startswith(reference + " "):
        return text[len(reference) + 1 :].strip()
    return text


QUESTION_FORMS: tuple[str, ...] = (
    "color, named by place",
    "color, named by shape",
    "shape, named by place",
    "shape, named by color",
    "count, all shapes",
    "count, of one shape",
    "count, of one color",
    "position, named by color + shape",
    "position, named by shape",
    "existence",
)


@functools.cache
def _question_forms() -> dict[str, str]:
    """Every question text the VQA templates below can write -> its form."""
    places = POSITION_PHRASES.values()
    pairs = [(color, shape) for color in COLOR_NAMES for shape in SHAPES]
    texts = {
        "color, named by place": [f"What color is the shape {p}?" for p in places],
        "color, named by shape": [f"What color is the {shape}?" for shape in SHAPES],
        "shape, named by place": [f"What shape is {p}?" for p in places],
        "shape, named by color": [f"What shape is the {color} object?" for color in COLOR_NAMES],
        "count, all shapes": ["How many shapes are there?"],
        "count, of one shape": [f"How many {PLURALS[shape]} are there?" for shape in SHAPES],
        "count, of one color": [f"How many {color} shapes are there?" for color in COLOR_NAMES],
        "position, named by color + shape": [f"Where is the {color} {shape}?" for color, shape in pairs],
        "position, named by shape": [f"Where is the {shape}?" for shape in SHAPES],
        "existence": [f"Is there {with_article(f'{color} {shape}')}?" for color, shape in pairs],
    }
    return {text: form for form, questions in texts.items() for text in questions}


def question_form(question: str) -> str | None:
    """Which of this module's VQA templates wrote `question` (one of `QUESTION_FORMS`; None for any other text):
    how the question names its object tells which lookups an answer needs ('What color is the shape in the top
    left corner?' needs the place's cells, 'What color is the cross?' the cells that show a cross)."""
    return _question_forms().get(question.strip())


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
    # 'No' questions name any absent pair and rarely repeat, 'yes' questions only the scene's own objects: keep as
    # many 'no' as 'yes' answers (one for a scene that allows no 'yes'), or a model learns to answer 'no'.
    yes = sum(item["question_type"] == "existence" and item["answer"] == "yes" for item in items)
    kept_no = 0
    balanced = []
    for item in items:
        if item["question_type"] == "existence" and item["answer"] == "no":
            if kept_no >= max(1, yes):
                continue
            kept_no += 1
        balanced.append(item)
    rng.shuffle(balanced)
    return balanced


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
