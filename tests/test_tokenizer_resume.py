"""Exact resume of the teacher and the DualToken tokenizer trainers: runs killed at random moments and continued
with `resume=True` each time end with the weights of the uninterrupted run (<= 1e-6, fp32 CPU).

Micro configs on an 80-scene 32 px shapes world: the teacher trains 10 steps with a checkpoint every 3 (one kept)
and a validation every 4; the tokenizer 10 steps with a checkpoint every 3 (two kept) and the GAN on from step 3.
A kill plan (drawn from RESUME_TEST_SEED=N when set, to replay one) has a kill at a random training moment
(before a step, after its optimizer step, or after its checkpoint), one at a random moment after a later
checkpoint that is not the last (the run after it resumes mid-way and trains to the end), and one after the
last step (for the teacher also: after the teacher was renamed into place, before its checkpoints were
deleted). In-process kills raise from the trainers' `on_event` hook; two tests SIGKILL a subprocess instead,
so nothing of the run gets to clean up.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

# The module fixtures `one_thread` (autouse) and `dataset` are the tokenizer training tests' own.
from test_tokenizer_train import MICRO_TEACHER, dataset, micro_settings, one_thread  # noqa: F401

from tokenizer.teacher import METRICS_NAME, TeacherSettings, train_teacher
from tokenizer.teacher_checkpoint import checkpoint_dirs, work_dir
from tokenizer.train import train_tokenizer

STEPS, EVERY = 10, 3
# With the dense patch loss, so its head's weights and optimizer state must come back from a checkpoint too.
TEACHER = dict(
    MICRO_TEACHER,
    steps=STEPS,
    checkpoint_every=EVERY,
    keep_checkpoints=1,
    eval_every=4,
    log_every=2,
    dense_loss_weight=1.0,
)
TOKENIZER = dict(steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=2, sample_every=4, log_every=2)
TAILS = {"teacher": ("trained", "published"), "tokenizer": ("trained",)}
REPO = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Raised by the hook; a BaseException, so no `except Exception` in the trainers can swallow it."""


def kill_at(moment: str, step: int):
    def hook(event: str, at: int) -> None:
        if (event, at) == (moment, step):
            raise Killed(f"{moment}:{step}")

    return hook


def kill_plan(rng: random.Random, trainer: str) -> list[tuple[str, int]]:
    """A random training moment; a random moment after a later checkpoint before the last step (the run after it
    resumes mid-way and trains to the end); a moment after the last step."""
    mid = list(range(EVERY, STEPS, EVERY))  # checkpoints before the last step's
    step = rng.randint(1, mid[-1])
    moment = rng.choice(["begin", "end"] + (["saved"] if step in mid[:-1] else []))
    resumed_from = max([0] + [c for c in mid if c < step or (c == step and moment == "saved")])
    checkpoint = rng.choice([c for c in mid if c > resumed_from])
    after = range(checkpoint + 1, min(checkpoint + EVERY, STEPS) + 1)
    second = rng.choice([("saved", checkpoint), *((m, s) for s in after for m in ("begin", "end"))])
    return [(moment, step), second, (rng.choice(TAILS[trainer]), STEPS)]


def plan_for(trainer: str) -> tuple[list[tuple[str, int]], str]:
    seed = int(os.environ.get("RESUME_TEST_SEED", random.randrange(10**6)))
    plan = kill_plan(random.Random(seed), trainer)
    return plan, f"RESUME_TEST_SEED={seed}, kills {plan}"


def max_abs_diff(expected: Path, got: Path) -> float:
    a, b = load_file(expected / "model.safetensors"), load_file(got / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def teacher(dataset, tmp_path_factory):
    """The uninterrupted reference teacher (the tokenizer runs distil from it too)."""
    out = tmp_path_factory.mktemp("reference") / "teacher"
    train_teacher(dataset, out, TeacherSettings(**TEACHER), progress=False)
    return out


@pytest.fixture(scope="module")
def tokenizer_run(dataset, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "tokenizer"
    train_tokenizer(dataset, out, micro_settings(**TOKENIZER), teacher_dir=teacher, progress=False)
    return out


def _train(trainer: str, dataset: Path, out: Path, teacher: Path, **kwargs) -> dict:
    if trainer == "teacher":
        return train_teacher(dataset, out, TeacherSettings(**TEACHER), progress=False, **kwargs)
    return train_tokenizer(
        dataset, out, micro_settings(**TOKENIZER), teacher_dir=teacher, progress=False, **kwargs
    )


@pytest.mark.parametrize("trainer", ["teacher", "tokenizer"])
def test_killed_at_random_moments_and_resumed_ends_with_the_uninterrupted_weights(
    trainer, dataset, teacher, tokenizer_run, tmp_path
):
    reference = teacher if trainer == "teacher" else tokenizer_run
    plan, context = plan_for(trainer)
    out = tmp_path / trainer
    for number, (moment, step) in enumerate(plan):
        with pytest.raises(Killed):
            _train(trainer, dataset, out, teacher, resume=number > 0, on_event=kill_at(moment, step))
    _train(trainer, dataset, out, teacher, resume=True)

    worst = max_abs_diff(reference, out)
    assert worst <= 1e-6, f"{context}: resumed weights differ from the uninterrupted run by {worst:.3g}"
    if trainer == "teacher":
        expected, metrics = (json.loads((run / METRICS_NAME).read_text()) for run in (reference, out))
        for key in (
            "loss_first",
            "loss_last",
            "logit_scale",
            "logit_bias",
            "val_top1_curve",
            "val_zero_shot",
        ):
            assert metrics[key] == expected[key], f"{context}: {key}"
        assert not work_dir(out).exists() and not (out / "checkpoints").exists(), context
    else:
        expected, metrics = (json.loads((run / "train_metrics.json").read_text()) for run in (reference, out))
        assert metrics["history"] == expected["history"], context


def test_teacher_refuses_to_drop_checkpoints_or_resume_with_other_settings(dataset, teacher, tmp_path):
    out = tmp_path / "teacher"
    with pytest.raises(Killed):
        train_teacher(dataset, out, TeacherSettings(**TEACHER), progress=False, on_event=kill_at("end", 4))
    assert [step for step, _ in checkpoint_dirs(work_dir(out))] == [3] and not out.exists()
    with pytest.raises(ValueError, match="interrupted run"):
        train_teacher(dataset, out, TeacherSettings(**TEACHER), progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_teacher(dataset, out, TeacherSettings(**{**TEACHER, "lr": 0.5}), progress=False, resume=True)
    # threads, logging and checkpoint cadence may change on resume; the weights do not
    changed = TeacherSettings(**{**TEACHER, "checkpoint_every": 5, "log_every": 1})
    metrics = train_teacher(dataset, out, changed, progress=False, resume=True)
    assert metrics["resumed_from_step"] == 3 and max_abs_diff(teacher, out) <= 1e-6
    # a finished teacher is kept as it is by a resume with its settings, retrained by one with others
    weights = (out / "model.safetensors").stat().st_mtime_ns
    stored = json.loads((out / METRICS_NAME).read_text())
    assert train_teacher(dataset, out, changed, progress=False, resume=True) == stored
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    retrained = train_teacher(
        dataset, out, TeacherSettings(**{**TEACHER, "steps": 4}), resume=True, progress=False
    )
    assert retrained["steps"] == 4 and retrained["resumed_from_step"] is None


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_tokenizer_resume as t

def kill(moment, step):
    if (moment, step) == ({moment!r}, {step}):
        os.kill(os.getpid(), signal.SIGKILL)

t._train({trainer!r}, t.Path({data!r}), t.Path({out!r}), t.Path({teacher!r}), resume=True, on_event=kill)
"""


@pytest.mark.parametrize("trainer", ["teacher", "tokenizer"])
def test_a_sigkilled_process_resumes_to_the_uninterrupted_weights(
    trainer, dataset, teacher, tokenizer_run, tmp_path
):
    """A real SIGKILL (no exception handler or `finally` runs) at a random moment after a checkpoint or after
    the last step, then a resume."""
    reference = teacher if trainer == "teacher" else tokenizer_run
    plan, context = plan_for(trainer)
    moment, step = random.Random(context).choice(plan[1:])
    context += f", SIGKILL at {moment}:{step}"
    out = tmp_path / trainer
    script = KILLED_RUN.format(
        tests=str(REPO / "tests"),
        moment=moment,
        step=step,
        trainer=trainer,
        data=str(dataset),
        out=str(out),
        teacher=str(teacher),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, f"{context}: {run.stderr[-3000:]}"
    _train(trainer, dataset, out, teacher, resume=True)
    worst = max_abs_diff(reference, out)
    assert worst <= 1e-6, f"{context}: resumed weights differ from the uninterrupted run by {worst:.3g}"


def test_tokenizer_resumes_only_with_the_settings_it_was_trained_with(
    dataset, teacher, tokenizer_run, tmp_path
):
    out = tmp_path / "tokenizer"
    with pytest.raises(Killed):
        _train("tokenizer", dataset, out, teacher, on_event=kill_at("end", 4))
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.001 there, 0.5 now\)"):
        train_tokenizer(
            dataset,
            out,
            micro_settings(**{**TOKENIZER, "lr": 0.5}),
            teacher_dir=teacher,
            progress=False,
            resume=True,
        )
    # logging and checkpoint cadence may change on resume; the weights do not
    changed = micro_settings(**{**TOKENIZER, "log_every": 1, "checkpoint_every": 5})
    metrics = train_tokenizer(dataset, out, changed, teacher_dir=teacher, progress=False, resume=True)
    assert metrics["resumed_from_step"] == 3 and max_abs_diff(tokenizer_run, out) <= 1e-6
