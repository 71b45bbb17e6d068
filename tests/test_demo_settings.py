"""The demo's budget settings: the VQA conversations listed `vqa_repeat` times in stage 2, the teacher's dense-loss
weight passed to the teacher stage (1 in the long budget), each MLLM stage trained at its own batch size, bad settings
refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.demo import DemoContext, DemoSettings, _stage2_llava_files, caption_prompts
from mllm.console import main


def _write_split(root, records):
    split = root / "data" / "train"
    split.mkdir(parents=True)
    (split / "llava.json").write_text(json.dumps(records))
    return split / "llava.json"


RECORDS = [
    {"id": "0-caption", "image": "images/0000000.png", "conversations": []},
    {"id": "0-vqa", "image": "images/0000000.png", "conversations": []},
    {"id": "0-chat", "image": "images/0000000.png", "conversations": []},
    {"id": "1-vqa", "image": "images/0000001.png", "conversations": []},
]


def test_vqa_conversations_are_listed_vqa_repeat_times(tmp_path):
    everything = _write_split(tmp_path, RECORDS)
    assert _stage2_llava_files(DemoContext(tmp_path, DemoSettings())) == [everything]
    files = _stage2_llava_files(DemoContext(tmp_path, DemoSettings(vqa_repeat=3)))
    assert files[0] == everything and len(files) == 3 and files[1] == files[2] != everything
    assert [r["id"] for r in json.loads(files[1].read_text())] == ["0-vqa", "1-vqa"]


def test_bad_vqa_repeat_and_a_split_without_vqa_are_refused(tmp_path):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="vqa_repeat"):
            DemoSettings(vqa_repeat=bad)
    _write_split(tmp_path, [RECORDS[0], RECORDS[2]])
    with pytest.raises(ValueError, match="no VQA conversations"):
        _stage2_llava_files(DemoContext(tmp_path, DemoSettings(vqa_repeat=2)))


def test_the_cli_reports_a_bad_vqa_repeat_without_a_traceback(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "run"), "--vqa-repeat", "0"]) == 2
    assert "dualtoken demo: error: DemoSettings.vqa_repeat" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_teacher_stage_trains_with_the_budgets_dense_loss_weight(tmp_path, monkeypatch, capsys):
    import tokenizer.teacher as teacher
    from eval import demo

    seen = []

    def fake_train(data_dir, out, settings, resume):
        seen.append(settings)
        raise RuntimeError("stop after the settings")

    monkeypatch.setattr(teacher, "train_teacher", fake_train)
    for weight in (0.0, 2.5):
        with pytest.raises(RuntimeError, match="stop after the settings"):
            demo.stage_teacher(DemoContext(tmp_path, DemoSettings(teacher_dense_loss_weight=weight)))
    assert [s.dense_loss_weight for s in seen] == [0.0, 2.5]
    assert DemoSettings().teacher_dense_loss_weight == 0.0
    assert demo.BUDGETS["long"]["teacher_dense_loss_weight"] == 1.0
    for bad in (-1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="teacher_dense_loss_weight"):
            DemoSettings(teacher_dense_loss_weight=bad)
    assert main(["demo", "--out", str(tmp_path / "run"), "--teacher-dense-loss-weight", "-0.5"]) == 2
    assert "DemoSettings.teacher_dense_loss_weight" in capsys.readouterr().err


def test_each_mllm_stage_trains_at_its_own_batch_size(tmp_path, monkeypatch):
    import train.mllm_train as mllm_train
    from eval import demo

    batches = []

    def fake_main(argv, callbacks=None):
        batches.append(int(argv[argv.index("--per_device_train_batch_size") + 1]))
        raise RuntimeError("stop after the arguments")

    monkeypatch.setattr(mllm_train, "main", fake_main)
    _write_split(tmp_path, RECORDS)
    ctx = DemoContext(tmp_path, DemoSettings(stage1_batch_size=12, stage2_batch_size=5, curve_every=0))
    for stage in (demo.stage_mllm_stage1, demo.stage_mllm_stage2):
        with pytest.raises(RuntimeError, match="stop after the arguments"):
            stage(ctx)
    assert batches == [12, 5]
    assert (DemoSettings().stage1_batch_size, DemoSettings().stage2_batch_size) == (16, 8)
    for bad in (0, 2.0, True, "8"):
        with pytest.raises(ValueError, match="stage2_batch_size"):
            DemoSettings(stage2_batch_size=bad)


def test_the_cli_batch_flag_sets_both_stages_and_a_stage_flag_overrides_it(tmp_path, monkeypatch, capsys):
    import eval.cli as cli

    settings = []
    monkeypatch.setattr(cli, "run_demo", lambda out, s, **kwargs: settings.append(s))
    out = str(tmp_path / "run")
    assert main(["demo", "--out", out, "--batch-size", "4"]) == 0
    assert main(["demo", "--out", out, "--batch-size", "4", "--stage2-batch-size", "6"]) == 0
    assert main(["demo", "--out", out, "--budget", "long"]) == 0
    assert (settings[-1].stage2_steps, settings[-1].teacher_dense_loss_weight) == (10000, 1.0)
    assert [(s.stage1_batch_size, s.stage2_batch_size) for s in settings] == [(4, 4), (4, 6), (16, 8)]
    assert main(["demo", "--out", out, "--stage1-batch-size", "0"]) == 2
    assert "DemoSettings.stage1_batch_size" in capsys.readouterr().err


def test_the_text_to_image_mixture_gives_the_asked_share():
    from eval.demo import t2i_mixture

    for conversations, prompts, share in ((32400, 5408, 0.75), (10, 40, 0.5), (3, 1, 0.9)):
        mix = t2i_mixture(conversations, prompts, share)
        t2i = mix["prompt_repeat"] * prompts
        assert mix["conversation_repeat"] == 1.0 and abs(t2i / (t2i + conversations) - share) < 1e-9
    assert t2i_mixture(100, 7, 1.0) == {"conversation_repeat": 0.0, "prompt_repeat": 1.0}
    with pytest.raises(ValueError, match="holds no"):
        t2i_mixture(100, 0, 0.5)


def test_the_text_to_image_stage_is_off_by_default_and_on_in_the_long_budget(tmp_path, monkeypatch, capsys):
    import eval.cli as cli
    from eval import demo

    settings = []
    monkeypatch.setattr(cli, "run_demo", lambda out, s, **kwargs: settings.append(s))
    out = str(tmp_path / "run")
    assert main(["demo", "--out", out]) == 0
    assert main(["demo", "--out", out, "--budget", "long"]) == 0
    assert main(["demo", "--out", out, "--budget", "long", "--t2i-steps", "0", "--eval-limit", "8"]) == 0
    assert [(s.t2i_steps, s.curve_t2i_prompts) for s in settings] == [(0, 0), (2000, 60), (0, 8)]
    assert demo.final_model_dir(tmp_path, settings[0]) == tmp_path / "mllm"
    assert demo.final_model_dir(tmp_path, settings[1]) == tmp_path / "mllm_t2i"
    # Off, the stage trains nothing and leaves no stale model behind.
    (tmp_path / "mllm_t2i").mkdir()
    summary = demo.stage_mllm_t2i(DemoContext(tmp_path, settings[0]))
    assert "skipped" in summary and not (tmp_path / "mllm_t2i").exists()
    for flag, bad in (
        ("--t2i-share", "0"),
        ("--t2i-share", "1.5"),
        ("--t2i-steps", "-1"),
        ("--t2i-caption-share", "1"),
        ("--t2i-caption-share", "-0.1"),
        ("--t2i-semantic-loss-weight", "-1"),
    ):
        assert main(["demo", "--out", out, flag, bad]) == 2
        assert "DemoSettings.t2i_" in capsys.readouterr().err


def _t2i_stage_argv(tmp_path, monkeypatch, settings):
    """The trainer arguments `stage_mllm_t2i` builds for `settings` over a split of 9 VQA conversations and the
    train files already written under `tmp_path / data / train` (the trainer itself is not run)."""
    import train.mllm_train as mllm_train
    from eval import demo

    seen = []

    def fake_main(argv, callbacks=None):
        seen.append(argv)
        raise RuntimeError("stop after the arguments")

    monkeypatch.setattr(mllm_train, "main", fake_main)
    with pytest.raises(RuntimeError, match="stop after the arguments"):
        demo.stage_mllm_t2i(DemoContext(tmp_path, settings))
    return seen[0]


def _nine_vqa_conversations(tmp_path):
    _write_split(
        tmp_path, [{"id": f"{i}-vqa", "conversations": [{"from": "human", "value": "q"}]} for i in range(9)]
    )


def test_the_text_to_image_stage_continues_from_stage_2_with_its_mixture(tmp_path, monkeypatch):
    _nine_vqa_conversations(tmp_path)
    (tmp_path / "data" / "train" / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": "a red circle", "image_id": i}) + "\n" for i in range(3))
    )
    argv = _t2i_stage_argv(
        tmp_path, monkeypatch, DemoSettings(t2i_steps=5, t2i_batch_size=6, t2i_share=0.5, curve_every=0)
    )

    def value(name):
        return argv[argv.index(name) + 1]

    assert value("--model_name_or_path") == str(tmp_path / "mllm") and value("--output_dir") == str(
        tmp_path / "mllm_t2i"
    )
    assert (value("--max_steps"), value("--per_device_train_batch_size")) == ("5", "6")
    assert json.loads(value("--model_overrides")) == {
        "output_semantic_dropout": 1.0
    }  # stage 2's loss weights
    assert (
        "--prompt_repeat=3.000000" in argv and "--conversation_repeat=1.000000" in argv
    )  # 9 conversations, 3 x 3 prompts


def test_the_caption_share_adds_scene_captions_without_adding_text_to_image_examples(tmp_path, monkeypatch):
    _nine_vqa_conversations(tmp_path)
    train = tmp_path / "data" / "train"
    (train / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": "a red circle", "image_id": i}) + "\n" for i in range(3))
    )
    annotations = [{"id": i, "image_id": i // 2, "caption": f"caption {i}"} for i in range(20)]
    images = [{"id": i, "file_name": f"images/{i:07d}.png"} for i in range(10)]
    (train / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    settings = DemoSettings(
        t2i_steps=5, t2i_share=0.5, t2i_caption_share=0.5, t2i_semantic_loss_weight=0.1, curve_every=0
    )
    argv = _t2i_stage_argv(tmp_path, monkeypatch, settings)
    files = argv[argv.index("--prompt_files") + 1 : argv.index("--code_store")]
    assert files == [str(train / "prompts.jsonl"), str(tmp_path / "mllm_t2i_captions.jsonl")]
    records = [json.loads(line) for line in Path(files[1]).read_text().splitlines()]
    # As many captions as prompts (share 0.5), distinct, each with its own image.
    assert len(records) == 3 and len({r["caption"] for r in records}) == 3
    assert all(r["image_id"] == int(r["caption"].split()[1]) // 2 for r in records)
    assert all(r["file"] == f"images/{r['image_id']:07d}.png" for r in records)
    # 9 conversations and 6 prompt records: half the examples text-to-image, as with the 3 prompts alone.
    assert "--prompt_repeat=1.500000" in argv and "--conversation_repeat=1.000000" in argv
    overrides = json.loads(argv[argv.index("--model_overrides") + 1])
    assert overrides == {"output_semantic_dropout": 1.0, "semantic_loss_weight": 0.1}
    with pytest.raises(ValueError, match="6 captions wanted, it holds 2"):
        caption_prompts(_captions_file(tmp_path, images, annotations[:2]), 6, seed=0)
    with pytest.raises(ValueError, match=r"annotations\[0\].image_id 0 is not in its images"):
        caption_prompts(_captions_file(tmp_path, images[1:], annotations[:2]), 2, seed=0)


def _captions_file(tmp_path, images, annotations):
    path = tmp_path / "few_captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_the_bf16_flag_reaches_the_teacher_the_tokenizer_and_every_mllm_stage(tmp_path, monkeypatch, capsys):
    import torch

    import eval.cli as cli
    import tokenizer.teacher as teacher
    import train.mllm_train as mllm_train
    from eval import demo

    settings = []
    monkeypatch.setattr(cli, "run_demo", lambda out, s, **kwargs: settings.append(s))
    out = str(tmp_path / "run")
    for flag in ([], ["--bf16"], ["--no-bf16"]):
        assert main(["demo", "--out", out, *flag]) == 0
    assert [s.bf16 for s in settings] == [False, True, False]
    with pytest.raises(ValueError, match="DemoSettings.bf16"):
        DemoSettings(bf16="yes")

    seen = []

    def fake_teacher(data_dir, out, settings, resume):
        seen.append(("teacher", settings.bf16))
        raise RuntimeError("stop")

    def fake_mllm(argv, callbacks=None):
        seen.append(("mllm", " ".join(argv[argv.index("--bf16") :][:4]) if "--bf16" in argv else None))
        raise RuntimeError("stop")

    monkeypatch.setattr(teacher, "train_teacher", fake_teacher)
    monkeypatch.setattr(mllm_train, "main", fake_mllm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _write_split(tmp_path, RECORDS)
    for bf16 in (False, True):
        ctx = DemoContext(tmp_path, DemoSettings(bf16=bf16, curve_every=0))
        for stage in (demo.stage_teacher, demo.stage_mllm_stage1, demo.stage_mllm_stage2):
            with pytest.raises(RuntimeError, match="stop"):
                stage(ctx)
        seen.append(("tokenizer", demo._tokenizer_settings(ctx).mixed_precision))
    assert seen == [
        ("teacher", False), ("mllm", None), ("mllm", None), ("tokenizer", "auto"),
        ("teacher", True), ("mllm", "--bf16 true --use_cpu true"), ("mllm", "--bf16 true --use_cpu true"),
        ("tokenizer", "bf16"),
    ]  # fmt: skip
    assert demo._bf16_args(True, cuda=True) == ["--bf16", "true"] and demo._bf16_args(False, cuda=True) == []
