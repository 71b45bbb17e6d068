"""Shipped training configs parse, CLI overrides win over the file, DeepSpeed configs defer to the Trainer, and
the FLOP model behind "fraction of matmul peak" agrees with a measured count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mllm_testing import build_micro, random_codes, train_text_tokenizer
from torch.utils.flop_counter import FlopCounterMode
from train_testing import REPO, launch

from mllm.console import build_parser
from train.throughput import FlopModel

CONFIGS = sorted((REPO / "train" / "configs").glob("*.yaml"))
PARSE_SCRIPT = """
import json, sys
from train.mllm_train import parse_arguments
out = {}
for path in sys.argv[1:]:
    model, data, training, resume = parse_arguments(["--config", path, "--bf16", "false", "--learning_rate", "0.5"])
    out[path] = {
        "preset": model.preset, "model": model.model_name_or_path, "train_modules": model.train_modules,
        "lora": model.lora, "llava": data.llava_files, "store": data.code_store, "dropout": data.caption_dropout,
        "lr": training.learning_rate, "deepspeed": training.deepspeed, "sampling": training.train_sampling_strategy,
    }
print(json.dumps(out))
"""


def test_shipped_configs_parse_and_command_line_values_override_them(tmp_path):
    names = {path.stem for path in CONFIGS}
    assert {"tiny_stage1", "tiny_stage2", "tiny_lora", "paper_stage1", "paper_stage2"} <= names
    script = tmp_path / "parse.py"
    script.write_text(PARSE_SCRIPT)
    result = launch(script, [str(path) for path in CONFIGS])
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = {Path(k).stem: v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    for name, values in parsed.items():
        assert values["lr"] == 0.5, name  # the override beats the file
        assert values["llava"] and values["store"] and 0 < values["dropout"] < 1, name
        assert values["sampling"] == "group_by_length", name
    assert (
        parsed["tiny_stage1"]["train_modules"]
        == parsed["paper_stage1"]["train_modules"]
        == "projectors_heads"
    )
    assert parsed["tiny_stage2"]["train_modules"] == "all" and parsed["tiny_stage2"]["model"]
    assert parsed["tiny_lora"]["lora"] and parsed["tiny_lora"]["model"]
    for name in ("paper_stage1", "paper_stage2"):
        assert parsed[name]["deepspeed"].endswith("train/ds_zero3.json"), name


def test_unknown_config_keys_are_rejected_by_name(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("output_dir: x\nlerning_rate: 0.1\n")
    result = launch("train.mllm_train", ["--config", str(config)])
    assert result.returncode != 0 and "unknown argument(s) ['lerning_rate']" in result.stderr


def test_cli_keeps_training_overrides_for_the_argument_parser():
    args = build_parser().parse_args(
        ["train", "mllm", "--config", "c.yaml", "--learning_rate", "1e-4", "--resume", "--max_steps", "-1"]
    )
    assert args.config == "c.yaml" and args.resume and args.nproc == 1
    assert args.overrides == ["--learning_rate", "1e-4", "--max_steps", "-1"]
    export = build_parser().parse_args(["train", "zero-to-model", "--checkpoint", "c", "--out", "o"])
    assert export.checkpoint == "c" and export.dtype == "fp32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "zero-to-model", "--checkpoint", "c", "--out", "o", "--bogus"])


@pytest.mark.parametrize("name", ["ds_zero2", "ds_zero3", "ds_zero3_offload"])
def test_deepspeed_configs_leave_batch_and_precision_to_the_trainer(name):
    config = json.loads((REPO / "train" / f"{name}.json").read_text())
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto"
    zero = config["zero_optimization"]
    assert zero["stage"] == (2 if name == "ds_zero2" else 3)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if name.endswith("offload"):
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"


def test_flop_model_matches_counted_matmul_flops(tmp_path):
    model, processor = build_micro(train_text_tokenizer(tmp_path), depth_head_width=64, grid_size=4)
    model.train()
    question = [{"role": "user", "content": "<image>\nwhat color is the square"}]
    chat = processor.training_example(
        [*question, {"role": "assistant", "content": "the answer is green"}], [random_codes(model, 1)]
    )
    draw = processor.t2i_example("draw a purple square", random_codes(model, 2))
    batch = processor.collate([chat, draw, chat])
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    estimate = FlopModel.of(model).training_flops(batch)
    assert abs(estimate / counter.get_total_flops() - 1) < 0.1
    no_images = processor.collate(
        [
            processor.training_example(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]
            )
        ]
    )
    assert FlopModel.of(model).training_flops(no_images) < estimate / 10
    assert torch.is_tensor(batch["image_is_output"])


def test_a_stage_continuing_from_a_checkpoint_changes_only_weightless_fields(tmp_path):
    """`model_overrides` with `model_name_or_path` (the demo's text-to-image stage stops feeding the semantic codes
    back): the loaded model keeps every weight and takes the new value; a field that shapes weights, or a value the
    config refuses, is an error naming it."""
    from train.mllm_train import ModelArguments, build_model

    model, processor = build_micro(train_text_tokenizer(tmp_path / "sp"))
    model.save_pretrained(tmp_path / "stage2", processor=processor)
    loaded, _ = build_model(
        ModelArguments(
            model_name_or_path=str(tmp_path / "stage2"), model_overrides={"output_semantic_dropout": 1.0}
        ),
        seed=0,
    )
    assert loaded.config.output_semantic_dropout == 1.0 and model.config.output_semantic_dropout == 0.0
    assert loaded.config.image_position_regions == model.config.image_position_regions
    saved = model.state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in loaded.state_dict().items())
    plain, _ = build_model(ModelArguments(model_name_or_path=str(tmp_path / "stage2")), seed=0)
    assert plain.config.output_semantic_dropout == 0.0
    # A training config may restate what the checkpoint already holds.
    restated = {"grid_size": model.config.grid_size, "text_config": {"hidden_size": model.config.hidden_size}}
    same, _ = build_model(
        ModelArguments(model_name_or_path=str(tmp_path / "stage2"), model_overrides=restated), 0
    )
    assert same.config.grid_size == model.config.grid_size
    with pytest.raises(ValueError, match=r"\['grid_size'\] cannot change when training continues"):
        build_model(
            ModelArguments(model_name_or_path=str(tmp_path / "stage2"), model_overrides={"grid_size": 4}), 0
        )
    with pytest.raises(ValueError, match=r"\['text_config'\] cannot change when training continues"):
        build_model(
            ModelArguments(
                model_name_or_path=str(tmp_path / "stage2"),
                model_overrides={"text_config": {"hidden_size": 96}},
            ),
            0,
        )
    with pytest.raises(ValueError, match="output_semantic_dropout must lie in"):
        build_model(
            ModelArguments(
                model_name_or_path=str(tmp_path / "stage2"), model_overrides={"output_semantic_dropout": 2}
            ),
            0,
        )
