"""`dualtoken train zero-to-model`: a DeepSpeed ZeRO checkpoint -> a plain DualTokenMLLM model directory.

Every checkpoint the trainer writes already holds gathered `model.safetensors` when the DeepSpeed config sets
`stage3_gather_16bit_weights_on_model_save` (the shipped ones do); this command is for the rest: ZeRO-3 runs
that skip the gather to save memory, and recovering the fp32 master weights of a bf16 run. It consolidates the
per-rank shards with DeepSpeed's own `zero_to_fp32` (which unpickles the checkpoint's optimizer files: use it
on checkpoints you wrote), loads them strictly into the architecture of the checkpoint's config.json, and saves
with the processor found in the checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def zero_to_model(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Consolidate the ZeRO shards of `checkpoint` (a `checkpoint-N` dir with `latest`) into `out`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mllm.configuration import DualTokenMLLMConfig
    from mllm.modeling import DualTokenMLLM
    from mllm.processor import PROCESSOR_CONFIG_NAME, DualTokenProcessor

    checkpoint = Path(checkpoint)
    if not (checkpoint / "latest").is_file():
        raise FileNotFoundError(
            f"zero-to-model: {checkpoint} has no 'latest' file (not a DeepSpeed checkpoint)"
        )
    if (checkpoint / "adapter_config.json").is_file():
        raise ValueError(
            f"zero-to-model: {checkpoint} is a LoRA run; use `dualtoken mllm merge-lora` on its adapter"
        )
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"zero-to-model: {checkpoint} has no config.json")
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    config = DualTokenMLLMConfig.from_pretrained(checkpoint)
    model = DualTokenMLLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"language_model.lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"zero-to-model: the checkpoint does not match {checkpoint / 'config.json'}: "
            f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    processor = None
    if (checkpoint / PROCESSOR_CONFIG_NAME).is_file():
        processor = DualTokenProcessor.from_pretrained(checkpoint)
    model.save_pretrained(out, processor=processor)
    return Path(out)


def run_cli(args: argparse.Namespace) -> int:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    zero_to_model(args.checkpoint, args.out, dtype)
    print(f"wrote {args.out}")
    return 0
