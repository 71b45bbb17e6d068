"""Fixtures for the training tests: a micro text tokenizer, a tiny LLaVA JSON + prompts JSONL over a code store
of random codes, a config file for `train.mllm_train`, and a launcher for 1-2 CPU processes.

`python -m train_testing ARGS` runs `train.mllm_train` with ARGS; KILL_AT=MOMENT:STEP SIGKILLs it (every rank)
at that point (see `KillAt`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from mllm_testing import CORPUS, train_text_tokenizer
from transformers import TrainerCallback

from data_recipes.code_shards import CodeShardWriter, image_key

REPO = Path(__file__).resolve().parents[1]
MICRO_OVERRIDES = {
    "codebook_size": 64,
    "code_dim": 8,
    "rq_depth": 4,
    "grid_size": 3,
    "depth_head_width": 32,
    "depth_head_heads": 2,
    "depth_head_layers": 2,
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
}
QUESTIONS = ["what color is the square", "how many shapes are there", "describe the image please"]


def image_file(number: int) -> str:
    return f"images/{number:07d}.png"


def write_fixture(
    root: Path, images: int = 12, seed: int = 0, grid: int = 3, depth: int = 4, codebook_size: int = 64
) -> dict[str, str]:
    """Write tokenizer, LLaVA JSON, prompts JSONL and a complete store of random codes under `root`; return
    their paths (the defaults match MICRO_OVERRIDES)."""
    root.mkdir(parents=True, exist_ok=True)
    train_text_tokenizer(root / "text_tokenizer")
    generator = torch.Generator().manual_seed(seed)
    shape = (images, grid, grid, depth)
    writer = CodeShardWriter(
        root / "codes", (grid, grid), depth, codebook_size, "random", "fixture", shard_size=5
    )
    writer.add(
        [image_key(image_file(i)) for i in range(images)],
        torch.randint(0, codebook_size, shape, generator=generator),
        torch.randint(0, codebook_size, shape, generator=generator),
    )
    writer.finish()
    llava = []
    for i in range(images):
        llava.append(
            {
                "id": f"{i}-vqa",
                "image": image_file(i),
                "conversations": [
                    {"from": "human", "value": "<image>\n" + QUESTIONS[i % 3]},
                    {"from": "gpt", "value": CORPUS[i % len(CORPUS)]},
                ],
            }
        )
    llava.append(
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}],
        }
    )
    (root / "llava.json").write_text(json.dumps(llava))
    with (root / "prompts.jsonl").open("w") as handle:
        for i in range(images):
            handle.write(json.dumps({"prompt": CORPUS[(i + 3) % len(CORPUS)], "file": image_file(i)}) + "\n")
    return {
        "text_tokenizer": str(root / "text_tokenizer"),
        "code_store": str(root / "codes"),
        "llava": str(root / "llava.json"),
        "prompts": str(root / "prompts.jsonl"),
    }


def write_config(path: Path, fixture: dict[str, str], output_dir: Path, **overrides) -> Path:
    """A micro-model training config (fp32 CPU, a few steps) as YAML."""
    config = {
        "preset": "tiny",
        "text_tokenizer": fixture["text_tokenizer"],
        "random_code_embeddings": True,
        "model_overrides": MICRO_OVERRIDES,
        "llava_files": [fixture["llava"]],
        "prompt_files": [fixture["prompts"]],
        "code_store": fixture["code_store"],
        "caption_dropout": 0.2,
        "max_length": 256,
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "max_steps": 6,
        "logging_steps": 1,
        "save_steps": 2,
        "save_total_limit": 2,
        "use_cpu": True,
        "seed": 7,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "measure_matmul_peak": False,
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def launch(
    script: Path | str,
    args: list[str],
    nproc: int = 1,
    timeout: float = 240,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a Python script (path ending in .py, else a module) with 1 process, or `nproc` CPU processes under
    torchrun (gloo); `env` adds variables."""
    env = {
        **(env or {}),
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
    }
    target = ["-m", script] if isinstance(script, str) and not script.endswith(".py") else [str(script)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        command += ["--master_port", str(_free_port()), *target, *args]
    else:
        command = [sys.executable, *target, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class KillAt(TrainerCallback):
    """SIGKILL this process at `moment` of optimizer step `step`: "begin" (about to compute the step), "end" (the
    optimizer stepped, nothing of it saved yet), "saved" (its checkpoint complete) or "train_end" (every step
    done, the final model not yet saved; `step` unused)."""

    MOMENTS = ("begin", "end", "saved", "train_end")

    def __init__(self, moment: str, step: int):
        if moment not in self.MOMENTS:
            raise ValueError(f"KILL_AT moment must be one of {self.MOMENTS}, got {moment!r}")
        self.moment, self.step = moment, step

    def _kill(self, moment: str, step: int | None = None) -> None:
        if moment == self.moment and step in (None, self.step):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_begin(self, args, state, control, **kwargs):
        self._kill("begin", state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        self._kill("end", state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self._kill("saved", state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._kill("train_end")


if __name__ == "__main__":
    from train import mllm_train

    kill = os.environ.get("KILL_AT")
    callbacks = []
    if kill:
        moment, step = kill.split(":")
        callbacks.append(KillAt(moment, int(step)))
    mllm_train.run_script(sys.argv[1:], callbacks=callbacks)  # tears the process group down before exit
