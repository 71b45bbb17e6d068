"""MLLM instruction tuning (`dualtoken train mllm`, or `python -m train.mllm_train` under torchrun / deepspeed).

Arguments are three dataclasses parsed by `HfArgumentParser`: a YAML/JSON config file gives the values, and
`--key value` pairs after it override them. Training is the HF `Trainer` (`train.trainer.MLLMTrainer`) with
DeepSpeed when `deepspeed:` names a config (`zero2`, `zero3`, `zero3_offload` pick the ones shipped in
`train/`). `--resume` continues from the last complete checkpoint of `output_dir`.

Distributed launch (single node): ``torchrun --nproc_per_node 8 -m train.mllm_train --config C.yaml``.
Multi-node: the DeepSpeed launcher with a hostfile (``node-1 slots=8`` per line),
``deepspeed --hostfile hostfile --no_local_rank --module train.mllm_train --config C.yaml``, or torchrun on every
node with a rendezvous (``--nnodes 2 --rdzv_backend c10d --rdzv_endpoint HOST:29500``). Checkpoints need a
shared filesystem (or ``save_on_each_node: true``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments, set_seed

from data_recipes.atomic_io import atomic_write_json
from train.data import MLLMCollator, build_training_data
from train.throughput import FlopModel, measure_matmul_peak
from train.trainer import MLLMTrainer, last_complete_checkpoint

FINAL_SCALARS = ("samples_per_second", "tokens_per_second", "peak_fraction")
DEEPSPEED_PRESETS = {
    name: Path(__file__).with_name(f"ds_{name}.json") for name in ("zero2", "zero3", "zero3_offload")
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a saved DualTokenMLLM (e.g. stage 1)"}
    )
    preset: str = field(
        default="tiny", metadata={"help": "tiny | paper: built fresh when no model_name_or_path"}
    )
    llm_path: str | None = field(
        default=None, metadata={"help": "local HF causal LM directory (paper preset)"}
    )
    text_tokenizer: str | None = field(
        default=None, metadata={"help": "HF text tokenizer dir (default: llm_path)"}
    )
    image_tokenizer: str | None = field(
        default=None, metadata={"help": "DualToken tokenizer dir (code embeddings)"}
    )
    random_code_embeddings: bool = field(
        default=False, metadata={"help": "no tokenizer: seeded random codebooks"}
    )
    model_overrides: dict | str | None = field(
        default=None, metadata={"help": "DualTokenMLLMConfig fields (JSON)"}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa | flash_attention_2 | eager"}
    )
    train_modules: str = field(default="all", metadata={"help": "all | projectors_heads (LLM frozen)"})
    code_prior_init: bool = field(
        default=True,
        metadata={
            "help": "a freshly built model's depth heads start at the code store's code frequencies "
            "(DualTokenMLLM.set_code_priors)"
        },
    )
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_train_special_tokens: bool = True


@dataclass
class DataArguments:
    llava_files: list[str] = field(default_factory=list, metadata={"help": "LLaVA conversation JSON files"})
    prompt_files: list[str] = field(
        default_factory=list, metadata={"help": "text-to-image prompts JSONL files"}
    )
    code_store: str | None = field(default=None, metadata={"help": "pre-tokenized code store directory"})
    caption_dropout: float = field(
        default=0.1, metadata={"help": "probability of an unconditional T2I caption"}
    )
    max_length: int | None = 2048
    conversation_repeat: float = 1.0
    prompt_repeat: float = 1.0
    skip_missing_images: bool = False


@dataclass
class MLLMTrainingArguments(TrainingArguments):
    bf16: bool | None = field(default=None, metadata={"help": "default: on with a bf16 GPU, off on CPU"})
    train_sampling_strategy: str = "group_by_length"
    remove_unused_columns: bool = False
    activation_checkpointing_kwargs: dict | str | None = field(
        default_factory=lambda: {"use_reentrant": False}
    )
    include_num_input_tokens_seen: str = "non_padding"
    report_to: None | str | list[str] = "tensorboard"
    logging_steps: float = 10
    measure_matmul_peak: bool = field(
        default=True, metadata={"help": "time torch.mm for the peak-fraction line"}
    )

    def __post_init__(self):
        if isinstance(self.deepspeed, str) and self.deepspeed in DEEPSPEED_PRESETS:
            self.deepspeed = str(DEEPSPEED_PRESETS[self.deepspeed])
        if self.bf16 is None:
            self.bf16 = bool(
                not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            )
        super().__post_init__()


PARSER_DATACLASSES = (ModelArguments, DataArguments, MLLMTrainingArguments)


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, MLLMTrainingArguments, bool]:
    """`--config FILE` values, overridden by `--key value` pairs; returns the dataclasses and the resume flag."""
    front = argparse.ArgumentParser(add_help=False)
    front.add_argument("--config", default=None)
    front.add_argument("--resume", action="store_true")
    known, overrides = front.parse_known_args(argv)
    parser = HfArgumentParser(PARSER_DATACLASSES)
    if known.config:
        path = Path(known.config)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"training config {path}: cannot read ({err})") from err
        if not isinstance(values, dict):
            raise ValueError(f"training config {path}: expected a mapping of argument names to values")
        dests = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - dests)
        if unknown:
            raise ValueError(f"training config {path}: unknown argument(s) {unknown}")
        parser.set_defaults(**values)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=overrides)
    if isinstance(model_args.model_overrides, str):
        model_args.model_overrides = json.loads(model_args.model_overrides)
    return model_args, data_args, training_args, known.resume


# Config fields a stage may change when it continues from a checkpoint (`model_overrides` with
# `model_name_or_path`): they change how the model trains (and, for output_semantic_dropout, what it feeds back while
# drawing), never the shape of a weight.
CONTINUATION_FIELDS = (
    "output_semantic_dropout",
    "pixel_loss_weight",
    "semantic_loss_weight",
    "depth_head_dropout",
)


def _same_value(current, new) -> bool:
    """`new` (a JSON value; a dict names a subset of fields) equals the checkpoint's `current` value."""
    if isinstance(new, dict) and isinstance(current, dict):
        return all(_same_value(current.get(key), value) for key, value in new.items())
    return current == new


def continued_config(path: str | Path, overrides: dict):
    """The checkpoint's `DualTokenMLLMConfig` with `overrides`, validated anew. Only `CONTINUATION_FIELDS` may take a
    new value; any other override must equal what the checkpoint holds (a training config may restate them)."""
    from mllm.configuration import DualTokenMLLMConfig

    current = DualTokenMLLMConfig.from_pretrained(path).to_dict()
    refused = sorted(
        key
        for key, value in overrides.items()
        if key not in CONTINUATION_FIELDS and not _same_value(current.get(key), value)
    )
    if refused:
        raise ValueError(
            f"model_overrides {refused} cannot change when training continues from {path} (model_name_or_path): "
            f"only {', '.join(CONTINUATION_FIELDS)} may; the others shape the weights"
        )
    return DualTokenMLLMConfig.from_dict(
        {**current, **{key: value for key, value in overrides.items() if key in CONTINUATION_FIELDS}}
    )


def build_model(model_args: ModelArguments, seed: int):
    """(DualTokenMLLM, DualTokenProcessor): loaded from model_name_or_path, or built from a preset."""
    from transformers import AutoTokenizer

    from mllm.modeling import DualTokenMLLM, default_attn_implementation
    from mllm.presets import build, tiny_text_config
    from mllm.processor import IMAGE_TOKENIZER_DIRNAME, DualTokenProcessor

    attn = model_args.attn_implementation or default_attn_implementation()
    if model_args.model_name_or_path:
        path = str(Path(model_args.model_name_or_path).resolve())
        config = continued_config(path, model_args.model_overrides) if model_args.model_overrides else None
        model = DualTokenMLLM.from_pretrained(path, config=config, attn_implementation=attn)
        return model, DualTokenProcessor.from_pretrained(path)
    image_tokenizer = None
    if model_args.image_tokenizer:
        from tokenizer.modeling import DualTokenModel

        image_tokenizer = DualTokenModel.from_pretrained(model_args.image_tokenizer).eval()
    elif not model_args.random_code_embeddings:
        raise ValueError("set image_tokenizer (its codebooks feed the model) or random_code_embeddings: true")
    tokenizer_dir = model_args.text_tokenizer or model_args.llm_path
    if tokenizer_dir is None:
        raise ValueError("set text_tokenizer (or llm_path, whose tokenizer is then used)")
    text_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    overrides = dict(model_args.model_overrides or {})
    if model_args.preset == "tiny" and "text_config" in overrides:
        overrides["text_config"] = {**tiny_text_config(), **overrides["text_config"]}
    overrides["attn_implementation"] = attn
    model, processor = build(
        model_args.preset, text_tokenizer, image_tokenizer, llm_dir=model_args.llm_path, **overrides
    )
    if image_tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        shape = model.pixel_code_embedding.shape
        model.set_code_embeddings(
            torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        )
    else:
        model.config.image_tokenizer_path = IMAGE_TOKENIZER_DIRNAME
    return model, processor


def configure_trainable(model, processor, model_args: ModelArguments):
    """Stage 1 freezes the LLM; LoRA wraps the model (see train.lora); "all" trains everything."""
    if model_args.lora:
        from train.lora import apply_lora

        return apply_lora(
            model,
            processor,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            train_special_tokens=model_args.lora_train_special_tokens,
        )
    if model_args.train_modules == "projectors_heads":
        model.language_model.requires_grad_(False)
    elif model_args.train_modules != "all":
        raise ValueError(
            f"train_modules must be 'all' or 'projectors_heads', got {model_args.train_modules!r}"
        )
    return model


def _total_peak(training_args: MLLMTrainingArguments) -> float:
    """Matmul peak of all ranks measured at the same time, summed."""
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    peak = torch.tensor([measure_matmul_peak(training_args.device, dtype)], dtype=torch.float64)
    if torch.distributed.is_initialized():
        peak = peak.to(training_args.device)
        torch.distributed.all_reduce(peak)
    return float(peak.sum())


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> MLLMTrainer:
    model_args, data_args, training_args, resume = parse_arguments(sys.argv[1:] if argv is None else argv)
    output_dir = Path(training_args.output_dir)
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint and not resume:
        raise ValueError(
            f"{output_dir} already holds {Path(checkpoint).name}; pass --resume or a new output_dir"
        )
    if resume and checkpoint is None and training_args.process_index == 0:
        print(f"--resume: no complete checkpoint in {output_dir}; starting from the beginning", flush=True)
    _ = training_args.device  # initialises the process group before the model: ZeRO-3 partitions it on build
    if training_args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # adopts the process group (accelerate skips this on CPU)
    set_seed(training_args.seed)
    model, processor = build_model(model_args, training_args.seed)
    flop_model = FlopModel.of(model)
    dataset = build_training_data(
        processor,
        data_args.code_store,
        data_args.llava_files,
        data_args.prompt_files,
        caption_dropout=data_args.caption_dropout,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        max_length=data_args.max_length,
        conversation_repeat=data_args.conversation_repeat,
        prompt_repeat=data_args.prompt_repeat,
        skip_missing_images=data_args.skip_missing_images,
    )
    if dataset.store is not None:
        dataset.store.check_geometry(
            model.config.grid_size, model.config.rq_depth, model.config.codebook_size
        )
        if model_args.code_prior_init and not model_args.model_name_or_path:
            model.set_code_priors(*dataset.store.code_counts())
    model = configure_trainable(model, processor, model_args)
    trainer = MLLMTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=MLLMCollator(processor),
        processing_class=processor,
        callbacks=callbacks,
        flop_model=flop_model,
    )
    peak = _total_peak(training_args) if training_args.measure_matmul_peak else 0.0
    start_step, start_tokens, start_flos = (
        _resumed_counters(checkpoint) if resume and checkpoint else (0, 0, 0.0)
    )
    result = trainer.train(resume_from_checkpoint=checkpoint if resume else None)
    trainer.save_model(str(output_dir))
    runtime = result.metrics["train_runtime"]
    samples = (
        (trainer.state.global_step - start_step) * training_args.train_batch_size * training_args.world_size
    )
    samples *= training_args.gradient_accumulation_steps
    throughput = {
        "samples_per_second": samples / runtime,
        "tokens_per_second": (trainer.state.num_input_tokens_seen - start_tokens) / runtime,
        "train_flops_per_second": (trainer.state.total_flos - start_flos) / runtime,
        "matmul_peak_flops": peak,
        "world_size": training_args.world_size,
        "steps": trainer.state.global_step - start_step,
        "runtime_s": runtime,
        "skipped_missing_images": dataset.skipped_missing,
    }
    throughput["peak_fraction"] = throughput["train_flops_per_second"] / peak if peak else None
    trainer.log(
        {f"final_{key}": value for key, value in throughput.items() if key in FINAL_SCALARS and value}
    )
    if trainer.is_world_process_zero():
        atomic_write_json(output_dir / "throughput.json", throughput)
        fraction = f"{throughput['peak_fraction']:.1%}" if peak else "n/a"
        print(
            f"throughput: {throughput['samples_per_second']:.2f} samples/s, "
            f"{throughput['tokens_per_second']:.0f} tokens/s, {fraction} of the measured matmul peak "
            f"({peak / 1e9:.1f} GFLOP/s over {training_args.world_size} process(es))",
            flush=True,
        )
    return trainer


def _resumed_counters(checkpoint: str) -> tuple[int, int, float]:
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return (
        int(state["global_step"]),
        int(state.get("num_input_tokens_seen", 0)),
        float(state.get("total_flos", 0.0)),
    )


def run_script(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> None:
    """`main` for a process that exits afterwards (a launcher's entry point). The process group is torn down here,
    explicitly; a worker of a multi-process launch (WORLD_SIZE > 1) that finished then leaves with `os._exit(0)`
    after flushing its streams, skipping interpreter finalisation: there a gloo/DeepSpeed background thread could
    still abort the worker ("terminate called without an active exception", exit -6) after everything was saved,
    about one resume in ten on a loaded 2-core machine (tests/test_train_resume.py). Every output is written,
    atomically, before `main` returns."""
    try:
        main(argv, callbacks=callbacks)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    run_script()
