"""DeepSpeed ZeRO-2 / ZeRO-3 with 2 CPU processes (gloo): training, saving, reloading, exact resume after SIGKILL.

Each run trains the micro model for 6 steps (2 processes x 4 examples a step, fp32) on the fixture data, with
tests/train_probe_run.py recording the engine's outputs on one fixed batch before and after training.
"""

from __future__ import annotations

import json

import pytest
import torch
from mllm_testing import build_micro, random_codes, train_text_tokenizer
from safetensors.torch import load_file
from train_testing import launch, write_config, write_fixture

from mllm.modeling import DualTokenMLLM

PROBE_KEYS = ("input_ids", "attention_mask", "labels", "pixel_codes", "semantic_codes", "image_is_output")
pytestmark = pytest.mark.timeout(600)


def _run(tmp_path, fixture, name, *args, env=None, **overrides):
    output_dir = tmp_path / name
    config = write_config(tmp_path / f"{name}.yaml", fixture, output_dir, **overrides)
    probe = tmp_path / f"{name}-probe.safetensors"
    env = {"PROBE_OUT": str(probe), **(env or {})}
    result = launch("tests/train_probe_run.py", ["--config", str(config), *args], nproc=2, env=env)
    return result, output_dir, probe


def _reloaded_outputs(model_dir, probe):
    model = DualTokenMLLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**{key: probe[key] for key in PROBE_KEYS}, logits_to_keep=0)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("fixture"))


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, fixture):
    tmp_path = tmp_path_factory.mktemp("zero2")
    result, output_dir, probe = _run(
        tmp_path, fixture, "run", "--activation_checkpointing", deepspeed="zero2"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return output_dir, probe


def _check_trained_and_reloadable(output_dir, probe_path):
    probe = load_file(probe_path)
    assert float(probe["final_loss"]) < float(probe["initial_loss"]) - 0.5
    reloaded = _reloaded_outputs(output_dir, probe)
    for key in ("logits", "pixel_logits", "semantic_logits"):
        assert torch.allclose(getattr(reloaded, key), probe[key], atol=1e-5, rtol=0), key
    assert abs(float(reloaded.loss) - float(probe["final_loss"])) < 1e-5
    log = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in log if "loss" in entry]
    assert len(steps) == 6
    for key in (
        "loss_text",
        "loss_pixel",
        "loss_semantic",
        "grad_norm",
        "learning_rate",
        "train_tokens_per_second",
    ):
        assert all(key in entry for entry in steps), key
    assert steps[-1]["loss_text"] < steps[0]["loss_text"]
    throughput = json.loads((output_dir / "throughput.json").read_text())
    assert throughput["world_size"] == 2 and throughput["tokens_per_second"] > 0 and throughput["steps"] == 6


@pytest.mark.slow
def test_zero2_two_processes_train_and_the_saved_model_reloads_with_the_engine_logits(zero2_run):
    _check_trained_and_reloadable(*zero2_run)


@pytest.mark.slow
def test_zero3_two_processes_gathered_save_and_checkpoint_conversion(tmp_path, fixture):
    result, output_dir, probe = _run(tmp_path, fixture, "run", deepspeed="zero3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    _check_trained_and_reloadable(output_dir, probe)
    # The ZeRO-3 shards of the last checkpoint convert to the same weights the gathered save wrote.
    from train.export import zero_to_model

    converted = zero_to_model(output_dir / "checkpoint-6", tmp_path / "converted")
    saved, restored = load_file(output_dir / "model.safetensors"), load_file(converted / "model.safetensors")
    assert set(saved) <= set(restored)
    for key, tensor in saved.items():
        assert torch.equal(tensor, restored[key]), key
    assert (converted / "processor_config.json").is_file()


@pytest.mark.slow
def test_resume_after_sigkill_while_saving_matches_the_uninterrupted_run(tmp_path, fixture, zero2_run):
    reference_dir, _ = zero2_run
    killed, output_dir, _ = _run(
        tmp_path,
        fixture,
        "run",
        "--activation_checkpointing",
        deepspeed="zero2",
        env={"KILL_DURING_SAVE_STEP": "4"},
    )
    assert killed.returncode != 0
    # Killed while writing checkpoint-4: it never became a checkpoint; checkpoint-2 is the last complete one.
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (output_dir / ".partial" / "checkpoint-4").is_dir()

    again = launch("train.mllm_train", ["--config", str(tmp_path / "run.yaml")])
    assert again.returncode != 0 and "pass --resume" in again.stderr  # never silently restarts over a run

    resumed, _, _ = _run(
        tmp_path, fixture, "run", "--activation_checkpointing", "--resume", deepspeed="zero2"
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert not (output_dir / ".partial").exists()
    assert json.loads((output_dir / "throughput.json").read_text())["steps"] == 4
    expected, got = (
        load_file(reference_dir / "model.safetensors"),
        load_file(output_dir / "model.safetensors"),
    )
    assert set(expected) == set(got)
    for key in expected:
        assert (expected[key].double() - got[key].double()).abs().max() <= 1e-6, key


def test_every_kind_of_batch_calls_the_same_modules_and_reaches_every_parameter(tmp_path):
    """What data-parallel ZeRO needs from the model: ZeRO-3 gathers parameters module by module and ZeRO-2
    buckets gradients in arrival order, so a rank whose batch holds no output (or no input, or no) images must
    still call every module in the same order and give every parameter a gradient."""
    model, processor = build_micro(train_text_tokenizer(tmp_path))
    model.train()
    question = [{"role": "user", "content": "<image>\nwhat color is the square"}]
    batches = {
        "text only": [
            processor.training_example(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]
            )
        ],
        "understanding": [
            processor.training_example(
                [*question, {"role": "assistant", "content": "green"}], [random_codes(model, 1)]
            )
        ],
        "generation": [processor.t2i_example("draw a purple square", random_codes(model, 2))],
    }
    calls = {}
    for kind, examples in batches.items():
        order = []
        hooks = [
            module.register_forward_hook(lambda m, i, o, name=name, order=order: order.append(name))
            for name, module in model.named_modules()
            if name
        ]
        model.zero_grad(set_to_none=True)
        model(**processor.collate(examples)).loss.backward()
        for hook in hooks:
            hook.remove()
        calls[kind] = order
        without = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert without == [], kind
    assert calls["text only"] == calls["understanding"] == calls["generation"]
