"""`dualtoken data validate` on single files of the real formats (LLaVA, COCO captions, VQAv2, T2I prompts,
image folders, WebDataset shards): each defect is reported with its file, record and what was expected, and bad
arguments exit 2."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from validate_testing import (
    assert_reported,
    problem_lines,
    run_validate,
    write_json,
    write_png,
)

from data_recipes.validate import detect_format, validate_dataset

# --- single files of the real formats -------------------------------------------------------------------


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        write_png(folder / name)
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
    write_json(path, good)
    assert detect_format(path) == "llava"
    code, out = run_validate([str(path)], capsys)
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
    write_json(path, bad)
    code, out = run_validate([str(path), "--format", "llava"], capsys)
    assert code == 1
    assert_reported(out, path, "two", "placeholder_mismatch", "1 <image> placeholder(s) but 2 image(s)")
    assert_reported(out, path, "lost", "missing_image", f"{tmp_path / 'imgs/gone.png'} not found")
    assert_reported(out, path, "x", "duplicate_id", "expected unique ids")
    assert validate_dataset(path, progress=False).records_checked == {str(path): 5}


def test_coco_captions_file(images, tmp_path, capsys):
    path = tmp_path / "captions.json"
    payload = {
        "images": [{"id": 1, "file_name": "imgs/a.png", "width": 32, "height": 32}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "a red square"}],
    }
    write_json(path, payload)
    code, out = run_validate([str(path)], capsys)
    assert code == 0 and "(coco_captions)" in out
    payload["annotations"] += [
        {"id": 11, "image_id": 5, "caption": "x"},
        {"id": 12, "image_id": 1, "caption": ""},
    ]
    payload["images"].append({"id": 2, "file_name": 7})
    write_json(path, payload)
    code, out = run_validate([str(path)], capsys)
    assert code == 1
    assert_reported(out, path, "annotation 11", "unknown_id", "image_id 5 is not in 'images'")
    assert_reported(out, path, "annotation 12", "empty_caption", "expected a non-empty string")
    assert_reported(out, path, "images[1]", "wrong_type", "expected {'id': int, 'file_name': str}")


def test_vqav2_pair_and_annotations_alone(images, tmp_path, capsys):
    (images / "5.png").write_bytes((images / "a.png").read_bytes())
    questions, annotations = tmp_path / "q.json", tmp_path / "a.json"
    write_json(questions, {"questions": [{"question_id": 1, "image_id": 5, "question": "What color?"}]})
    answer = {
        "question_id": 1,
        "image_id": 5,
        "multiple_choice_answer": "red",
        "answers": [{"answer": "red", "answer_id": i} for i in range(1, 11)],
    }
    write_json(annotations, {"annotations": [answer]})
    code, out = run_validate(
        [str(questions), "--annotations", str(annotations), "--image-pattern", "imgs/{image_id}.png"], capsys
    )
    assert code == 0, out
    write_json(
        annotations, {"annotations": [answer, {**answer, "question_id": 2, "multiple_choice_answer": " "}]}
    )
    code, out = run_validate(
        [str(questions), "--annotations", str(annotations), "--image-pattern", "imgs/{image_id}.jpg"], capsys
    )
    assert code == 1
    assert_reported(
        out, questions, "1", "missing_image", "imgs/5.jpg not found; expected an existing image file"
    )
    assert_reported(
        out, annotations, "2", "empty_answer", "'multiple_choice_answer': expected a non-empty string"
    )
    code, out = run_validate([str(annotations)], capsys)  # annotations checked on their own
    assert code == 1 and detect_format(annotations) == "vqav2"
    assert_reported(out, annotations, "2", "empty_answer", "expected a non-empty string")
    assert "[unknown_id]" not in out  # alone, a question-less annotation is not an orphan


def test_prompts_file(images, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt_id": "p1", "prompt": "a red square", "file": "imgs/a.png"}\n\n{"prompt": "a star"}\n'
    )
    code, out = run_validate([str(path)], capsys)
    assert code == 0, out
    path.write_text(
        '{"prompt_id": "p1", "prompt": "a red square"}\n{"prompt": "a star",\n{"prompt_id": "p1", '
        '"prompt": "again"}\n{"tag": "colors"}\n'
    )
    code, out = run_validate([str(path)], capsys)
    assert code == 1
    assert_reported(out, path, "line 2", "malformed_json", "expected one UTF-8 JSON object per line")
    assert_reported(out, path, "p1 (line 3)", "duplicate_id", "expected unique ids")
    assert_reported(out, path, "4 (line 4)", "missing_field", "missing 'prompt'")
    assert validate_dataset(path, progress=False).records_checked == {str(path): 4}


def test_image_folder_with_broken_files(images, capsys):
    good = images / "a.png"
    (images / "cut.png").write_bytes(good.read_bytes()[:-30])
    (images / "text.png").write_text("not an image")
    (images / "notes.txt").write_text("ignored: not an image extension")
    code, out = run_validate([str(images)], capsys)
    assert code == 1 and "(image_folder)" in out
    assert_reported(out, images, "cut.png", "unreadable_image", "truncated")
    assert_reported(out, images, "text.png", "unreadable_image", "not a recognized image")
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
    code, out = run_validate([str(shard)], capsys)
    assert code == 1 and "(webdataset)" in out
    assert_reported(out, shard, "001", "unreadable_image", "not a recognized image; expected one of PNG")
    assert_reported(out, shard, "002", "missing_caption", "expected key.txt")
    report = validate_dataset(shard, progress=False)
    assert report.records_checked == {str(shard): 3} and report.images_checked == 1


def test_malformed_json_whose_format_cannot_be_detected(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{"questions": [\n  {"question_id": 1,,}\n]}')
    code, out = run_validate([str(path)], capsys)
    assert code == 1
    line = problem_lines(out, "malformed_json")[0]
    assert line.startswith(f"{path}: record line 2 column 21: malformed JSON at line 2 column 21")


def test_bad_arguments_exit_2(tmp_path, capsys):
    code, out = run_validate([str(tmp_path / "nothing-here")], capsys)
    assert code == 2 and "no such file or directory" in out
    (tmp_path / "x.json").write_text('{"something": 1}')
    code, out = run_validate([str(tmp_path / "x.json")], capsys)
    assert code == 2 and "cannot tell the format" in out and "pass --format" in out
