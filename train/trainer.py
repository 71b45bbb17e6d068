"""`MLLMTrainer`: the HF Trainer with the few things DualToken training needs on top of it.

- per-modality losses (text, pixel head, semantic head) logged next to the total, weighted by how many
  positions each term covered and summed over ranks;
- exact resume: length grouping from the dataset's estimated lengths with a (seed, epoch)-seeded order; sampler
  and dataset get their epoch before every epoch (accelerate's resumed, batch-skipping loader does not pass it on);
  a run resumed at its last step trains no further step; tied weights (one copy in the checkpoint) count as
  restored, and a checkpoint missing any other weight is an error rather than a warning;
- atomic checkpoints: Trainer writes `checkpoint-N` (weights, optimizer/DeepSpeed state, RNG, trainer state)
  inside `OUTPUT/.partial/`, and it is renamed to `OUTPUT/checkpoint-N` only once every rank is done, so a kill
  while saving leaves the previous checkpoint as the last complete one;
- FLOPs per batch from `train.throughput.FlopModel` (the numbers behind "fraction of matmul peak").
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils import logging

from mllm.sequence import IGNORE_INDEX
from train.data import SeededLengthGroupedSampler
from train.throughput import FlopModel

logger = logging.get_logger(__name__)
PARTIAL_DIR = ".partial"
MODALITY_LOSSES = ("loss_text", "loss_pixel", "loss_semantic")


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `output_dir` (partial checkpoints live elsewhere until complete)."""
    return get_last_checkpoint(str(output_dir)) if os.path.isdir(output_dir) else None


def _pass_epoch(loader: Any, epoch: int) -> None:
    """Give `epoch` to every sampler and dataset under `loader` that takes one. Trainer relies on accelerate's
    `DataLoaderShard.set_epoch`, which misses them in the batch-skipping loader of a resumed epoch (the dataset
    always, the sampler under data parallelism): that epoch's rest then had epoch 0's order and caption dropout."""
    stack, seen = [loader], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node is not loader and callable(getattr(node, "set_epoch", None)):
            node.set_epoch(epoch)
        stack += [getattr(node, name, None) for name in ("batch_sampler", "sampler", "dataset")]


class MLLMTrainer(Trainer):
    def __init__(self, *args: Any, flop_model: FlopModel | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.flop_model = flop_model
        # Running sums on this rank since the last log: loss_text*n_text, loss_pixel*n_cells,
        # loss_semantic*n_cells, n_text, n_cells.
        self._modality_sums = torch.zeros(5, dtype=torch.float64)
        self._staging = False

    # ------------------------------------------------------------------ data order

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if self.args.train_sampling_strategy == "group_by_length" and lengths is not None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return SeededLengthGroupedSampler(batch, lengths, seed)
        return super()._get_train_sampler(train_dataset)

    def _run_epoch(self, *, model: Any, epoch: int, train_dataloader: Any, **kwargs: Any) -> None:
        if self.state.global_step >= self.state.max_steps:
            # Resumed from the last checkpoint: Trainer would otherwise train one more step before checking.
            self.control.should_training_stop = True
            return
        _pass_epoch(train_dataloader, epoch)
        super()._run_epoch(model=model, epoch=epoch, train_dataloader=train_dataloader, **kwargs)

    # ------------------------------------------------------------------ resume

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """A checkpoint holds one copy of each tied tensor (the tiny preset's lm_head is embed_tokens): a missing
        key sharing its tensor with a loaded one was restored; any other missing key would resume wrong weights."""
        missing = set(load_result.missing_keys)
        names_of: dict[int, list[str]] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            names_of.setdefault(id(tensor), []).append(name)
        restored = {name for names in names_of.values() if set(names) - missing for name in names}
        lost = sorted(missing - restored)
        if lost:
            raise ValueError(f"the checkpoint has no weights for {lost}: it was not written by this model")
        if load_result.unexpected_keys:
            logger.warning(f"The checkpoint holds weights the model has not: {load_result.unexpected_keys}")

    # ------------------------------------------------------------------ loss and logging

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            self._accumulate_modality_losses(outputs, inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _accumulate_modality_losses(self, outputs, inputs) -> None:
        """Add this micro-batch's loss terms, weighted by the positions they cover, to the running sums (on
        device: no synchronisation per step)."""
        labels = inputs["labels"]
        n_text = (labels[:, 1:] != IGNORE_INDEX).sum().double()
        cells = self.flop_model.cells_per_image if self.flop_model else 0
        outputs_mask = inputs.get("image_is_output")
        n_cells = (outputs_mask.sum() * cells).double() if outputs_mask is not None else n_text * 0
        terms = [outputs.get(name) for name in MODALITY_LOSSES]
        text, pixel, semantic = (n_text * 0 if t is None else t.detach().double() for t in terms)
        update = torch.stack([text * n_text, pixel * n_cells, semantic * n_cells, n_text, n_cells])
        if self._modality_sums.device != update.device:
            self._modality_sums = self._modality_sums.to(update.device)
        self._modality_sums += update

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a periodic training log (every rank gets here at the same step)
            sums = self._modality_sums.to(self.args.device)
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            sums = sums.cpu()
            if sums[3] > 0:
                logs["loss_text"] = round(float(sums[0] / sums[3]), 6)
            if sums[4] > 0:
                logs["loss_pixel"] = round(float(sums[1] / sums[4]), 6)
                if self.flop_model is None or self.flop_model.heads == 2:
                    logs["loss_semantic"] = round(float(sums[2] / sums[4]), 6)
            self._modality_sums.zero_()
        super().log(logs, start_time)

    def floating_point_ops(self, inputs: dict[str, Any]) -> float:
        if self.flop_model is None:
            return super().floating_point_ops(inputs)
        return self.flop_model.training_flops(inputs)

    # ------------------------------------------------------------------ atomic checkpoints

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, PARTIAL_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, PARTIAL_DIR)
        if self.args.should_save and os.path.exists(staging_root):
            shutil.rmtree(staging_root)  # leftovers of a run killed while saving
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):  # an older run's checkpoint of the same step (resumed from earlier)
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
