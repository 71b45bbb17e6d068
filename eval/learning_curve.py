"""VQA (and text-to-image) accuracy against MLLM training minutes, measured while the MLLM trains.

`VQACurveCallback` is a `transformers.TrainerCallback`: every `every` optimizer steps (and at the last step) it
answers a fixed, seeded subset of a split's VQA questions with the model being trained (greedy, the VQA task's
prompt and the official accuracy, `eval.tasks.run_vqa`), with `t2i_prompts` > 0 also draws a fixed, seeded subset
of `t2i_prompts` of the split's text-to-image prompts and scores them with the scene parser (`eval.t2i_tasks.run_t2i`),
and appends a point to `<out>/vqa_curve.json`, written atomically after every point. The minutes are training wall
time only: the evaluations themselves are not counted, and `minutes_before` (e.g. the MLLM stage 1) is added, so
the x-axis reads "minutes of MLLM training". `plot_vqa_curves` draws one or more such curves (overall and per question type) into a PNG.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from data_recipes.atomic_io import atomic_save_figure, atomic_write_json

CURVE_FILE = "vqa_curve.json"
QUESTION_TYPES = ("color", "shape", "count", "position", "existence")


class VQACurveCallback(TrainerCallback):
    """Score `questions` VQA questions of `split_dir` every `every` steps; points go to `out_dir/vqa_curve.json`.

    On a resumed run the points up to the resumed step are kept and the clock continues from the last of them
    (the steps between that point and the checkpoint are then not timed; such points say `"resumed": true`).
    """

    def __init__(
        self,
        processor: Any,
        split_dir: str | os.PathLike,
        out_dir: str | os.PathLike,
        every: int,
        questions: int = 200,
        minutes_before: float = 0.0,
        seed: int = 0,
        batch_size: int = 32,
        t2i_prompts: int = 0,
    ):
        if every < 1:
            raise ValueError(f"VQACurveCallback: every must be >= 1, got {every}")
        if t2i_prompts < 0:
            raise ValueError(f"VQACurveCallback: t2i_prompts must be >= 0, got {t2i_prompts}")
        self.processor, self.split_dir, self.out_dir = processor, Path(split_dir), Path(out_dir)
        needed = ("vqa_questions.json", "vqa_annotations.json", "images") + (
            ("prompts.jsonl",) if t2i_prompts else ()
        )
        for name in needed:
            if not (self.split_dir / name).exists():
                raise FileNotFoundError(f"VQACurveCallback: {self.split_dir / name} does not exist")
        self.every, self.questions, self.seed, self.batch_size = every, questions, seed, batch_size
        self.t2i_prompts = t2i_prompts
        self.minutes_before = minutes_before
        self.points: list[dict] = []
        self._clock_start = 0.0
        self._eval_seconds = 0.0
        self._base_minutes = minutes_before
        self._resumed = False

    @property
    def path(self) -> Path:
        return self.out_dir / CURVE_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        start_step = state.global_step
        if start_step and self.path.exists():
            kept = [p for p in json.loads(self.path.read_text())["points"] if p["step"] <= start_step]
            self.points = kept
            self._base_minutes = kept[-1]["train_minutes"] if kept else self.minutes_before
            self._resumed = True
        self._clock_start, self._eval_seconds = time.perf_counter(), 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if model is not None and (step % self.every == 0 or step == state.max_steps):
            if not any(p["step"] == step for p in self.points):
                self.add_point(model, step)

    def train_minutes(self) -> float:
        elapsed = time.perf_counter() - self._clock_start - self._eval_seconds
        return self._base_minutes + elapsed / 60

    def add_point(self, model: Any, step: int) -> dict:
        """Evaluate `model` now and record it as the point of `step`."""
        from eval.tasks import EvalSettings, run_vqa

        minutes = self.train_minutes()
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            metrics = run_vqa(
                model,
                self.processor,
                self.split_dir / "vqa_questions.json",
                self.split_dir / "vqa_annotations.json",
                self.split_dir / "images",
                self.out_dir / f"step-{step:06d}",
                EvalSettings(
                    batch_size=self.batch_size, limit=self.questions, max_new_tokens=8, seed=self.seed
                ),
            )
            t2i = self._t2i_scores(model, step) if self.t2i_prompts else None
        finally:
            model.train(was_training)
        scores = metrics["all"]
        point = {
            "step": step,
            "train_minutes": minutes,
            "overall": scores["overall"],
            "per_question_type": scores["per_question_type"],
            "num_questions": scores["num_questions"],
            "eval_seconds": time.perf_counter() - t0,
        }
        if t2i is not None:
            point["t2i"] = t2i
        if self._resumed:
            point["resumed"] = True
        self.points.append(point)
        atomic_write_json(
            self.path,
            {
                "split": str(self.split_dir),
                "questions": self.questions,
                "every": self.every,
                "t2i_prompts": self.t2i_prompts,
                "points": self.points,
            },
        )
        self._eval_seconds += time.perf_counter() - t0
        return point

    def _t2i_scores(self, model: Any, step: int) -> dict:
        """T2I accuracy (%) of a seeded subset of `t2i_prompts` of the split's prompts, overall and per tag, drawn now."""
        from eval.t2i_tasks import run_t2i
        from eval.tasks import EvalSettings

        scored = run_t2i(
            model,
            self.processor,
            self.split_dir / "prompts.jsonl",
            self.out_dir / f"step-{step:06d}",
            EvalSettings(batch_size=16, limit=self.t2i_prompts, seed=self.seed),
        )["all"]
        return {
            "overall": 100 * scored["overall"],
            "per_tag": {tag: 100 * value for tag, value in scored["per_tag"].items()},
            "num_prompts": scored["num_samples"],
        }


def read_curve(path: str | os.PathLike) -> list[dict]:
    """The points of a `vqa_curve.json` (empty when the file does not exist)."""
    path = Path(path)
    return json.loads(path.read_text())["points"] if path.exists() else []


LINE_STYLES = ("-", "--", ":", "-.")


def plot_vqa_curves(curves: Mapping[str, list[dict]], out_png: str | os.PathLike) -> Path | None:
    """Overall VQA accuracy (left; with the T2I accuracy dashed where the points carry one) and per question type
    (right; solid for the first curve, then dashed, dotted, dash-dotted) against MLLM training minutes, one line per
    named curve."""
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_all, ax_type) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, points) in enumerate(curves.items()):
        minutes = [p["train_minutes"] for p in points]
        line = ax_all.plot(minutes, [p["overall"] for p in points], marker="o", label=name)[0]
        t2i = [(m, p["t2i"]["overall"]) for m, p in zip(minutes, points) if "t2i" in p]
        if t2i:
            ax_all.plot(*zip(*t2i), marker="s", linestyle="--", color=line.get_color(), label=f"{name}: T2I")
        for j, qtype in enumerate(QUESTION_TYPES):
            values = [p["per_question_type"].get(qtype, float("nan")) for p in points]
            ax_type.plot(
                minutes,
                values,
                color=colors[j % len(colors)],
                linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                label=qtype if i == 0 else None,
            )
    ax_all.axhline(90, color="gray", linestyle=":", label="target (90%)")
    with_t2i = any("t2i" in p for points in curves.values() for p in points)
    overall_title = "VQA overall (T2I dashed)" if with_t2i else "VQA overall"
    for ax, title in ((ax_all, overall_title), (ax_type, "per question type")):
        ax.set_xlabel("MLLM training minutes")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return atomic_save_figure(fig, out_png)
