"""Recipes and the mixed stream (data_recipes.recipes): proportions, determinism, exact resume, recipe errors."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
from PIL import Image

from data_recipes.loaders.base import DataError
from data_recipes.loaders.captions import CaptionRecord
from data_recipes.loaders.images import ImageFileRecord, WebDatasetSample
from data_recipes.loaders.llava import LlavaRecord
from data_recipes.loaders.prompts import PromptRecord
from data_recipes.loaders.vqa import VQARecord
from data_recipes.recipes import (
    MixedStream,
    RecipeError,
    StreamSource,
    builtin_recipe,
    load_recipe,
)
from data_recipes.shapes_dataset import write_shapes_dataset


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes") / "shapes"
    write_shapes_dataset(root, n=40, size=32, workers=0, verbose=False)
    return root


def _sources(*sizes_and_weights: tuple[int, float]) -> list[StreamSource]:
    return [
        StreamSource(f"s{number}", "understanding", weight, [f"s{number}-{i}" for i in range(size)])
        for number, (size, weight) in enumerate(sizes_and_weights)
    ]


def _key(sample) -> tuple:
    return (sample.step, sample.source, sample.record, sample.epoch)


def test_shapes_tiny_recipe(shapes_root):
    recipe = load_recipe(builtin_recipe("shapes_tiny"), root=shapes_root)
    assert recipe.name == "shapes_tiny" and set(recipe.splits) == {"train", "val"}
    understanding, t2i = recipe.sources("train")
    assert understanding.path == shapes_root.absolute() / "train" / "llava.json"
    assert (understanding.kind, understanding.task, t2i.kind, t2i.task) == (
        "llava",
        "understanding",
        "prompts",
        "t2i",
    )
    stream = recipe.stream("train", check_images=True)
    samples = stream.take(400)
    tasks = Counter(sample.task for sample in samples)
    assert set(tasks) == {"understanding", "t2i"} and abs(tasks["t2i"] / 400 - 0.5) < 0.1
    for sample in samples:
        expected = LlavaRecord if sample.task == "understanding" else PromptRecord
        assert isinstance(sample.record, expected)
    first = next(s for s in samples if s.task == "t2i")
    assert first.record.load_image().size == (32, 32)
    assert stream.skips.total == 0
    with pytest.raises(RecipeError, match="no split 'dev'"):
        recipe.sources("dev")


def test_recipe_with_every_annotation_kind(shapes_root, tmp_path):
    body = """
splits:
  train:
    - {name: chat, kind: llava, path: "${DATA}/train/llava.json", weight: 1}
    - {name: captions, kind: coco_captions, path: "${DATA}/train/captions.json", task: t2i, weight: 1}
    - name: vqa
      kind: vqav2
      path: ${DATA}/train/vqa_questions.json
      annotations: ${DATA}/train/vqa_annotations.json
      image_pattern: "images/{image_id:07d}.png"
      weight: 1
    - {name: prompts, kind: prompts, path: "${DATA}/train/prompts.jsonl", weight: 1}
    - {name: pixels, kind: image_folder, path: "${DATA}/val/images", weight: 1}
"""
    recipe = load_recipe(_write_recipe(tmp_path, body), root=shapes_root)
    expected = {
        "chat": ("understanding", LlavaRecord),
        "captions": ("t2i", CaptionRecord),
        "vqa": ("understanding", VQARecord),
        "prompts": ("t2i", PromptRecord),
        "pixels": ("image", ImageFileRecord),
    }
    samples = recipe.stream("train", check_images=True).take(300)
    assert {sample.source for sample in samples} == set(expected)
    for sample in samples:
        task, record_type = expected[sample.source]
        assert sample.task == task and isinstance(sample.record, record_type)
    vqa = next(sample.record for sample in samples if sample.source == "vqa")
    assert len(vqa.answers) == 10 and vqa.load_image().size == (32, 32)


def test_mixing_proportions_follow_weights():
    stream = MixedStream(_sources((50, 0.7), (5, 0.2), (300, 0.1), (10, 0.0)), seed=3)
    counts = Counter(sample.source for sample in stream.take(20_000))
    assert "s3" not in counts  # weight 0 is never drawn
    for name, weight in (("s0", 0.7), ("s1", 0.2), ("s2", 0.1)):
        assert abs(counts[name] / 20_000 - weight) < 0.015, counts
    assert stream.probabilities == pytest.approx({"s0": 0.7, "s1": 0.2, "s2": 0.1})


def test_each_epoch_is_a_seeded_permutation():
    stream = MixedStream(_sources((7, 1.0)), seed=0)
    samples = stream.take(21)
    epochs = [[s.record for s in samples if s.epoch == epoch] for epoch in range(3)]
    for records in epochs:
        assert sorted(records) == sorted(f"s0-{i}" for i in range(7))  # every record once per epoch
    assert len({tuple(records) for records in epochs}) == 3  # a fresh order each epoch
    assert [s.record for s in samples[:7]] != [f"s0-{i}" for i in range(7)]  # shuffled


def test_determinism_by_seed():
    def run(seed):
        return [_key(s) for s in MixedStream(_sources((11, 1.0), (4, 2.0)), seed=seed).take(200)]

    assert run(5) == run(5)
    assert run(5) != run(6)
    assert [key[1] for key in run(5)] != [key[1] for key in run(6)]  # the source draws depend on the seed


@pytest.mark.parametrize("stop", [0, 1, 37, 137])
def test_resume_continues_exactly(stop):
    def fresh():
        return MixedStream(_sources((7, 0.5), (13, 0.3), (3, 0.2)), seed=11)

    uninterrupted = [_key(s) for s in fresh().take(stop + 300)]
    first = fresh()
    first.take(stop)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = fresh()
    resumed.load_state_dict(state)
    assert [_key(s) for s in resumed.take(300)] == uninterrupted[stop:]


def test_resume_refuses_a_different_stream():
    stream = MixedStream(_sources((7, 0.5), (13, 0.5)), seed=1)
    stream.take(5)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="seed 1"):
        MixedStream(_sources((7, 0.5), (13, 0.5)), seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="s1 was saved with 13 records"):
        MixedStream(_sources((7, 0.5), (14, 0.5)), seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="sources"):
        MixedStream(_sources((7, 1.0)), seed=1).load_state_dict(state)


def test_stream_argument_errors():
    with pytest.raises(ValueError, match="no records"):
        MixedStream(_sources((0, 1.0)))
    with pytest.raises(ValueError, match="positive weight"):
        MixedStream(_sources((3, 0.0)))
    with pytest.raises(ValueError, match="unique"):
        MixedStream(_sources((3, 1.0)) * 2)


def _write_recipe(tmp_path, body: str, name: str = "mix.yaml"):
    path = tmp_path / name
    path.write_text(body)
    return path


GOOD_SOURCE = "{name: a, kind: prompts, path: p.jsonl, weight: 1}"
BAD_RECIPES = [
    ("splits: {train: [{kind: csv, path: x}]}", "splits.train[0].kind", "expected one of"),
    ("splits: {train: [{kind: prompts, path: x, weigth: 2}]}", "splits.train[0].weigth", "unknown field"),
    ("splits: {train: [{kind: prompts, path: x, weight: -1}]}", "splits.train[0].weight", ">= 0"),
    ("splits: {train: [{kind: prompts, path: x, weight: 0}]}", "splits.train", "all weights are 0"),
    ("splits: {train: [{kind: prompts, path: '${DATA}/p.jsonl'}]}", "splits.train[0].path", "root=..."),
    ("splits: {train: [{kind: prompts}]}", "splits.train[0].path", "missing"),
    ("splits: {train: [{kind: prompts, path: x, task: understanding}]}", "splits.train[0].task", "can train"),
    ("splits: {train: [{kind: vqav2, path: q.json}]}", "splits.train[0].image_pattern", "{image_id}"),
    (
        "splits: {train: [{kind: llava, path: x, image_pattern: '{image_id}'}]}",
        "splits.train[0].image_pattern",
        "only vqav2",
    ),
    (f"splits: {{train: [{GOOD_SOURCE}, {GOOD_SOURCE}]}}", "splits.train", "used twice"),
    ("splits: {train: []}", "splits.train", "non-empty list"),
    ("splits: []", "splits", "mapping of split name"),
    ("seed: -3\nsplits: {train: [{kind: prompts, path: x}]}", "seed", "integer >= 0"),
    ("name: x\nmixture: {}\nsplits: {train: [{kind: prompts, path: x}]}", "mixture", "unknown field"),
    ("splits: {train: [{kind: prompts, path: x}]", None, "not valid YAML"),
    ("- just a list", None, "expected a mapping"),
]


@pytest.mark.parametrize("body,field_name,fragment", BAD_RECIPES)
def test_bad_recipes_name_file_and_field(tmp_path, body, field_name, fragment):
    path = _write_recipe(tmp_path, body)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and fragment in message, message
    if field_name is not None:
        assert caught.value.field == field_name and f": {field_name}: " in message


def test_missing_recipe_and_builtin_names(tmp_path):
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(ValueError, match="shapes_tiny"):
        builtin_recipe("no_such_recipe")


def test_json_recipe_relative_paths_and_skip_counts(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": ""}\n{"prompt": "b"}\n')
    (data / "chat.json").write_text(
        json.dumps(
            [{"id": "c", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
        )
    )
    recipe = {
        "name": "tiny",
        "seed": 4,
        "splits": {
            "train": [
                {"name": "draw", "kind": "prompts", "path": "data/p.jsonl", "weight": 3},
                {"name": "talk", "kind": "llava", "path": "${DATA}/chat.json", "weight": 1},
            ]
        },
    }
    path = tmp_path / "recipes" / "tiny.json"
    path.parent.mkdir()
    path.write_text(json.dumps(recipe))
    with pytest.raises(
        DataError, match="recipes/data/p.jsonl: file not found"
    ):  # relative to the recipe file
        load_recipe(path, root=data).stream("train")
    recipe["splits"]["train"][0]["path"] = "../data/p.jsonl"
    path.write_text(json.dumps(recipe))
    loaded = load_recipe(path, root=data)
    assert loaded.seed == 4 and loaded.sources("train")[1].path == data.absolute() / "chat.json"
    with pytest.raises(DataError, match=r"p.jsonl: record 2 \(line 2\)"):
        loaded.stream("train")  # the empty prompt, in error mode
    stream = loaded.stream("train", on_bad_sample="skip")
    assert stream.skips.counts == {"empty_prompt": 1}
    assert {s.record.prompt for s in stream.take(50) if s.source == "draw"} == {"a", "b"}


def test_webdataset_source_random_access(tmp_path):
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for number in range(3):
            for suffix, data in (
                ("png", _png_bytes(Image.new("RGB", (4, 4), (number * 50, 0, 0)))),
                ("txt", f"red level {number}".encode()),
            ):
                info = tarfile.TarInfo(f"{number:04d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = _write_recipe(tmp_path, "splits: {train: [{kind: webdataset, path: 'shard-{0..0}.tar'}]}")
    samples = load_recipe(path).stream("train").take(6)
    assert all(isinstance(s.record, WebDatasetSample) and s.task == "t2i" for s in samples)
    for sample in samples:
        level = int(sample.record.caption.rsplit(" ", 1)[1])
        assert sample.record.image_bytes is None  # offsets only; bytes read on demand
        assert sample.record.load_image().getpixel((0, 0)) == (level * 50, 0, 0)


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
