"""Benchmark the shapes world: dataset generation rate (scenes/s) and scene-parser throughput and accuracy.

python bench/bench_shapes.py --n 50000 --size 64 --workers 2 --out /tmp/shapes-bench
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import ImageFilter

from data_recipes.scene_parser import parse_scene
from data_recipes.shapes import render, sample_scene
from data_recipes.shapes_dataset import write_shapes_dataset


def bench_generation(out: Path, n: int, size: int, workers: int) -> dict:
    start = time.perf_counter()
    write_shapes_dataset(out, n=n, size=size, seed=0, workers=workers, force=True)
    elapsed = time.perf_counter() - start
    return {"scenes": n, "size": size, "workers": workers, "seconds": elapsed, "scenes_per_s": n / elapsed}


def bench_parser(size: int, count: int, blur: float, noise_sigma: float) -> dict:
    rng, noise = random.Random(0), np.random.default_rng(0)
    images, scenes = [], []
    for _ in range(count):
        scene = sample_scene(rng)
        image = render(scene, size)
        if blur > 0:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        array = np.asarray(image, dtype=np.float32) + noise.normal(0.0, noise_sigma, (size, size, 3))
        images.append(np.clip(np.round(array), 0, 255).astype(np.uint8))
        scenes.append(scene)
    parse_scene(images[0])  # build the templates outside the timing
    start = time.perf_counter()
    exact = sum(parse_scene(image) == scene for image, scene in zip(images, scenes))
    elapsed = time.perf_counter() - start
    return {
        "size": size,
        "blur": blur,
        "noise_sigma": noise_sigma,
        "images": count,
        "exact": exact / count,
        "images_per_s": count / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="dataset directory (default: a temporary one)")
    parser.add_argument("--parse-images", type=int, default=1000)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="shapes-bench-")) / "data"
    results = {"generation": bench_generation(out, args.n, args.size, args.workers)}
    if args.out is None:
        shutil.rmtree(out.parent, ignore_errors=True)
    results["parser"] = [
        bench_parser(args.size, args.parse_images, 0.0, 0.0),
        bench_parser(args.size, args.parse_images, 0.7, 8.0),
        bench_parser(384, max(args.parse_images // 10, 1), 0.0, 0.0),
    ]
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
