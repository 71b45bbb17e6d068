"""Training throughput of the tiny MLLM preset: one process vs DeepSpeed ZeRO-2 with 2 processes (CPU, gloo).

Both runs train the tiny preset (4-layer 256-wide Qwen2, 8x8 grids of depth 4, K=1024, two 3-layer depth
heads) on the same fixture (LLaVA conversations + T2I prompts over a store of random codes) through
`python -m train.mllm_train`, so start-up is excluded: the figures come from each run's throughput.json
(tokens = non-padding sequence positions, FLOPs = 6·N per position of each part of the model). The machine's
matmul peak is measured here, in the same run, with a large fp32 `torch.mm` on all cores.

    .venv/bin/python bench/train.py [--steps 30] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from train_testing import launch, write_config, write_fixture  # noqa: E402

from train.throughput import measure_matmul_peak  # noqa: E402

TINY_GEOMETRY = {"codebook_size": 1024, "code_dim": 32, "rq_depth": 4, "grid_size": 8}


def run(root: Path, fixture: dict, name: str, steps: int, batch: int, nproc: int, **extra) -> dict:
    config = write_config(
        root / f"{name}.yaml",
        fixture,
        root / name,
        model_overrides=TINY_GEOMETRY,
        max_steps=steps,
        per_device_train_batch_size=batch,
        save_strategy="no",
        logging_steps=steps,
        max_length=512,
        measure_matmul_peak=True,
        **extra,
    )
    threads = {"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // nproc))}
    result = launch("train.mllm_train", ["--config", str(config)], nproc=nproc, timeout=1200, env=threads)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-4000:]}")
    return json.loads((root / name / "throughput.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="examples per process per step")
    args = parser.parse_args()
    peak = measure_matmul_peak("cpu", torch.float32, size=2048)
    print(f"matmul peak (fp32 torch.mm 2048^3, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fixture = write_fixture(root / "data", images=64, grid=8, depth=4, codebook_size=1024)
        single = run(root, fixture, "single", args.steps, args.batch, nproc=1)
        zero2 = run(root, fixture, "zero2", args.steps, args.batch, nproc=2, deepspeed="zero2")
    print(
        f"{'run':<22}{'samples/s':>10}{'tokens/s':>10}{'GFLOP/s':>9}{'of peak':>9}{'(run-measured peak)':>21}"
    )
    for name, result in (("1 process", single), ("ZeRO-2, 2 processes", zero2)):
        flops = result["train_flops_per_second"]
        print(
            f"{name:<22}{result['samples_per_second']:>10.1f}{result['tokens_per_second']:>10.0f}"
            f"{flops / 1e9:>9.2f}{flops / peak:>9.1%}{result['peak_fraction']:>21.1%}"
        )
    print(f"ZeRO-2 x2 / single: {zero2['tokens_per_second'] / single['tokens_per_second']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
