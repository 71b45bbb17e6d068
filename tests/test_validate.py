"""`dualtoken data validate`: a clean shapes-world dataset passes; every kind of defect, made on real files,
is reported with its file, record and what was expected, and the exit code says so."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from validate_testing import (
    assert_reported,
    edit_jsonl,
    read_json,
    run_validate,
    write_json,
    write_png,
)

from data_recipes.shapes_dataset import write_shapes_dataset
from data_recipes.validate import validate_dataset
from data_recipes.validate.checks import Problem


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("validate") / "shapes"
    write_shapes_dataset(out, n=40, size=32, seed=1, workers=0, verbose=False)
    return out


@pytest.fixture
def dataset(clean_dataset, tmp_path) -> Path:
    copy = tmp_path / "shapes"
    shutil.copytree(clean_dataset, copy)
    return copy


def test_clean_shapes_dataset_passes_with_every_file_counted(clean_dataset, capsys):
    code, out = run_validate([str(clean_dataset)], capsys)
    assert code == 0, out
    report = validate_dataset(clean_dataset, progress=False)
    assert report.ok and report.format == "shapes" and report.images_checked == 40
    manifest = read_json(clean_dataset / "manifest.json")
    train = manifest["splits"]["train"]
    checked = report.records_checked
    assert checked[str(clean_dataset / "train" / "scenes.jsonl")] == train
    assert checked[str(clean_dataset / "train" / "images")] == train
    assert checked[str(clean_dataset / "train" / "llava.json")] == 3 * train
    assert checked[str(clean_dataset / "train" / "captions.json")] == 7 * train  # one image + six captions
    assert checked[str(clean_dataset / "train" / "vqa_annotations.json")] == 3 * train
    for split in ("train", "val", "test"):
        for name in ("scenes.jsonl", "llava.json", "captions.json", "vqa_questions.json", "prompts.jsonl"):
            assert f"{split}/{name}" in out  # a table row per file
    assert out.rstrip().splitlines()[-1].startswith(f"OK: {clean_dataset} (shapes) has no problems")


def test_console_script_validates_the_clean_dataset(clean_dataset, capsys):
    from mllm.console import main

    assert main(["data", "validate", str(clean_dataset), "--no-progress"]) == 0
    assert "has no problems" in capsys.readouterr().out


# --- every defect kind on a shapes-world dataset: (mutation, file, record, kind, what the message expects)


def _truncate_png(d: Path) -> None:
    path = d / "train/images/0000004.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _text_as_png(d: Path) -> None:
    (d / "train/images/0000005.png").write_text("this is not an image\n")


def _break_llava_json(d: Path) -> None:
    path = d / "train/llava.json"
    path.write_text(path.read_text().replace(',"image"', '"image"', 1))


def _break_prompt_line(d: Path) -> None:
    path = d / "train/prompts.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-5]
    path.write_text("\n".join(lines) + "\n")


def _break_scene_line(d: Path) -> None:
    path = d / "train/scenes.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(":", "", 1)
    path.write_text("\n".join(lines) + "\n")


def _edit_llava(record_id: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        entries = read_json(d / "train/llava.json")
        edit(next(entry for entry in entries if entry["id"] == record_id))
        write_json(d / "train/llava.json", entries)

    return mutate


def _edit_json(relative: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        payload = read_json(d / relative)
        edit(payload)
        write_json(d / relative, payload)

    return mutate


def _empty_answer(payload: dict) -> None:
    annotation = next(a for a in payload["annotations"] if a["question_id"] == 10)
    annotation["multiple_choice_answer"] = ""
    for answer in annotation["answers"]:
        answer["answer"] = ""


def _duplicate_first_llava(d: Path) -> None:
    entries = read_json(d / "train/llava.json")
    write_json(d / "train/llava.json", [*entries, dict(entries[0])])


def _duplicate_question(payload: dict) -> None:
    payload["questions"][1]["question_id"] = payload["questions"][0]["question_id"]


def _caption_for_unknown_image(payload: dict) -> None:
    payload["annotations"][2]["image_id"] = 999


def _captions_of_unknown_scene(payload: dict) -> None:
    payload["images"][0]["id"] = 888
    for annotation in payload["annotations"]:
        if annotation["image_id"] == 0:
            annotation["image_id"] = 888


def _orphan_annotation(payload: dict) -> None:
    payload["annotations"].append({**payload["annotations"][0], "question_id": 99999})


def _drop_annotation(payload: dict) -> None:
    payload["annotations"] = [a for a in payload["annotations"] if a["question_id"] != 11]


def _unlisted_image(d: Path) -> None:
    shutil.copy(d / "train/images/0000001.png", d / "train/images/0000999.png")


def _small_image(d: Path) -> None:
    write_png(d / "train/images/0000006.png", size=16)


def _unknown_color(row: dict) -> None:
    row["scene"]["objects"][0]["color"] = "mauve"


def _leak_heldout_pair(row: dict) -> None:
    row["scene"]["objects"][0].update(color="red", shape="star")


DEFECTS = [
    # missing and unreadable images (one problem per image, at its first reference: the scene)
    (
        lambda d: (d / "train/images/0000003.png").unlink(),
        "train/scenes.jsonl",
        "image 3 (line 4)",
        "missing_image",
        "not found; expected an existing image file",
    ),
    (_truncate_png, "train/scenes.jsonl", "image 4 (line 5)", "unreadable_image", "expected a complete PNG"),
    (
        _text_as_png,
        "train/scenes.jsonl",
        "image 5 (line 6)",
        "unreadable_image",
        "not a recognized image; expected one of PNG",
    ),
    (_small_image, "train/scenes.jsonl", "image 6 (line 7)", "size_mismatch", "is 16x16; expected 32x32"),
    # malformed JSON: line and column for JSON files, the line for JSONL
    (
        _break_llava_json,
        "train/llava.json",
        "line 1 column",
        "malformed_json",
        "expected a LLaVA conversation file",
    ),
    (
        _break_prompt_line,
        "train/prompts.jsonl",
        "line 2",
        "malformed_json",
        "expected one UTF-8 JSON object per line",
    ),
    (
        _break_scene_line,
        "train/scenes.jsonl",
        "line 3",
        "malformed_json",
        "expected one JSON object per line",
    ),
    # missing fields and wrong types
    (
        _edit_llava("1-chat", lambda e: e.pop("conversations")),
        "train/llava.json",
        "1-chat",
        "missing_field",
        "'conversations': expected a non-empty list",
    ),
    (
        lambda d: edit_jsonl(d / "train/prompts.jsonl", 1, lambda row: row.pop("prompt")),
        "train/prompts.jsonl",
        "0 (line 1)",
        "missing_field",
        "missing 'prompt'; expected a non-empty string",
    ),
    (
        lambda d: edit_jsonl(d / "train/scenes.jsonl", 2, lambda row: row.pop("scene")),
        "train/scenes.jsonl",
        "image 1 (line 2)",
        "missing_field",
        "missing 'scene'; expected",
    ),
    (
        _edit_llava("2-vqa", lambda e: e["conversations"][1].update(value=5)),
        "train/llava.json",
        "2-vqa",
        "wrong_type",
        "expected {'from'",
    ),
    (
        lambda d: edit_jsonl(d / "train/scenes.jsonl", 3, lambda row: row.update(heldout="no")),
        "train/scenes.jsonl",
        "image 2 (line 3)",
        "wrong_type",
        "'heldout': expected true or false, got 'no'",
    ),
    # <image> placeholders against images
    (
        _edit_llava("0-caption", lambda e: e["conversations"][0].update(value="Describe it.")),
        "train/llava.json",
        "0-caption",
        "placeholder_mismatch",
        "0 <image> placeholder(s) but 1 image(s); expected one per image",
    ),
    # empty answer, caption, prompt
    (
        _edit_json("train/vqa_annotations.json", _empty_answer),
        "train/vqa_annotations.json",
        "10",
        "empty_answer",
        "expected {'answer': non-empty str}",
    ),
    (
        _edit_llava("1-vqa", lambda e: e["conversations"][1].update(value="  ")),
        "train/llava.json",
        "1-vqa",
        "empty_answer",
        "conversations[1]: empty answer; expected a non-empty answer",
    ),
    (
        _edit_json("train/captions.json", lambda p: p["annotations"][3].update(caption=" ")),
        "train/captions.json",
        "annotation 3",
        "empty_caption",
        "'caption': expected a non-empty string",
    ),
    (
        lambda d: edit_jsonl(d / "train/prompts.jsonl", 1, lambda row: row.update(prompt="")),
        "train/prompts.jsonl",
        "0 (line 1)",
        "empty_prompt",
        "'prompt': expected a non-empty string",
    ),
    # duplicate ids (within a file, across splits)
    (_duplicate_first_llava, "train/llava.json", "0-caption", "duplicate_id", "expected unique ids"),
    (
        _edit_json("train/vqa_questions.json", _duplicate_question),
        "train/vqa_questions.json",
        "0",
        "duplicate_id",
        "duplicate question_id; expected unique ids",
    ),
    (
        lambda d: edit_jsonl(
            d / "val/scenes.jsonl", 1, lambda row: row.update(image_id=0, file="images/0000000.png")
        ),
        "val/scenes.jsonl",
        "image 0 (line 1)",
        "duplicate_id",
        "already used in split train; expected unique ids",
    ),
    # unknown referenced ids; VQA questions and annotations one to one
    (
        _edit_json("train/captions.json", _caption_for_unknown_image),
        "train/captions.json",
        "annotation 2",
        "unknown_id",
        "image_id 999 is not in 'images'",
    ),
    (
        _edit_json("train/captions.json", _captions_of_unknown_scene),
        "train/captions.json",
        "image 888",
        "unknown_id",
        "image_id 888 is not a scene of this split; expected an id in scenes.jsonl",
    ),
    (
        _edit_json("train/vqa_annotations.json", _orphan_annotation),
        "train/vqa_annotations.json",
        "99999",
        "unknown_id",
        "annotation without a question",
    ),
    (
        _edit_json("train/vqa_questions.json", lambda p: p["questions"][0].update(image_id=777)),
        "train/vqa_questions.json",
        "0",
        "image_id_mismatch",
        "image_id 777 but its annotation says 0",
    ),
    (
        _edit_llava("3-chat", lambda e: e.update(image="images/0000777.png")),
        "train/llava.json",
        "3-chat",
        "unknown_id",
        "is not a scene of this split; expected one listed in scenes.jsonl",
    ),
    (
        _edit_json("train/vqa_annotations.json", _drop_annotation),
        "train/vqa_questions.json",
        "11",
        "missing_annotation",
        "no annotation in",
    ),
    # shapes-world cross-file consistency
    (
        _unlisted_image,
        "train/images",
        "0000999.png",
        "unlisted_image",
        "not listed in scenes.jsonl; expected every image file to have a scene",
    ),
    (
        lambda d: edit_jsonl(d / "train/scenes.jsonl", 6, lambda row: row.update(file="images/0000007.png")),
        "train/scenes.jsonl",
        "image 5 (line 6)",
        "inconsistent",
        "expected 'images/0000005.png' for image_id 5",
    ),
    (
        _edit_json("manifest.json", lambda m: m["splits"].update(train=m["splits"]["train"] - 1)),
        "manifest.json",
        "splits.train",
        "count_mismatch",
        "train/scenes.jsonl has",
    ),
    (
        lambda d: edit_jsonl(d / "train/scenes.jsonl", 9, _unknown_color),
        "train/scenes.jsonl",
        "image 8 (line 9)",
        "invalid_scene",
        "'mauve' is not one of",
    ),
    (
        lambda d: edit_jsonl(d / "train/scenes.jsonl", 8, _leak_heldout_pair),
        "train/scenes.jsonl",
        "image 7 (line 8)",
        "heldout_leak",
        "expected held-out pairs in test only",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "file", "record", "kind", "expected"),
    DEFECTS,
    ids=[f"{d[3]}-{i}" for i, d in enumerate(DEFECTS)],
)
def test_each_defect_is_reported_with_file_record_and_expectation(
    dataset, capsys, mutate, file, record, kind, expected
):
    mutate(dataset)
    code, out = run_validate([str(dataset)], capsys)
    assert code == 1, out
    assert_reported(out, dataset / file, record, kind, expected)
    assert out.rstrip().splitlines()[-1].startswith(f"FAILED: {dataset} (shapes)")
    assert f"{kind} " in out.split("\ntotal ")[1]  # the summary table counts it


def test_a_wrong_scene_file_is_one_problem_not_a_cascade(dataset):
    edit_jsonl(dataset / "train/scenes.jsonl", 6, lambda row: row.update(file="images/0000007.png"))
    report = validate_dataset(dataset, progress=False)
    assert [(p.file, p.record, p.kind) for p in report.problems] == [
        (str(dataset / "train/scenes.jsonl"), "image 5 (line 6)", "inconsistent")
    ]


def test_missing_split_file_and_problem_cap(dataset, capsys):
    (dataset / "val/captions.json").unlink()
    for name in ("0000001.png", "0000002.png"):
        (dataset / "train/images" / name).unlink()
    code, out = run_validate([str(dataset), "--max-problems-shown", "1"], capsys)
    assert code == 1
    report = validate_dataset(dataset, progress=False)
    assert report.kinds() == {"missing_file": 1, "missing_image": 2}
    problem = next(p for p in report.problems if p.kind == "missing_file")
    assert problem == Problem(str(dataset / "val/captions.json"), None, "missing_file", problem.message)
    assert "expected a COCO captions JSON file" in problem.message
    assert len([line for line in out.splitlines() if line.endswith("]")]) == 1
    assert "... and 2 more problem(s)" in out


def test_no_images_still_finds_missing_images_but_does_not_decode(dataset, capsys):
    _text_as_png(dataset)
    (dataset / "train/images/0000003.png").unlink()
    report = validate_dataset(dataset, check_images=False, progress=False)
    assert report.kinds() == {"missing_image": 1} and report.images_checked == 0
    code, out = run_validate([str(dataset), "--no-images"], capsys)
    assert code == 1 and "[unreadable_image]" not in out


def test_max_pixels_rejects_large_images(dataset):
    report = validate_dataset(dataset, max_pixels=32 * 32 - 1, progress=False)
    assert report.kinds() == {"unreadable_image": 40}
    assert "above the limit of 1023 pixels" in report.problems[0].message
