"""`dualtoken demo` killed inside each of its training stages and run again: the killed stage continues from its
newest checkpoint (not from its start), finished stages are reused, and the trained models equal those of an
uninterrupted demo. Only the training stages and their inputs run (validation, evaluations and the report are not what is tested).

The trainers are wrapped so that they checkpoint every step (the demo's own cadence is 100+ steps) and raise at a
chosen moment; the wrappers also record where each run resumed from.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import eval.demo as demo
import tokenizer.teacher as teacher_module
import tokenizer.train as tokenizer_module
import train.mllm_train as mllm_module
from train.trainer import last_complete_checkpoint

TRAINED = ["teacher", "tokenizer", "mllm_stage1", "mllm"]


class Killed(BaseException):
    pass


class RaiseAtStepEnd(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"mllm step {self.step}")


@pytest.fixture
def trainers(monkeypatch):
    """Wrap the three trainers: checkpoint every step, raise at `kill[stage]`, record the resume points."""
    real_teacher, real_tokenizer = teacher_module.train_teacher, tokenizer_module.train_tokenizer
    real_mllm = mllm_module.main
    record: dict = {"kill": {}, "resumed": {}}

    def hook(stage):
        moment = record["kill"].get(stage)
        if moment is None:
            return None

        def on_event(event, step):
            if (event, step) == moment:
                raise Killed(f"{stage} {moment}")

        return on_event

    def train_teacher(data, out, settings, **kwargs):
        settings = dataclasses.replace(settings, checkpoint_every=1)
        metrics = real_teacher(data, out, settings, on_event=hook("teacher"), **kwargs)
        record["resumed"]["teacher"] = metrics["resumed_from_step"]
        return metrics

    def train_tokenizer(data, out, settings, **kwargs):
        settings = dataclasses.replace(settings, checkpoint_every=1)
        metrics = real_tokenizer(data, out, settings, on_event=hook("tokenizer"), **kwargs)
        record["resumed"]["tokenizer"] = metrics["resumed_from_step"]
        return metrics

    def train_mllm(argv, callbacks=None):
        output = argv[argv.index("--output_dir") + 1]
        stage = "mllm_stage1" if output.endswith("mllm_stage1") else "mllm_stage2"
        checkpoint = last_complete_checkpoint(output) if "--resume" in argv else None
        record["resumed"][stage] = checkpoint.rsplit("-", 1)[1] if checkpoint else None
        kill = record["kill"].get(stage)
        return real_mllm([*argv, "--save_steps", "1"], callbacks=[RaiseAtStepEnd(kill)] if kill else None)

    monkeypatch.setattr(teacher_module, "train_teacher", train_teacher)
    monkeypatch.setattr(tokenizer_module, "train_tokenizer", train_tokenizer)
    monkeypatch.setattr(mllm_module, "main", train_mllm)
    # The training stages and what they read; validation and the tokenizer's evaluation train nothing.
    kept = {"data", "teacher", "tokenizer", "encode", "text_tokenizer", "mllm_stage1", "mllm_stage2"}
    monkeypatch.setattr(demo, "STAGES", [stage for stage in demo.STAGES if stage.name in kept])
    return record


def _run(out, settings):
    previous = torch.get_num_threads()
    try:
        demo.run_demo(out, settings)
    finally:
        torch.set_num_threads(previous)


def _weights(out) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v for name in TRAINED for k, v in load_file(out / name / "model.safetensors").items()
    }


@pytest.mark.slow
def test_a_demo_killed_in_each_training_stage_continues_each_from_its_checkpoint(trainers, tmp_path):
    settings = demo.DemoSettings(
        scenes=240,
        teacher_steps=4,
        tokenizer_steps=3,
        probe_steps=20,
        stage1_steps=3,
        stage2_steps=3,
        stage1_batch_size=4,
        stage2_batch_size=4,
        threads=1,
    )
    _run(tmp_path / "whole", settings)
    assert trainers["resumed"] == dict.fromkeys(["teacher", "tokenizer", "mllm_stage1", "mllm_stage2"])

    out = tmp_path / "killed"
    kills = {
        "teacher": ("end", 3),  # checkpoints 1, 2 complete
        "tokenizer": ("begin", 3),  # checkpoint 2 complete
        "mllm_stage1": 2,  # step 2 taken, its checkpoint not yet written
        "mllm_stage2": 3,
    }
    for stage, moment in kills.items():
        trainers["kill"] = {stage: moment}
        with pytest.raises(Killed):
            _run(out, settings)
    trainers["kill"] = {}
    _run(out, settings)
    assert trainers["resumed"] == {"teacher": 2, "tokenizer": 2, "mllm_stage1": "1", "mllm_stage2": "2"}

    expected, got = _weights(tmp_path / "whole"), _weights(out)
    assert expected.keys() == got.keys()
    worst = max((expected[k].double() - got[k].double()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"the resumed demo's models differ from the uninterrupted one's by {worst:.3g}"
