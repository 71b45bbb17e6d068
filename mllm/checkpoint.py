"""Loading a saved MLLM checkpoint directory (model + processor) for inference.

A checkpoint directory is what `DualTokenMLLM.save_pretrained(directory, processor=processor)` writes: config.json
and model.safetensors, the text tokenizer, processor_config.json and (when the processor had one) the DualToken
image tokenizer in `image_tokenizer/`. `load_checkpoint` restores both halves on one device and checks that they
agree (special ids, grid geometry) before any prompt is formatted.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mllm.modeling import DualTokenMLLM
from mllm.processor import PROCESSOR_CONFIG_NAME, DualTokenProcessor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(
    directory: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    load_image_tokenizer: bool = True,
) -> tuple[DualTokenMLLM, DualTokenProcessor]:
    """(model in eval mode, processor) from a checkpoint directory, both on `device` (default: CUDA if present).

    `dtype` applies to the LLM, projectors and heads; the image tokenizer stays float32. Raises FileNotFoundError
    naming the missing file and ValueError when the model and processor disagree.
    """
    from mllm.decoding import check_compatible

    path = Path(directory)
    for name in ("config.json", PROCESSOR_CONFIG_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} is not an MLLM checkpoint: {name} is missing (save with "
                "DualTokenMLLM.save_pretrained(directory, processor=processor))"
            )
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"load_checkpoint: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    device = torch.device(device) if device is not None else default_device()
    model = DualTokenMLLM.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = DualTokenProcessor.from_pretrained(path, load_image_tokenizer=load_image_tokenizer)
    if processor.image_tokenizer is not None:
        processor.image_tokenizer.to(device).eval()
    check_compatible(model, processor)
    return model, processor
