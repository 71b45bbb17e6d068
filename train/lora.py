"""LoRA for DualTokenMLLM through peft, and `dualtoken mllm merge-lora`.

Adapters go on the LLM's linear layers only (a regex anchored at `language_model.`, so the depth heads' own
linears are never adapted); the code MLPs and both depth heads are trained in full (`modules_to_save`), and
the embedding rows of the image delimiters and chat markers (the tokens the base LLM never learned) are
trained through peft's `trainable_token_indices` (tied lm_head rows follow). Everything else is frozen.

A LoRA run starts from a saved DualTokenMLLM directory (its absolute path becomes the adapter's base), so
`merge-lora` can rebuild the base model, apply the adapter, merge and save a plain model directory.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mllm.processor import PROCESSOR_CONFIG_NAME, DualTokenProcessor
from mllm.sequence import BOI, EOI, TURN_END, TURN_START

if TYPE_CHECKING:  # peft is imported where used, so `dualtoken --help` stays fast
    from peft import LoraConfig, PeftModel

VISUAL_MODULES = (
    "pixel_projector",
    "semantic_projector",
    "understanding_projector",
    "pixel_head",
    "semantic_head",
)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINED_TOKENS = (BOI, EOI, TURN_START, TURN_END)


def lora_config(
    model,
    processor: DualTokenProcessor,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    train_special_tokens: bool = True,
) -> LoraConfig:
    """The LoraConfig of a DualTokenMLLM (see the module docstring)."""
    from peft import LoraConfig

    if not target_modules:
        raise ValueError("LoRA needs at least one target module name (e.g. q_proj)")
    names = "|".join(re.escape(name) for name in target_modules)
    vocab = processor.tokenizer.get_vocab()
    tokens = sorted({vocab[t] for t in TRAINED_TOKENS}) if train_special_tokens else None
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf"language_model\..*\.({names})",
        modules_to_save=[name for name in VISUAL_MODULES if getattr(model, name, None) is not None],
        trainable_token_indices=tokens,
        bias="none",
    )


def apply_lora(model, processor: DualTokenProcessor, **kwargs) -> PeftModel:
    """Wrap `model` (loaded from a directory) in a PeftModel with `lora_config(model, processor, **kwargs)`."""
    if not getattr(model, "name_or_path", ""):
        raise ValueError("LoRA training starts from a saved DualTokenMLLM directory (set model_name_or_path)")
    _expose_tied_embeddings(model)
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, processor, **kwargs))


def _expose_tied_embeddings(model) -> None:
    """peft finds the lm_head tied to the input embeddings (so trainable token rows stay tied) only through a
    dict-valued `_tied_weights_keys` on the top model, below which it collects the submodules' entries (the
    wrapped LLM declares lm_head <- embed_tokens). Give this instance an empty one when the class has none."""
    if not isinstance(getattr(model, "_tied_weights_keys", None), dict):
        model._tied_weights_keys = {}


def load_lora(adapter_dir: str | os.PathLike, base: str | None = None) -> PeftModel:
    """The base DualTokenMLLM (the directory the adapter records, or `base`) with the adapter applied."""
    from peft import PeftConfig, PeftModel

    from mllm.modeling import DualTokenMLLM

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir}")
    base = base or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"the base model {base!r} of adapter {adapter_dir} is not a model directory; pass it"
        )
    model = DualTokenMLLM.from_pretrained(base)
    _expose_tied_embeddings(model)
    return PeftModel.from_pretrained(model, adapter_dir)


def merge_lora(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None):
    """Base model + adapter -> merged plain DualTokenMLLM saved (with its processor) in `out_dir`."""
    adapter_dir = Path(adapter_dir)
    peft_model = load_lora(adapter_dir, base)
    base_dir = Path(peft_model.peft_config["default"].base_model_name_or_path if base is None else base)
    merged = peft_model.merge_and_unload()
    source = adapter_dir if (adapter_dir / PROCESSOR_CONFIG_NAME).is_file() else base_dir
    merged.save_pretrained(out_dir, processor=DualTokenProcessor.from_pretrained(source))
    return merged


def _run_merge(args: argparse.Namespace) -> int:
    merge_lora(args.adapter, args.out, args.base)
    print(f"merged {args.adapter} into {args.out}")
    return 0


def register_merge(mllm_subparsers) -> None:
    """Add `merge-lora` to the `dualtoken mllm` subcommands."""
    parser = mllm_subparsers.add_parser("merge-lora", help="merge a LoRA adapter into its base model")
    parser.add_argument("--adapter", required=True, help="adapter directory written by a LoRA training run")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument(
        "--base", default=None, help="base model directory (default: the one the adapter names)"
    )
    parser.set_defaults(func=_run_merge)
