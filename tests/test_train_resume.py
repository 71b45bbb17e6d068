"""Exact resume of `train.mllm_train` (one process, full and LoRA; ZeRO-2 and ZeRO-3 with two): a run SIGKILLed at
random moments and continued with `--resume` each time ends with the weights of the uninterrupted run.

Each run trains the micro model on 25 examples, 4 a step on each process (1 process: 12 steps, 7 an epoch; ZeRO-2
or ZeRO-3 with 2 processes: 10 steps, 4 an epoch), with a checkpoint every 2 steps, 2 kept. The kills are drawn from
a seed (RESUME_TEST_SEED=N replays one): one at a random moment of the first epoch, one at a random moment after a
checkpoint in the middle of a later epoch (the resume skips the first part of that epoch), and one after the last
step, before the final model is saved (the resume starts from the last checkpoint). ZeRO-3 took 300 s on a loaded
2-core machine (all are marked slow: `-m 'not slow'` leaves them out).
"""

from __future__ import annotations

import os
import random
import signal
from types import SimpleNamespace

import pytest
import torch
from mllm_testing import build_micro
from safetensors.torch import load_file
from train_testing import launch, write_config, write_fixture
from transformers import AutoTokenizer

from train.trainer import MLLMTrainer

IMAGES = 12
EXAMPLES = 2 * IMAGES + 1  # a LLaVA record and a prompt per image, one text-only record
BATCH, SAVE_STEPS = 4, 2
# variant: (processes, steps; neither a whole number of epochs, so the last resume starts mid-epoch)
VARIANTS = {"full": (1, 12), "lora": (1, 12), "zero2": (2, 10), "zero3": (2, 10)}
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("fixture"), images=IMAGES)


def _kill_plan(rng: random.Random, steps_per_epoch: int, max_steps: int) -> list[str]:
    """KILL_AT values: a random moment of the first epoch; a random moment after a checkpoint in the middle of a
    later epoch and before the next one (that resume skips part of an epoch > 0); after the last step."""
    step = rng.randint(1, steps_per_epoch)
    first = f"{rng.choice(['begin', 'end'] + (['saved'] if step % SAVE_STEPS == 0 else []))}:{step}"
    mid_epoch = [
        step
        for step in range(SAVE_STEPS, max_steps, SAVE_STEPS)
        if step > steps_per_epoch and step % steps_per_epoch
    ]
    checkpoint = rng.choice(mid_epoch)
    after = range(checkpoint + 1, checkpoint + SAVE_STEPS + 1)
    second = rng.choice([f"saved:{checkpoint}", *(f"{m}:{step}" for step in after for m in ("begin", "end"))])
    return [first, second, "train_end:0"]


def _weights(directory) -> dict[str, torch.Tensor]:
    name = (
        "adapter_model.safetensors"
        if (directory / "adapter_model.safetensors").exists()
        else "model.safetensors"
    )
    return load_file(directory / name)


def _train(tmp_path, fixture, name: str, kill: str | None, nproc: int, *args: str, **overrides):
    output_dir = tmp_path / name
    config = write_config(
        tmp_path / f"{name}.yaml",
        fixture,
        output_dir,
        save_steps=SAVE_STEPS,
        per_device_train_batch_size=BATCH,
        caption_dropout=0.5,
        **overrides,
    )
    env = {"KILL_AT": kill} if kill else None
    return launch("train_testing", ["--config", str(config), *args], nproc=nproc, env=env), output_dir


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_killed_at_random_moments_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, fixture, variant):
    nproc, max_steps = VARIANTS[variant]
    overrides = {"max_steps": max_steps}
    if variant == "lora":
        base, processor = build_micro(AutoTokenizer.from_pretrained(fixture["text_tokenizer"]), seed=4)
        base.save_pretrained(tmp_path / "base", processor=processor)
        overrides |= dict(
            model_name_or_path=str(tmp_path / "base"),
            lora=True,
            lora_r=4,
            lora_dropout=0.1,  # draws from the global RNG: the restored RNG state matters
            lora_target_modules=["q_proj", "v_proj"],
        )
    elif variant in ("zero2", "zero3"):
        overrides["deepspeed"] = variant
    seed = int(os.environ.get("RESUME_TEST_SEED", random.randrange(10**6)))
    plan = _kill_plan(random.Random(seed), -(-EXAMPLES // (BATCH * nproc)), max_steps)
    context = f"RESUME_TEST_SEED={seed}, kills {plan}"

    reference, reference_dir = _train(tmp_path, fixture, "reference", None, nproc, **overrides)
    assert reference.returncode == 0, reference.stderr[-3000:]
    for number, kill in enumerate([*plan, None]):
        args = ["--resume"] if number else []
        run, output_dir = _train(tmp_path, fixture, "run", kill, nproc, *args, **overrides)
        output = run.stdout + run.stderr
        missing = [line for line in output.splitlines() if "missing keys" in line]
        assert not missing, f"{context}: {missing}"
        if kill is None:
            assert run.returncode == 0, f"{context}: {output[-3000:]}"
        else:  # torchrun reports its workers' signal and exits with 1
            killed = run.returncode == -signal.SIGKILL or (nproc > 1 and "(SIGKILL)" in output)
            assert killed, f"{context}: not killed at {kill}: {output[-3000:]}"

    expected, got = _weights(reference_dir), _weights(output_dir)
    assert set(expected) == set(got), context
    worst = max((expected[key].double() - got[key].double()).abs().max().item() for key in expected)
    assert worst <= 1e-6, f"{context}: resumed weights differ from the uninterrupted run by {worst:.3g}"


def test_a_checkpoint_without_the_tied_output_embedding_loads_and_one_without_a_real_weight_is_refused(
    tmp_path, fixture
):
    model, _ = build_micro(AutoTokenizer.from_pretrained(fixture["text_tokenizer"]))
    lm_head = model.language_model.lm_head.weight
    assert lm_head is model.language_model.model.embed_tokens.weight  # tied: saved once, as embed_tokens
    state = {
        key: value.clone()
        for key, value in model.state_dict().items()
        if key != "language_model.lm_head.weight"
    }
    trainer = SimpleNamespace(model=model)  # all the check reads
    MLLMTrainer._issue_warnings_after_load(trainer, model.load_state_dict(state, strict=False))

    del state["language_model.model.norm.weight"]
    with pytest.raises(ValueError, match=r"no weights for \['language_model.model.norm.weight'\]"):
        MLLMTrainer._issue_warnings_after_load(trainer, model.load_state_dict(state, strict=False))
