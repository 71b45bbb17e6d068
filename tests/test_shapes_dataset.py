"""Shapes dataset writer: on-disk contract, splits, held-out pairs, determinism, atomic writes and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_recipes.scene_parser import parse_scene
from data_recipes.shapes import Scene
from data_recipes.shapes_dataset import DEFAULT_HELDOUT, SPLITS, register, write_shapes_dataset
from data_recipes.shapes_prompts import prompt_satisfied
from data_recipes.shapes_text import TAGS

HELDOUT = {tuple(pair) for pair in DEFAULT_HELDOUT}
HELDOUT_PHRASE = re.compile("|".join(rf"\b{color} {shape}" for color, shape in DEFAULT_HELDOUT))
TEXT_FILES = ("scenes.jsonl", "llava.json", "captions.json", "vqa_questions.json", "prompts.jsonl")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "data"
    write_shapes_dataset(out, n=240, size=64, seed=3, workers=0, verbose=False)
    return out


def test_every_contract_file_is_written_and_counts_match(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["format"] == "dualtoken-shapes" and manifest["version"] == 2
    assert (manifest["seed"], manifest["size"], manifest["n"]) == (3, 64, 240)
    assert sum(manifest["splits"].values()) == 240 and manifest["splits"]["train"] == 216
    assert {tuple(pair) for pair in manifest["heldout_pairs"]} == HELDOUT
    classes = json.loads((dataset / "classes.json").read_text())
    assert len(classes["classes"]) == len(classes["colors"]) * len(classes["shapes"])
    image_ids = []
    for split in SPLITS:
        files = manifest["files"][split]
        for key in ("images", "scenes", "llava", "captions", "vqa_questions", "vqa_annotations", "prompts"):
            assert (dataset / files[key]).exists(), files[key]
        split_dir = dataset / split
        scenes = _read_jsonl(dataset / files["scenes"])
        assert len(scenes) == manifest["splits"][split]
        assert len(list((split_dir / "images").glob("*.png"))) == len(scenes)
        for row in scenes:
            assert row["file"] == f"images/{row['image_id']:07d}.png"
            Scene.from_dict(row["scene"])
            image_ids.append(row["image_id"])
        files_by_id = {row["image_id"]: row["file"] for row in scenes}

        coco = json.loads((split_dir / "captions.json").read_text())
        assert {image["id"] for image in coco["images"]} == set(files_by_id)
        per_image = Counter(annotation["image_id"] for annotation in coco["annotations"])
        assert min(per_image.values()) >= 5 and len({a["id"] for a in coco["annotations"]}) == len(
            coco["annotations"]
        )

        questions = json.loads((split_dir / "vqa_questions.json").read_text())["questions"]
        annotations = json.loads((split_dir / "vqa_annotations.json").read_text())["annotations"]
        assert [q["question_id"] for q in questions] == [a["question_id"] for a in annotations]
        for annotation in annotations:
            assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
            assert {a["answer"] for a in annotation["answers"]} == {annotation["multiple_choice_answer"]}
            assert annotation["answer_type"] in ("yes/no", "number", "other")
        answers = Counter(a["multiple_choice_answer"] for a in annotations if a["answer_type"] == "yes/no")
        assert abs(answers["yes"] - answers["no"]) <= 2

        llava = json.loads((split_dir / "llava.json").read_text())
        kinds = Counter(entry["id"].rsplit("-", 1)[1] for entry in llava)
        assert kinds == {"caption": len(scenes), "vqa": len(scenes), "chat": len(scenes)}
        for entry in llava:
            assert entry["image"] in files_by_id.values()
            assert entry["conversations"][0]["from"] == "human"
            assert entry["conversations"][0]["value"].startswith("<image>\n")

        for prompt in _read_jsonl(split_dir / "prompts.jsonl"):
            assert prompt["tag"] in TAGS and files_by_id[prompt["image_id"]] == prompt["file"]
            image = Image.open(split_dir / prompt["file"])
            assert prompt_satisfied(prompt, parse_scene(image))
    assert len(image_ids) == len(set(image_ids)) == 240


def test_rendered_images_parse_back_to_their_scenes(dataset):
    for row in _read_jsonl(dataset / "val" / "scenes.jsonl"):
        assert parse_scene(Image.open(dataset / "val" / row["file"])) == Scene.from_dict(row["scene"])


def test_splits_are_disjoint_by_scene(dataset):
    keys = {}
    for split in SPLITS:
        keys[split] = {
            json.dumps(row["scene"], sort_keys=True) for row in _read_jsonl(dataset / split / "scenes.jsonl")
        }
    assert (
        not keys["train"] & keys["val"]
        and not keys["train"] & keys["test"]
        and not keys["val"] & keys["test"]
    )


def test_heldout_pairs_never_reach_train_or_val_but_are_tested(dataset):
    for split in ("train", "val"):
        for row in _read_jsonl(dataset / split / "scenes.jsonl"):
            assert not row["heldout"]
            assert not {(o["color"], o["shape"]) for o in row["scene"]["objects"]} & HELDOUT
        for name in TEXT_FILES:
            text = (dataset / split / name).read_text()
            assert not HELDOUT_PHRASE.search(text), (split, name, HELDOUT_PHRASE.search(text)[0])
    test_rows = _read_jsonl(dataset / "test" / "scenes.jsonl")
    flagged = [row for row in test_rows if row["heldout"]]
    assert 0 < len(flagged) < len(test_rows)
    for row in test_rows:
        pairs = {(o["color"], o["shape"]) for o in row["scene"]["objects"]}
        assert bool(pairs & HELDOUT) == row["heldout"]
    test_prompts = _read_jsonl(dataset / "test" / "prompts.jsonl")
    assert any(prompt["heldout"] for prompt in test_prompts)
    assert HELDOUT_PHRASE.search((dataset / "test" / "captions.json").read_text())


def test_output_is_deterministic_whatever_the_worker_count(tmp_path):
    write_shapes_dataset(tmp_path / "a", n=60, seed=11, workers=0, verbose=False)
    write_shapes_dataset(tmp_path / "b", n=60, seed=11, workers=2, verbose=False)
    write_shapes_dataset(tmp_path / "c", n=60, seed=12, workers=0, verbose=False)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "a",
        "b",
        "c",
    ]  # no temporary directories left


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_the_dataset_and_refuses_to_clobber_a_different_one(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert _cli(["shapes", "--out", str(out), "--n", "40", "--seed", "1", "--workers", "0"]) == 0
    assert "scenes/s" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(manifest["splits"].values()) == 40
    for split, count in manifest["splits"].items():
        assert len(_read_jsonl(out / split / "scenes.jsonl")) == count
    before = _tree_digest(out)
    assert (
        _cli(["shapes", "--out", str(out), "--n", "40", "--seed", "1", "--workers", "0"]) == 0
    )  # same: kept
    assert "already holds" in capsys.readouterr().out and _tree_digest(out) == before
    assert _cli(["shapes", "--out", str(out), "--n", "40", "--seed", "2", "--workers", "0"]) == 2
    assert "--force" in capsys.readouterr().err and _tree_digest(out) == before
    assert _cli(["shapes", "--out", str(out), "--n", "40", "--seed", "2", "--workers", "0", "--force"]) == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 2
    stray = tmp_path / "other"
    stray.mkdir()
    (stray / "notes.txt").write_text("keep me")
    assert _cli(["shapes", "--out", str(stray), "--n", "40"]) == 2 and (stray / "notes.txt").exists()
    assert _cli(["shapes", "--out", str(tmp_path / "x"), "--n", "40", "--heldout", "red:blob"]) == 2
    assert "heldout_pairs" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other", "shapes"]
