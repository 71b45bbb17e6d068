"""Real-format loaders (data_recipes.loaders) on a shapes-world dataset and on malformed fixtures, in both
on_bad_sample modes."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from data_recipes.loaders import open_loader
from data_recipes.loaders.base import DataError, SkipCounter
from data_recipes.loaders.captions import CocoCaptionsLoader
from data_recipes.loaders.images import ImageFolderLoader, WebDatasetLoader, expand_shards
from data_recipes.loaders.llava import LlavaLoader
from data_recipes.loaders.prompts import PromptsLoader
from data_recipes.loaders.vqa import VQALoader
from data_recipes.shapes_dataset import write_shapes_dataset
from data_recipes.shapes_text import TAGS

SHAPES_PATTERN = "images/{image_id:07d}.png"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "data"
    manifest = write_shapes_dataset(root, n=40, size=32, workers=0, verbose=False)
    return root, manifest


def _png(color=(200, 30, 30), size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _image(path, color=(200, 30, 30), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(color, size))
    return path


def _json(path, payload):
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def _only_error(loader) -> DataError:
    with pytest.raises(DataError) as caught:
        list(loader)
    return caught.value


# --- the shapes world, read back through every loader -----------------------------------------------------


def test_shapes_llava(shapes):
    root, manifest = shapes
    records = LlavaLoader(root / "train" / "llava.json", check_images=True).load()
    assert len(records) == 3 * manifest["splits"]["train"]
    assert len({record.id for record in records}) == len(records)
    record = records[0]
    assert record.image_paths == (root / "train" / "images" / "0000000.png",)
    assert record.conversations[0].role == "human" and "<image>" in record.conversations[0].value
    assert [turn.role for turn in record.conversations[1:2]] == ["gpt"]
    (image,) = record.load_images()
    assert image.mode == "RGB" and image.size == (32, 32)


def test_shapes_coco_captions(shapes):
    root, manifest = shapes
    records = CocoCaptionsLoader(root / "train" / "captions.json", check_images=True).load()
    assert len(records) == manifest["splits"]["train"]
    assert all(len(record.captions) == 6 and all(c.strip() for c in record.captions) for record in records)
    assert records[3].image_path == root / "train" / "images" / f"{records[3].image_id:07d}.png"
    assert records[3].load_image().size == (32, 32) and (records[3].width, records[3].height) == (32, 32)


def test_shapes_vqav2(shapes):
    root, manifest = shapes
    split = root / "train"
    records = VQALoader(
        split / "vqa_questions.json",
        split / "vqa_annotations.json",
        image_pattern=SHAPES_PATTERN,
        check_images=True,
    ).load()
    assert len(records) == 3 * manifest["splits"]["train"]
    for record in records:
        assert len(record.answers) == 10 and set(record.answers) == {record.multiple_choice_answer}
        assert record.question_type in {"color", "shape", "count", "position", "existence"}
        assert record.image_path.is_file()
    assert {record.answer_type for record in records} <= {"other", "number", "yes/no"}


def test_shapes_prompts(shapes):
    root, _ = shapes
    path = root / "train" / "prompts.jsonl"
    records = PromptsLoader(path, check_images=True).load()
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(records) == len(lines) > 0
    assert [record.prompt for record in records] == [line["prompt"] for line in lines]
    assert {record.tag for record in records} <= set(TAGS)
    assert all(record.image_path.is_file() and not record.heldout for record in records)
    assert records[0].fields["include"] == lines[0]["include"]


def test_shapes_image_folder(shapes):
    root, _ = shapes
    records = ImageFolderLoader(root, check_images=True).load()
    assert len(records) == 40  # every scene's PNG, none of the JSON files
    assert {record.label for record in records} == {"train", "val", "test"}
    assert records == sorted(records, key=lambda record: record.id)  # deterministic order
    assert records[0].load_image().size == (32, 32)


# --- image folders --------------------------------------------------------------------------------------------


def test_image_folder_recursion_and_bad_images(tmp_path):
    _image(tmp_path / "cats" / "a.PNG")
    _image(tmp_path / "cats" / "deep" / "b.jpg.png")
    _image(tmp_path / "top.png")
    _image(tmp_path / ".hidden" / "c.png")
    (tmp_path / "cats" / "readme.txt").write_text("not an image")
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "broken.png").write_bytes(_png()[:30])
    ids = [record.id for record in ImageFolderLoader(tmp_path)]
    assert ids == ["cats/a.PNG", "cats/deep/b.jpg.png", "dogs/broken.png", "top.png"]
    error = _only_error(ImageFolderLoader(tmp_path, check_images=True))
    assert error.record == "dogs/broken.png" and "broken.png" in str(error) and error.kind == "bad_image"
    loader = ImageFolderLoader(tmp_path, check_images=True, on_bad_sample="skip")
    assert [record.label for record in loader] == ["cats", "cats", None]
    assert loader.skips.counts == {"bad_image": 1}
    with pytest.raises(DataError, match="not a directory"):
        list(ImageFolderLoader(tmp_path / "missing", on_bad_sample="skip"))


# --- webdataset shards ----------------------------------------------------------------------------------------


def _shard(path, members: list[tuple[str, bytes]], mode: str = "w"):
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _good_members(start: int, count: int) -> list[tuple[str, bytes]]:
    members = []
    for number in range(start, start + count):
        key = f"{number:06d}"
        members.append((f"{key}.jpg", _png((number * 20 % 256, 0, 0))))  # extension says jpg: content decides
        if number % 2:
            members.append((f"{key}.json", json.dumps({"caption": f"caption {number}", "width": 8}).encode()))
        else:
            members.append((f"{key}.txt", f"caption {number}\n".encode()))
    return members


def test_webdataset_shards_brace_glob_and_lazy_images(tmp_path):
    _shard(tmp_path / "shard-000000.tar", _good_members(0, 3))
    _shard(tmp_path / "shard-000001.tar", _good_members(3, 2))
    for spec in (tmp_path / "shard-{000000..000001}.tar", str(tmp_path / "shard-*.tar")):
        samples = WebDatasetLoader(spec, check_images=True).load()
        assert [sample.key for sample in samples] == [f"{n:06d}" for n in range(5)]
        assert [sample.caption for sample in samples] == [f"caption {n}" for n in range(5)]
    assert samples[1].metadata == {"caption": "caption 1", "width": 8}
    assert samples[4].id == "shard-000001.tar:000004"
    assert samples[2].load_image().getpixel((0, 0)) == (40, 0, 0)
    by_offset = WebDatasetLoader(tmp_path / "shard-000001.tar", keep_image_bytes=False).load()
    assert by_offset[0].image_bytes is None and by_offset[0].load_image().getpixel((0, 0)) == (60, 0, 0)


def test_webdataset_compressed_shards(tmp_path):
    path = _shard(tmp_path / "packed.tar.gz", _good_members(0, 2), mode="w:gz")
    assert [sample.caption for sample in WebDatasetLoader(path)] == ["caption 0", "caption 1"]
    error = _only_error(WebDatasetLoader(path, keep_image_bytes=False))
    assert str(path) in str(error) and "uncompressed" in str(error)


def test_expand_shards():
    assert [p.name for p in expand_shards("s-{08..10}.tar")] == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert [p.name for p in expand_shards(["{a,b}-{1..2}.tar"])] == [
        "a-1.tar",
        "a-2.tar",
        "b-1.tar",
        "b-2.tar",
    ]
    with pytest.raises(DataError, match="no shard matches"):
        expand_shards("/nonexistent-dir/*.tar")


def test_webdataset_malformed_samples(tmp_path):
    members = (
        _good_members(0, 1)
        + [
            ("000001.txt", b"no image here"),
            ("000002.png", _png()),  # no caption
            ("000003.png", b"this is not a png"),
            ("000003.txt", b"bad image"),
            ("000004.png", _png()),
            ("000004.json", b"{not json"),
            ("000005.png", _png()),
            ("000005.txt", b"   "),
        ]
        + [("000000.png", _png()), ("000000.txt", b"the same key again")]
        + _good_members(6, 1)
    )
    path = _shard(tmp_path / "mixed.tar", members)
    error = _only_error(WebDatasetLoader(path))
    assert error.record == "000001" and str(path) in str(error) and "no image" in str(error)
    loader = WebDatasetLoader(path, on_bad_sample="skip", check_images=True)
    assert [sample.key for sample in loader] == ["000000", "000006"]
    assert loader.skips.counts == {
        "missing_image": 1,
        "missing_caption": 1,
        "bad_image": 1,
        "invalid_json": 1,
        "empty_caption": 1,
        "duplicate_key": 1,
    }
    assert "mixed.tar: record 000003: image 000003.png" in loader.skips.examples["bad_image"][0]


def test_webdataset_truncated_and_missing_shards(tmp_path):
    whole = _shard(tmp_path / "whole.tar", _good_members(0, 4)).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2 + 100])
    _shard(tmp_path / "next.tar", _good_members(10, 1))
    error = _only_error(WebDatasetLoader([cut, tmp_path / "next.tar"]))
    assert str(cut) in str(error) and error.kind == "bad_shard"
    loader = WebDatasetLoader([cut, tmp_path / "gone.tar", tmp_path / "next.tar"], on_bad_sample="skip")
    keys = [sample.key for sample in loader]
    assert keys[-1] == "000010" and set(keys[:-1]) < {"000000", "000001", "000002"}
    assert loader.skips.counts == {"bad_shard": 1, "missing_shard": 1}


# --- LLaVA -----------------------------------------------------------------------------------------------------


def _turns(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": value} for i, value in enumerate(values)]


LLAVA_BAD = [
    (
        {"id": "mismatch", "image": "a.png", "conversations": _turns("no placeholder", "x")},
        "placeholder_mismatch",
        "0 <image> placeholder(s) but 1 image(s)",
    ),
    (
        {"id": "two", "image": ["a.png"], "conversations": _turns("<image><image>", "x")},
        "placeholder_mismatch",
        "2 <image> placeholder(s) but 1 image(s)",
    ),
    ({"id": "noconv", "image": "a.png"}, "missing_field", "'conversations'"),
    ({"id": "role", "conversations": [{"from": "robot", "value": "hi"}]}, "wrong_type", "conversations[0]"),
    ({"id": "order", "conversations": _turns("q", "a")[::-1]}, "bad_turn_order", "expected 'human'"),
    ({"id": "empty", "conversations": _turns("q", "  ")}, "empty_answer", "empty answer"),
    ({"id": "imgtype", "image": 3, "conversations": _turns("<image>", "a")}, "wrong_type", "'image'"),
    (
        {"id": "missing", "image": "nowhere.png", "conversations": _turns("<image>", "a")},
        "missing_image",
        "file not found",
    ),
    ({"id": "good", "conversations": _turns("q", "a")}, "duplicate_id", "duplicate id"),
]


def test_llava_good_variants(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png", (0, 0, 255))
    records = [
        {"id": "text-only", "conversations": _turns("hello", "hi")},
        {"id": 7, "image": ["a.png", "b.png"], "conversations": _turns("<image> vs <image>", "a")},
        {
            "conversations": [{"from": "system", "value": "be brief"}, *_turns("<image>\nq", "a", "q2", "b")],
            "image": "b.png",
        },
    ]
    path = _json(tmp_path / "llava.json", records)
    loaded = LlavaLoader(path, image_root=tmp_path / "imgs", check_images=True).load()
    assert [record.id for record in loaded] == ["text-only", "7", "#2"]
    assert loaded[0].image_paths == () and loaded[0].image_path is None
    assert [p.name for p in loaded[1].image_paths] == ["a.png", "b.png"]
    assert [image.getpixel((0, 0)) for image in loaded[1].load_images()] == [(200, 30, 30), (0, 0, 255)]
    assert [turn.role for turn in loaded[2].conversations] == ["system", "human", "gpt", "human", "gpt"]


@pytest.mark.parametrize("entry,kind,fragment", LLAVA_BAD, ids=[case[0]["id"] for case in LLAVA_BAD])
def test_llava_bad_record_error_mode(tmp_path, entry, kind, fragment):
    _image(tmp_path / "a.png")
    path = _json(tmp_path / "llava.json", [{"id": "good", "conversations": _turns("q", "a")}, entry])
    error = _only_error(LlavaLoader(path, check_images=True))
    assert error.kind == kind and error.record == entry["id"]
    assert str(error).startswith(f"{path}: record {entry['id']}: ") and fragment in str(error)


def test_llava_skip_mode_counts_every_reason(tmp_path):
    _image(tmp_path / "a.png")
    good = {"id": "good", "conversations": _turns("q", "a")}
    path = _json(tmp_path / "llava.json", [good, "not a dict", *[entry for entry, _, _ in LLAVA_BAD]])
    loader = LlavaLoader(path, check_images=True, on_bad_sample="skip")
    assert [record.id for record in loader] == ["good"]
    expected = {"wrong_type": 3, "placeholder_mismatch": 2, "missing_field": 1, "bad_turn_order": 1}
    expected |= {"empty_answer": 1, "missing_image": 1, "duplicate_id": 1}
    assert loader.skips.counts == expected and loader.skips.total == 10
    assert "#1" in loader.skips.examples["wrong_type"][0]  # a record without id is named by its index
    report = loader.skips.report()
    assert "skipped 10 record(s)" in report and "placeholder_mismatch: 2" in report


def test_llava_whole_file_errors_raise_in_skip_mode(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("[{]")
    for path, fragment in ((bad_json, "cannot parse JSON"), (tmp_path / "none.json", "file not found")):
        with pytest.raises(DataError, match=fragment) as caught:
            list(LlavaLoader(path, on_bad_sample="skip"))
        assert str(path) in str(caught.value)
    with pytest.raises(DataError, match="expected a JSON list"):
        list(LlavaLoader(_json(tmp_path / "obj.json", {"id": 1}), on_bad_sample="skip"))
    with pytest.raises(ValueError, match="on_bad_sample"):
        LlavaLoader(bad_json, on_bad_sample="ignore")


# --- COCO captions ----------------------------------------------------------------------------------------------


def _coco(tmp_path, images, annotations):
    return _json(tmp_path / "captions.json", {"images": images, "annotations": annotations})


def test_coco_bad_records(tmp_path):
    _image(tmp_path / "1.png")
    _image(tmp_path / "2.png", size=(8, 6))
    _image(tmp_path / "4.png")
    images = [
        {"id": 1, "file_name": "1.png", "width": 8, "height": 6},
        {"id": 2, "file_name": "2.png", "width": 100, "height": 6},  # wrong size
        {"id": 3, "file_name": "3.png"},  # file missing
        {"id": 4, "file_name": "4.png"},  # no captions
        {"id": 5},  # no file_name
    ]
    annotations = [
        {"id": 10, "image_id": 1, "caption": "a red box"},
        {"id": 11, "image_id": 1, "caption": " "},
        {"id": 12, "image_id": 9, "caption": "orphan"},
        {"id": 13, "image_id": 2, "caption": "wrong size"},
        {"id": 14, "image_id": 3, "caption": "missing file"},
        {"id": 15, "image_id": 1, "caption": "another"},
    ]
    path = _coco(tmp_path, images, annotations)
    error = _only_error(CocoCaptionsLoader(path, check_images=True))
    assert (
        str(error) == f"{path}: record images[4]: expected {{'id': int, 'file_name': str}}, got {{'id': 5}}"
    )
    loader = CocoCaptionsLoader(path, check_images=True, on_bad_sample="skip")
    (record,) = loader.load()
    assert (
        record.image_id == 1
        and record.captions == ("a red box", "another")
        and record.caption_ids == (10, 15)
    )
    assert loader.skips.counts == {
        "wrong_type": 1,
        "empty_caption": 1,
        "unknown_image_id": 1,
        "size_mismatch": 1,
        "missing_image": 1,
        "no_captions": 1,
    }
    assert any("record image 2: declared 100x6" in text for text in loader.skips.examples["size_mismatch"])
    assert (
        "record annotation 12: image_id 9 is not in 'images'" in loader.skips.examples["unknown_image_id"][0]
    )
    with pytest.raises(DataError, match="'images' and 'annotations' lists"):
        list(CocoCaptionsLoader(_json(tmp_path / "x.json", {"images": []})))


# --- VQAv2 ------------------------------------------------------------------------------------------------------


def _answers(text: str, count: int = 10) -> list[dict]:
    return [{"answer": text, "answer_confidence": "yes", "answer_id": i + 1} for i in range(count)]


def _annotation(question_id, image_id, answer="red", count=10, **extra):
    return {
        "question_id": question_id,
        "image_id": image_id,
        "question_type": "what color",
        "answer_type": "other",
        "multiple_choice_answer": answer,
        "answers": _answers(answer, count),
    } | extra


def test_vqav2_bad_records(tmp_path):
    _image(tmp_path / "val" / "COCO_val2014_000000000001.jpg")
    questions = [
        {"question_id": 1, "image_id": 1, "question": "What color?"},
        {"question_id": 2, "image_id": 1, "question": "Nine answers?"},
        {"question_id": 3, "image_id": 1, "question": "No annotation?"},
        {"question_id": 4, "image_id": 1, "question": ""},
        {"question_id": 1, "image_id": 1, "question": "Again?"},
        {"question_id": 5, "image_id": 1, "question": "Mismatch?"},
        {"question_id": 6, "image_id": 2, "question": "Missing image?"},
    ]
    annotations = [
        _annotation(1, 1),
        _annotation(2, 1, count=9),
        _annotation(4, 1),
        _annotation(5, 3),
        _annotation(6, 2),
        _annotation(7, 1),
    ]
    q_path = _json(tmp_path / "questions.json", {"questions": questions})
    a_path = _json(tmp_path / "annotations.json", {"annotations": annotations})
    options = {"image_pattern": "val/COCO_val2014_{image_id:012d}.jpg", "check_images": True}
    error = _only_error(VQALoader(q_path, a_path, **options))
    assert str(error).startswith(f"{a_path}: record 2: 'answers': expected a list of 10 answers")
    loader = VQALoader(q_path, a_path, on_bad_sample="skip", **options)
    (record,) = loader.load()
    assert (
        record.question_id == 1 and record.answers == ("red",) * 10 and record.question_type == "what color"
    )
    assert loader.skips.counts == {
        "wrong_type": 1,
        "missing_annotation": 1,
        "empty_question": 1,
        "duplicate_id": 1,
        "image_id_mismatch": 1,
        "missing_image": 1,
        "orphan_annotation": 1,
    }
    assert f"{q_path}: record 3: no annotation in {a_path}" in loader.skips.examples["missing_annotation"][0]
    unannotated = VQALoader(
        q_path, image_pattern="val/COCO_val2014_{image_id:012d}.jpg", on_bad_sample="skip"
    )
    assert [r.question_id for r in unannotated] == [1, 2, 3, 5, 6] and unannotated.skips.total == 2
    with pytest.raises(ValueError, match="image_pattern"):
        VQALoader(q_path, image_pattern="{imageid}.png")


# --- prompts JSONL ----------------------------------------------------------------------------------------------


def test_prompts_good_and_bad_lines(tmp_path):
    _image(tmp_path / "r.png")
    lines = [
        json.dumps({"prompt": "a red circle", "tag": "single_object", "file": "r.png", "include": [1]}),
        "",
        json.dumps({"prompt_id": "p2", "prompt": "two squares", "heldout": True}),
        "{not json",
        json.dumps({"prompt_id": "p3", "tag": "colors"}),
        json.dumps({"prompt_id": "p4", "prompt": "x", "heldout": "yes"}),
        json.dumps({"prompt_id": "p2", "prompt": "again"}),
        json.dumps(["a list"]),
        json.dumps({"prompt_id": "p5", "prompt": "   "}),
        json.dumps({"prompt_id": "p6", "prompt": "lost", "file": "nope.png"}),
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    error = _only_error(PromptsLoader(path, check_images=True))
    assert str(error).startswith(f"{path}: record line 4: invalid JSON")
    loader = PromptsLoader(path, check_images=True, on_bad_sample="skip")
    records = loader.load()
    assert [(r.prompt_id, r.line, r.heldout, r.tag) for r in records] == [
        ("1", 1, False, "single_object"),
        ("p2", 3, True, None),
    ]
    assert records[0].image_path == tmp_path / "r.png" and records[0].fields["include"] == [1]
    assert records[0].load_image().size == (8, 6)
    assert loader.skips.counts == {
        "invalid_json": 1,
        "missing_field": 1,
        "wrong_type": 2,
        "duplicate_id": 1,
        "empty_prompt": 1,
        "missing_image": 1,
    }
    assert f"{path}: record p3 (line 5): missing 'prompt'" in loader.skips.examples["missing_field"][0]


def test_shared_skip_counter_and_open_loader(tmp_path):
    skips = SkipCounter()
    (tmp_path / "a.jsonl").write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": ""}\n')
    for name in ("a.jsonl", "b.jsonl"):
        list(open_loader("prompts", tmp_path / name, on_bad_sample="skip", skips=skips))
    assert skips.counts == {"missing_field": 1, "empty_prompt": 1}
    with pytest.raises(ValueError, match="kind: expected one of"):
        open_loader("csv", tmp_path / "a.jsonl")
    assert SkipCounter().report() == "no records skipped"


def test_images_stay_lazy_without_check(tmp_path):
    path = _json(
        tmp_path / "llava.json", [{"id": "x", "image": "gone.png", "conversations": _turns("<image>", "a")}]
    )
    (record,) = LlavaLoader(path).load()  # not touched until asked for
    with pytest.raises(ValueError, match="gone.png: file not found"):
        record.load_images()
