"""The tokenizer training loop on a micro config: the loss falls, a run interrupted after a checkpoint and resumed
ends bit-identical to an uninterrupted one (GAN on), leftovers of a killed save are ignored, the CLI parses."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

import tokenizer.train as train_module
from data_recipes.shapes_dataset import write_shapes_dataset
from tokenizer.modeling import DualTokenModel
from tokenizer.teacher import TeacherSettings, train_teacher
from tokenizer.train import (
    CHECKPOINTS,
    METRICS_NAME,
    TokenizerTrainSettings,
    checkpoint_dirs,
    lr_factor,
    train_tokenizer,
)
from tokenizer.train_cli import register, settings_from_args

# A 32 px, 4x4-grid, 3-layer teacher and a tokenizer whose every part is as small as the config allows.
MICRO_TEACHER = dict(
    steps=1,
    batch_size=8,
    image_size=32,
    vision_layers=3,
    vision_width=64,
    vision_heads=2,
    vision_mlp=128,
    text_layers=1,
    text_width=32,
    text_heads=2,
    text_mlp=64,
    threads=1,
)
MICRO_MODEL = {
    "pixel_layer": 1,
    "shortcut_layer": 1,
    "codebook_size": 64,
    "rq_depth": 2,
    "decoder_channels": 32,
    "decoder_channel_mult": [1, 1, 1, 1],
    "decoder_res_blocks": 1,
    "decoder_attn_resolutions": [],
    "decoder_in_channels": 32,
    "disc_channels": 32,
    "disc_layers": 1,
    "gan_weight": 0.75,  # the tiny preset trains without the GAN; the micro runs exercise it from step 3
    "gan_start_step": 3,
}


def micro_settings(**changes) -> TokenizerTrainSettings:
    values = dict(
        steps=6,
        batch_size=4,
        threads=1,
        warmup_steps=2,
        log_every=1,
        sample_every=3,
        checkpoint_every=3,
        sample_images=4,
        model_overrides=dict(MICRO_MODEL),
    )
    values.update(changes)
    return TokenizerTrainSettings(**values)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "data"
    write_shapes_dataset(root, n=80, size=32, workers=0, verbose=False)
    return root


@pytest.fixture(scope="module")
def teacher(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    train_teacher(dataset, out, TeacherSettings(**MICRO_TEACHER), progress=False)
    return out


def test_loss_decreases_and_the_run_directory_is_complete(dataset, teacher, tmp_path):
    out = tmp_path / "run"
    settings = micro_settings(steps=40, lr=3e-3, log_every=10, checkpoint_every=40, sample_every=20)
    metrics = train_tokenizer(dataset, out, settings, teacher_dir=teacher, progress=False)
    first, last = metrics["history"][0], metrics["history"][-1]
    assert last["loss"] < 0.8 * first["loss"]
    assert last["recon_l2"] < first["recon_l2"] and last["psnr"] > first["psnr"]
    assert last["semantic"] < first["semantic"]
    assert last["disc_loss"] > 0 and metrics["steps"] == 40 and metrics["processes"] == 1
    model = DualTokenModel.from_pretrained(out).eval()  # the final tokenizer sits at the top of the run dir
    assert model.config.codebook_size == 64 and model.grid_size == 4
    assert model.config.decoder_channel_mult == [1, 1, 1, 1]
    saved = json.loads((out / METRICS_NAME).read_text())
    assert saved["teacher"] == str(teacher.resolve()) and len(saved["history"]) == 4
    assert [p.name for p in sorted((out / "samples").iterdir())] == ["step-000020.png", "step-000040.png"]
    assert any((out / "tb").iterdir())
    assert [step for step, _ in checkpoint_dirs(out)] == [40]
    # the tower started from the teacher's: at step 0 they were equal (patch embedding moved only a little)
    tower = torch.nn.functional.cosine_similarity(
        model.backbone.embeddings.patch_embedding.weight.flatten(),
        train_module.load_teacher_tower(teacher).embeddings.patch_embedding.weight.flatten(),
        dim=0,
    )
    assert tower > 0.9


def _tensors(run) -> dict[str, torch.Tensor]:
    (step, checkpoint), *_ = reversed(checkpoint_dirs(run))
    tensors = {f"model.{k}": v for k, v in load_file(checkpoint / "model.safetensors").items()}
    tensors.update({f"disc.{k}": v for k, v in load_file(checkpoint / "discriminator.safetensors").items()})
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    tensors.update({f"adam.{k}.{n}": v for k, s in optimizer.items() for n, v in s.items()})
    return tensors


class Killed(Exception):
    pass


def test_interrupted_run_resumes_to_the_identical_result_ignoring_a_half_written_save(
    dataset, teacher, tmp_path, monkeypatch
):
    settings = micro_settings()
    whole = tmp_path / "whole"
    train_tokenizer(dataset, whole, settings, teacher_dir=teacher, progress=False)

    halves = tmp_path / "halves"
    real_save = train_module.save_checkpoint

    def save_then_die(accelerator, out, step, *args):
        real_save(accelerator, out, step, *args)
        if step == 3:
            raise Killed

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_tokenizer(dataset, halves, settings, teacher_dir=teacher, progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert [step for step, _ in checkpoint_dirs(halves)] == [3]
    assert not (halves / "model.safetensors").exists()
    # a kill in the middle of the next save leaves a temporary directory, even one that claims a later step
    leftover = halves / CHECKPOINTS / ".tmp-step-000006"
    leftover.mkdir()
    (leftover / "trainer_state.json").write_text('{"step": 6}')
    (leftover / "model.safetensors").write_bytes(b"truncated")
    assert [step for step, _ in checkpoint_dirs(halves)] == [3]
    with pytest.raises(ValueError, match="resume=True"):
        train_tokenizer(dataset, halves, settings, teacher_dir=teacher, progress=False)

    metrics = train_tokenizer(dataset, halves, settings, teacher_dir=teacher, resume=True, progress=False)
    assert metrics["resumed_from_step"] == 3
    assert not leftover.exists()
    expected, found = _tensors(whole), _tensors(halves)
    assert expected.keys() == found.keys()
    assert any(k.startswith("disc.") for k in expected) and any(k.startswith("adam.") for k in expected)
    for name, tensor in expected.items():
        assert torch.equal(tensor, found[name]), name
    final_whole, final_halves = (
        load_file(whole / "model.safetensors"),
        load_file(halves / "model.safetensors"),
    )
    assert all(torch.equal(final_whole[k], final_halves[k]) for k in final_whole)
    # the logged losses of the resumed steps equal the uninterrupted run's
    history_whole = json.loads((whole / METRICS_NAME).read_text())["history"]
    history_halves = json.loads((halves / METRICS_NAME).read_text())["history"]
    assert history_whole == history_halves
    assert history_whole[-1]["gan"] != 0.0  # the GAN was on for the resumed steps


def test_schedule_and_cli_settings():
    settings = TokenizerTrainSettings(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, settings) == pytest.approx(0.1) and lr_factor(9, settings) == pytest.approx(1.0)
    assert lr_factor(10, settings) == pytest.approx(1.0) and lr_factor(100, settings) == pytest.approx(0.1)
    assert lr_factor(55, settings) == pytest.approx(0.55)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        "train --data d --teacher t --out o --steps 7 --set gan_start_step=5 --set decoder_channel_mult=[1,2,2,2] "
        "--set lpips_path=null".split()
    )
    settings = settings_from_args(args)
    assert settings.steps == 7 and settings.batch_size == TokenizerTrainSettings().batch_size
    fields = settings.config_fields()
    assert fields["gan_start_step"] == 5 and fields["decoder_channel_mult"] == [1, 2, 2, 2]
    assert fields["lpips_path"] is None and fields["decoder_channels"] == 32  # preset training override kept
    with pytest.raises(ValueError, match="unknown field"):
        TokenizerTrainSettings.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="preset"):
        TokenizerTrainSettings(preset="huge")


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
from test_tokenizer_train import micro_settings
from tokenizer.train import train_tokenizer
metrics = train_tokenizer({data!r}, {out!r}, micro_settings(steps=2, checkpoint_every=2, sample_images=0),
                          teacher_dir={teacher!r}, progress=False)
# One file per rank: the two ranks share one stdout pipe, where their lines can interleave.
with open({reports!r} + "/rank-" + os.environ["RANK"] + ".json", "w") as handle:
    json.dump({{"processes": metrics["processes"], "loss": metrics["last"]["loss"]}}, handle)
"""


def test_two_cpu_ranks_under_torchrun_share_one_run(dataset, teacher, tmp_path):
    """torchrun on CPUs: accelerate must see both ranks (gloo), each rank saves its RNG state into the one
    checkpoint, and both log the same rank-averaged losses."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    script = tmp_path / "ddp_train.py"
    tests = str(Path(__file__).resolve().parent)
    reports_dir = tmp_path / "reports"
    reports_dir.mkdir()
    script.write_text(
        DDP_SCRIPT.format(
            tests=tests, data=str(dataset), out=str(out), teacher=str(teacher), reports=str(reports_dir)
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(tests).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(path.read_text()) for path in sorted(reports_dir.glob("rank-*.json"))]
    assert len(reports) == 2 and all(r["processes"] == 2 for r in reports)
    assert reports[0]["loss"] == reports[1]["loss"]
    (step, checkpoint), *_ = checkpoint_dirs(out)
    assert step == 2 and (checkpoint / "rng-0.pt").is_file() and (checkpoint / "rng-1.pt").is_file()
    assert DualTokenModel.from_pretrained(out).config.codebook_size == 64
