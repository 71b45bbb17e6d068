"""`dualtoken data validate`: a clean shapes-world dataset passes; every kind of defect, made on real files,
is reported with its file, record and what was expected, and the exit code says so."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from data_recipes import cli as data_cli
from data_recipes.shapes_dataset import write_shapes_dataset
from data_recipes.validate import detect_format, validate_dataset
from data_recipes.validate.checks import Problem


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and printed output (stdout, then stderr) of `dualtoken data validate ARGV`."""
    parser = argparse.ArgumentParser(prog="dualtoken")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "validate", *argv, "--no-progress"])
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _problem_lines(out: str, kind: str) -> list[str]:
    return [line for line in out.splitlines() if line.endswith(f"[{kind}]")]


def _assert_reported(out: str, file: Path, record: str, kind: str, expected: str) -> str:
    """The printed problem of `kind` for `record` of `file`; its message must hold `expected`."""
    lines = [line for line in _problem_lines(out, kind) if line.startswith(f"{file}: record {record}")]
    assert lines, f"no [{kind}] problem for {file} record {record} in:\n{out}"
    assert expected in lines[0], lines[0]
    return lines[0]


def _read(path: Path):
    return json.loads(path.read_text())


def _write(path: Path, payload) -> None:
    path.write_text(json.dumps(payload))


def _edit_jsonl(path: Path, line: int, edit: Callable[[dict], None]) -> None:
    rows = path.read_text().splitlines()
    row = json.loads(rows[line - 1])
    edit(row)
    rows[line - 1] = json.dumps(row)
    path.write_text("\n".join(rows) + "\n")


def _png(path: Path, size: int = 32) -> None:
    Image.new("RGB", (size, size), (200, 30, 30)).save(path, format="PNG")


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
    code, out = _run([str(clean_dataset)], capsys)
    assert code == 0, out
    report = validate_dataset(clean_dataset, progress=False)
    assert report.ok and report.format == "shapes" and report.images_checked == 40
    manifest = _read(clean_dataset / "manifest.json")
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
        entries = _read(d / "train/llava.json")
        edit(next(entry for entry in entries if entry["id"] == record_id))
        _write(d / "train/llava.json", entries)

    return mutate


def _edit_json(relative: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        payload = _read(d / relative)
        edit(payload)
        _write(d / relative, payload)

    return mutate


def _empty_answer(payload: dict) -> None:
    annotation = next(a for a in payload["annotations"] if a["question_id"] == 10)
    annotation["multiple_choice_answer"] = ""
    for answer in annotation["answers"]:
        answer["answer"] = ""


def _duplicate_first_llava(d: Path) -> None:
    entries = _read(d / "train/llava.json")
    _write(d / "train/llava.json", [*entries, dict(entries[0])])


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
    _png(d / "train/images/0000006.png", size=16)


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
        lambda d: _edit_jsonl(d / "train/prompts.jsonl", 1, lambda row: row.pop("prompt")),
        "train/prompts.jsonl",
        "0 (line 1)",
        "missing_field",
        "missing 'prompt'; expected a non-empty string",
    ),
    (
        lambda d: _edit_jsonl(d / "train/scenes.jsonl", 2, lambda row: row.pop("scene")),
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
        lambda d: _edit_jsonl(d / "train/scenes.jsonl", 3, lambda row: row.update(heldout="no")),
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
        lambda d: _edit_jsonl(d / "train/prompts.jsonl", 1, lambda row: row.update(prompt="")),
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
        lambda d: _edit_jsonl(
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
        lambda d: _edit_jsonl(d / "train/scenes.jsonl", 6, lambda row: row.update(file="images/0000007.png")),
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
        lambda d: _edit_jsonl(d / "train/scenes.jsonl", 9, _unknown_color),
        "train/scenes.jsonl",
        "image 8 (line 9)",
        "invalid_scene",
        "'mauve' is not one of",
    ),
    (
        lambda d: _edit_jsonl(d / "train/scenes.jsonl", 8, _leak_heldout_pair),
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
    code, out = _run([str(dataset)], capsys)
    assert code == 1, out
    _assert_reported(out, dataset / file, record, kind, expected)
    assert out.rstrip().splitlines()[-1].startswith(f"FAILED: {dataset} (shapes)")
    assert f"{kind} " in out.split("\ntotal ")[1]  # the summary table counts it


def test_a_wrong_scene_file_is_one_problem_not_a_cascade(dataset):
    _edit_jsonl(dataset / "train/scenes.jsonl", 6, lambda row: row.update(file="images/0000007.png"))
    report = validate_dataset(dataset, progress=False)
    assert [(p.file, p.record, p.kind) for p in report.problems] == [
        (str(dataset / "train/scenes.jsonl"), "image 5 (line 6)", "inconsistent")
    ]


def test_missing_split_file_and_problem_cap(dataset, capsys):
    (dataset / "val/captions.json").unlink()
    for name in ("0000001.png", "0000002.png"):
        (dataset / "train/images" / name).unlink()
    code, out = _run([str(dataset), "--max-problems-shown", "1"], capsys)
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
    code, out = _run([str(dataset), "--no-images"], capsys)
    assert code == 1 and "[unreadable_image]" not in out


def test_max_pixels_rejects_large_images(dataset):
    report = validate_dataset(dataset, max_pixels=32 * 32 - 1, progress=False)
    assert report.kinds() == {"unreadable_image": 40}
    assert "above the limit of 1023 pixels" in report.problems[0].message


# --- single files of the real formats -------------------------------------------------------------------


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        _png(folder / name)
    return folder


def test_llava_file(images, tmp_path, capsys):
    path = tmp_path / "chat.json"
    good = [
        {
            "id": "x",
            "image": "imgs/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "A red square."},
            ],
        },
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        },
    ]
    _write(path, good)
    assert detect_format(path) == "llava"
    code, out = _run([str(path)], capsys)
    assert code == 0, out
    bad = [
        *good,
        {
            "id": "two",
            "image": ["imgs/a.png", "imgs/b.png"],
            "conversations": [{"from": "human", "value": "<image> vs ?"}, {"from": "gpt", "value": "Same."}],
        },
        {
            "id": "lost",
            "image": "imgs/gone.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}],
        },
        good[0],
    ]
    _write(path, bad)
    code, out = _run([str(path), "--format", "llava"], capsys)
    assert code == 1
    _assert_reported(out, path, "two", "placeholder_mismatch", "1 <image> placeholder(s) but 2 image(s)")
    _assert_reported(out, path, "lost", "missing_image", f"{tmp_path / 'imgs/gone.png'} not found")
    _assert_reported(out, path, "x", "duplicate_id", "expected unique ids")
    assert validate_dataset(path, progress=False).records_checked == {str(path): 5}


def test_coco_captions_file(images, tmp_path, capsys):
    path = tmp_path / "captions.json"
    payload = {
        "images": [{"id": 1, "file_name": "imgs/a.png", "width": 32, "height": 32}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "a red square"}],
    }
    _write(path, payload)
    code, out = _run([str(path)], capsys)
    assert code == 0 and "(coco_captions)" in out
    payload["annotations"] += [
        {"id": 11, "image_id": 5, "caption": "x"},
        {"id": 12, "image_id": 1, "caption": ""},
    ]
    payload["images"].append({"id": 2, "file_name": 7})
    _write(path, payload)
    code, out = _run([str(path)], capsys)
    assert code == 1
    _assert_reported(out, path, "annotation 11", "unknown_id", "image_id 5 is not in 'images'")
    _assert_reported(out, path, "annotation 12", "empty_caption", "expected a non-empty string")
    _assert_reported(out, path, "images[1]", "wrong_type", "expected {'id': int, 'file_name': str}")


def test_vqav2_pair_and_annotations_alone(images, tmp_path, capsys):
    (images / "5.png").write_bytes((images / "a.png").read_bytes())
    questions, annotations = tmp_path / "q.json", tmp_path / "a.json"
    _write(questions, {"questions": [{"question_id": 1, "image_id": 5, "question": "What color?"}]})
    answer = {
        "question_id": 1,
        "image_id": 5,
        "multiple_choice_answer": "red",
        "answers": [{"answer": "red", "answer_id": i} for i in range(1, 11)],
    }
    _write(annotations, {"annotations": [answer]})
    code, out = _run(
        [str(questions), "--annotations", str(annotations), "--image-pattern", "imgs/{image_id}.png"], capsys
    )
    assert code == 0, out
    _write(
        annotations, {"annotations": [answer, {**answer, "question_id": 2, "multiple_choice_answer": " "}]}
    )
    code, out = _run(
        [str(questions), "--annotations", str(annotations), "--image-pattern", "imgs/{image_id}.jpg"], capsys
    )
    assert code == 1
    _assert_reported(
        out, questions, "1", "missing_image", "imgs/5.jpg not found; expected an existing image file"
    )
    _assert_reported(
        out, annotations, "2", "empty_answer", "'multiple_choice_answer': expected a non-empty string"
    )
    code, out = _run([str(annotations)], capsys)  # annotations checked on their own
    assert code == 1 and detect_format(annotations) == "vqav2"
    _assert_reported(out, annotations, "2", "empty_answer", "expected a non-empty string")
    assert "[unknown_id]" not in out  # alone, a question-less annotation is not an orphan


def test_prompts_file(images, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt_id": "p1", "prompt": "a red square", "file": "imgs/a.png"}\n\n{"prompt": "a star"}\n'
    )
    code, out = _run([str(path)], capsys)
    assert code == 0, out
    path.write_text(
        '{"prompt_id": "p1", "prompt": "a red square"}\n{"prompt": "a star",\n{"prompt_id": "p1", '
        '"prompt": "again"}\n{"tag": "colors"}\n'
    )
    code, out = _run([str(path)], capsys)
    assert code == 1
    _assert_reported(out, path, "line 2", "malformed_json", "expected one UTF-8 JSON object per line")
    _assert_reported(out, path, "p1 (line 3)", "duplicate_id", "expected unique ids")
    _assert_reported(out, path, "4 (line 4)", "missing_field", "missing 'prompt'")
    assert validate_dataset(path, progress=False).records_checked == {str(path): 4}


def test_image_folder_with_broken_files(images, capsys):
    good = images / "a.png"
    (images / "cut.png").write_bytes(good.read_bytes()[:-30])
    (images / "text.png").write_text("not an image")
    (images / "notes.txt").write_text("ignored: not an image extension")
    code, out = _run([str(images)], capsys)
    assert code == 1 and "(image_folder)" in out
    _assert_reported(out, images, "cut.png", "unreadable_image", "truncated")
    _assert_reported(out, images, "text.png", "unreadable_image", "not a recognized image")
    assert validate_dataset(images, progress=False).records_checked == {str(images): 4}


def test_webdataset_shard(images, tmp_path, capsys):
    shard = tmp_path / "shard-000.tar"
    members = {
        "000.png": (images / "a.png").read_bytes(),
        "000.txt": b"a red square",
        "001.png": b"not an image at all",
        "001.txt": b"broken",
        "002.png": (images / "b.png").read_bytes(),
    }
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    code, out = _run([str(shard)], capsys)
    assert code == 1 and "(webdataset)" in out
    _assert_reported(out, shard, "001", "unreadable_image", "not a recognized image; expected one of PNG")
    _assert_reported(out, shard, "002", "missing_caption", "expected key.txt")
    report = validate_dataset(shard, progress=False)
    assert report.records_checked == {str(shard): 3} and report.images_checked == 1


def test_malformed_json_whose_format_cannot_be_detected(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{"questions": [\n  {"question_id": 1,,}\n]}')
    code, out = _run([str(path)], capsys)
    assert code == 1
    line = _problem_lines(out, "malformed_json")[0]
    assert line.startswith(f"{path}: record line 2 column 21: malformed JSON at line 2 column 21")


def test_bad_arguments_exit_2(tmp_path, capsys):
    code, out = _run([str(tmp_path / "nothing-here")], capsys)
    assert code == 2 and "no such file or directory" in out
    (tmp_path / "x.json").write_text('{"something": 1}')
    code, out = _run([str(tmp_path / "x.json")], capsys)
    assert code == 2 and "cannot tell the format" in out and "pass --format" in out
