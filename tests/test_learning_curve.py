"""VQACurveCallback's bookkeeping: its input checks, and what a resumed run keeps of an earlier curve."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from eval.learning_curve import VQACurveCallback, plot_vqa_curves, read_curve


def _split(tmp_path):
    split = tmp_path / "val"
    (split / "images").mkdir(parents=True, exist_ok=True)
    for name in ("vqa_questions.json", "vqa_annotations.json"):
        (split / name).write_text("{}")
    return split


def test_a_split_without_vqa_files_is_named_in_the_error(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=r"val/vqa_questions\.json"):
        VQACurveCallback(None, tmp_path / "val", tmp_path / "curve", every=10)
    with pytest.raises(ValueError, match="every must be >= 1"):
        VQACurveCallback(None, _split(tmp_path), tmp_path / "curve", every=0)


def test_a_resumed_run_keeps_the_points_up_to_its_step_and_continues_their_clock(tmp_path):
    out = tmp_path / "curve"
    out.mkdir()
    old = [
        {"step": s, "train_minutes": m, "overall": 10.0 * s, "per_question_type": {}, "num_questions": 4}
        for s, m in ((2, 3.0), (4, 5.5), (6, 8.0))
    ]
    (out / "vqa_curve.json").write_text(json.dumps({"points": old}))
    callback = VQACurveCallback(None, _split(tmp_path), out, every=2, minutes_before=1.0)
    callback.on_train_begin(None, SimpleNamespace(global_step=4), None)
    assert [p["step"] for p in callback.points] == [2, 4]
    assert 5.5 <= callback.train_minutes() < 5.6  # the clock starts again at the resumed point's minutes

    fresh = VQACurveCallback(None, _split(tmp_path), tmp_path / "other", every=2, minutes_before=1.0)
    fresh.on_train_begin(None, SimpleNamespace(global_step=0), None)
    assert fresh.points == [] and 1.0 <= fresh.train_minutes() < 1.1


def test_curves_plot_to_a_png_and_an_empty_curve_draws_nothing(tmp_path):
    points = [
        {"step": s, "train_minutes": s / 2, "overall": 30.0 + s, "per_question_type": {"color": 50.0 + s}}
        for s in (1, 2, 3)
    ]
    assert plot_vqa_curves({"a": []}, tmp_path / "none.png") is None
    png = plot_vqa_curves({"default": points, "long": points}, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_curve(tmp_path / "missing.json") == []


def test_text_to_image_points_need_the_splits_prompts_and_plot_beside_vqa(tmp_path):
    split = _split(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"val/prompts\.jsonl"):
        VQACurveCallback(None, split, tmp_path / "curve", every=2, t2i_prompts=8)
    with pytest.raises(ValueError, match="t2i_prompts must be >= 0"):
        VQACurveCallback(None, split, tmp_path / "curve", every=2, t2i_prompts=-1)
    (split / "prompts.jsonl").write_text("")
    assert VQACurveCallback(None, split, tmp_path / "curve", every=2, t2i_prompts=8).t2i_prompts == 8
    points = [
        {
            "step": s,
            "train_minutes": s,
            "overall": 40.0,
            "per_question_type": {},
            "t2i": {"overall": 10.0 * s},
        }
        for s in (1, 2)
    ]
    png = plot_vqa_curves({"text-to-image stage": points}, tmp_path / "t2i.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
