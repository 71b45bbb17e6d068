"""Launched by the training tests (alone or under torchrun): `train.mllm_train.main` plus test instruments.

- PROBE_OUT=FILE: before and after training, run the engine's model on one fixed batch (the whole dataset) and
  write the batch, both losses and the final logits to FILE (safetensors, rank 0).
- KILL_DURING_SAVE_STEP=N: SIGKILL rank 0 in the middle of writing checkpoint N (after the weights and the
  optimizer/DeepSpeed state, before the RNG and trainer state), like a machine dying while saving.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from train import mllm_train
from train.data import MLLMCollator
from train.trainer import MLLMTrainer

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_codes", "semantic_codes", "image_is_output")


class ProbeCallback(TrainerCallback):
    def __init__(self, path: str):
        self.path = path
        self.batch = None
        self.initial_loss = None

    def _run(self, model):
        with torch.no_grad():
            return model(**self.batch, logits_to_keep=0)

    def on_train_begin(
        self, args, state, control, model=None, train_dataloader=None, processing_class=None, **kw
    ):
        dataset = train_dataloader.dataset
        self.batch = MLLMCollator(processing_class)([dataset[i] for i in range(len(dataset))])
        self.initial_loss = self._run(model).loss

    def on_train_end(self, args, state, control, model=None, **kwargs):
        out = self._run(model)
        if state.is_world_process_zero:
            tensors = {key: self.batch[key] for key in BATCH_KEYS}
            tensors.update(
                initial_loss=self.initial_loss.reshape(1),
                final_loss=out.loss.reshape(1),
                logits=out.logits,
                pixel_logits=out.pixel_logits,
                semantic_logits=out.semantic_logits,
            )
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, self.path)


def _install_kill(step: int) -> None:
    original = MLLMTrainer._save_rng_state

    def save_rng_state(self, output_dir):
        if self.state.global_step == step and self.args.process_index == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)

    MLLMTrainer._save_rng_state = save_rng_state


if __name__ == "__main__":
    if os.environ.get("KILL_DURING_SAVE_STEP"):
        _install_kill(int(os.environ["KILL_DURING_SAVE_STEP"]))
    callbacks = [ProbeCallback(os.environ["PROBE_OUT"])] if os.environ.get("PROBE_OUT") else []
    mllm_train.run_script(sys.argv[1:], callbacks=callbacks)
