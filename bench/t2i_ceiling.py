"""How far can any generator get through the DualToken pixel codes? The T2I scene-parser check on test images
rebuilt from codes that a generator could produce:

  real                 the test images themselves (the parser's own ceiling: 100%)
  depths 0..k-1        reconstructions from the first k residual depths of their pixel codes (k = D: the plain
                       reconstruction, the ceiling that `dualtoken eval t2i --reference` reports)
  depths 0..k-1 > D    more residual depths than the tokenizer uses, from the same shared codebook
  pre-quantization     the continuous pixel latent itself through the same decoder: what the codes cost
  lookup: mode         every cell gets, per depth, the code most often seen on the train split for what the cell
                       shows (`data_recipes.cell_truth` class) at that place: a generator that knows each cell's
                       content and place exactly but draws cells independently
  lookup: mean latent  every cell gets the mean quantized latent of its (content, place) on the train split,
                       decoded as it is (not a code sequence; an upper bound for independent cells)

The lookup rows show how much of an image's codes depends on more than the cell itself (neighbours, the rest of the
scene); the code entropies of `eval.t2i_diagnostics.code_entropies` on the train split are printed too, and so is
what the parser reads wrong in the plain reconstructions: per shape and size, the objects whose cell parses as
another shape, color or size, or as empty (what a better tokenizer has to fix for the reconstruction target).

  .venv/bin/python bench/t2i_ceiling.py --data runs/demo/data --tokenizer runs/demo/tokenizer --codes runs/demo/codes/train
  .venv/bin/python bench/t2i_ceiling.py --tokenizer runs/other/tokenizer --reconstructions-only   # no encoded train split
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_recipes.cell_truth import NUM_CELL_CLASSES, cell_class_grid  # noqa: E402
from data_recipes.code_shards import CodeStore, image_key  # noqa: E402
from data_recipes.image_io import load_image  # noqa: E402
from data_recipes.scene_parser import parse_scene  # noqa: E402
from data_recipes.shapes import Scene  # noqa: E402
from eval.t2i_diagnostics import code_entropies  # noqa: E402
from eval.t2i_scoring import T2I_TAGS, load_prompt_specs, score_t2i  # noqa: E402


def scenes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row(name: str, specs, images) -> dict:
    scored = score_t2i(specs, images, show_progress=False)["all"]
    result = {"images": name, "overall": 100 * scored["overall"]}
    result.update({t: 100 * scored["per_tag"].get(t, float("nan")) for t in T2I_TAGS})
    print(f"| {name} | " + " | ".join(f"{result[k]:.1f}" for k in ("overall", *T2I_TAGS)) + " |", flush=True)
    return result


def object_errors(truths: list[Scene], images) -> dict[str, dict[str, int]]:
    """Per 'shape size': how many objects the images show wrongly (parsed as another shape / color / size, or
    missing), out of how many; printed as a table."""
    out: dict[str, dict[str, int]] = {}
    for truth, image in zip(truths, images, strict=True):
        parsed = {obj.cell: obj for obj in parse_scene(image).objects}
        for obj in truth.objects:
            row = out.setdefault(
                f"{obj.shape} {obj.size}", {"objects": 0, "shape": 0, "color": 0, "size": 0, "missing": 0}
            )
            row["objects"] += 1
            got = parsed.get(obj.cell)
            if got is None:
                row["missing"] += 1
            elif got.shape != obj.shape:
                row["shape"] += 1
            elif got.color != obj.color:
                row["color"] += 1
            elif got.size != obj.size:
                row["size"] += 1
    print("| object | objects | wrong shape | wrong color | wrong size | missing |")
    print("|---|---|---|---|---|---|")
    for name in sorted(out):
        r = out[name]
        print(f"| {name} | {r['objects']} | {r['shape']} | {r['color']} | {r['size']} | {r['missing']} |")
    return out


def reconstruction_rows(tokenizer, specs, real, truths) -> tuple[list[dict], dict, dict]:
    """Rows for the real images, their reconstructions from the first k depths, more depths of the same shared
    codebook and the pre-quantization latent; with the per-object errors of the plain and the unquantized one."""
    from mllm.generation import tensor_to_pil
    from tokenizer.image_processing import preprocess

    quantizer = tokenizer.quantizer("pixel")
    depth = int(tokenizer.config.rq_depth)
    pixels = preprocess(real, image_size=int(tokenizer.config.image_size))
    rows = [row("real", specs, real)]
    with torch.no_grad():
        vectors = quantizer.lookup(tokenizer.encode(pixels).pixel)
        for k in range(1, depth + 1):
            images = [tensor_to_pil(x) for x in tokenizer._decode_latent(vectors[..., :k, :].sum(dim=-2))]
            rows.append(row(f"depths 0..{k - 1}", specs, images))
        errors = object_errors(truths, images)
        # Where the reconstruction loses detail: more residual depths of the same (shared) codebook, and the
        # pre-quantization latent itself, through the same decoder.
        latent, _ = tokenizer._tower_to_semantic_layer(pixels)
        latent = tokenizer._to_grid(latent).float()
        residual, total = latent.clone(), torch.zeros_like(latent)
        for k in range(1, 2 * depth + 1):
            step = quantizer.lookup(quantizer.nearest(residual))
            residual, total = residual - step, total + step
            if k > depth and k % 2 == 0:
                images = [tensor_to_pil(x) for x in tokenizer._decode_latent(total)]
                rows.append(row(f"depths 0..{k - 1} of the same codebook", specs, images))
        images = [tensor_to_pil(x) for x in tokenizer._decode_latent(latent)]
        rows.append(row("pre-quantization latent (no codes)", specs, images))
        unquantized_errors = object_errors(truths, images)
    return rows, errors, unquantized_errors


def lookup_rows(tokenizer, codes_dir: Path, data: Path, specs, test) -> tuple[list[dict], dict]:
    """The code entropies of the train split and the two rows of a generator that draws cells independently."""
    from mllm.generation import tensor_to_pil

    quantizer = tokenizer.quantizer("pixel")
    store = CodeStore(codes_dir)
    train = scenes(data / "train" / "scenes.jsonl")
    pixel = torch.stack([store.get(image_key(r["file"]))[0].long() for r in train])
    semantic = torch.stack([store.get(image_key(r["file"]))[1].long() for r in train])
    if pixel.shape[-1] != quantizer.depth:
        raise ValueError(
            f"--codes {codes_dir}: depth {pixel.shape[-1]}, the tokenizer's is {quantizer.depth}"
        )
    classes = torch.stack([cell_class_grid(Scene.from_dict(r["scene"]), pixel.shape[1]) for r in train])
    entropy = code_entropies({"pixel": pixel, "semantic": semantic}, classes)
    for head, per in entropy.items():
        for key, values in per.items():
            print(f"entropy {head} {key}: " + " / ".join(f"{v:.3f}" for v in values))
    _, g, _, depth = pixel.shape
    places = g * g
    key = (classes * places + torch.arange(places).view(1, g, g)).flatten()
    buckets = NUM_CELL_CLASSES * places
    seen = torch.bincount(key, minlength=buckets) > 0
    codebook = quantizer.codebook_size
    mode = torch.stack(
        [
            torch.bincount(key * codebook + pixel[..., d].flatten(), minlength=buckets * codebook)
            .view(buckets, codebook)
            .argmax(dim=1)
            for d in range(depth)
        ],
        dim=-1,
    )
    with torch.no_grad():
        latent = quantizer.decode_codes(pixel).reshape(-1, quantizer.code_dim)
    mean = torch.zeros(buckets, latent.shape[-1]).index_add_(0, key, latent)
    mean /= torch.bincount(key, minlength=buckets).clamp(min=1).unsqueeze(-1).float()
    test_classes = torch.stack(
        [cell_class_grid(Scene.from_dict(test[s["image_id"]]["scene"]), g) for s in specs]
    )
    test_key = test_classes * places + torch.arange(places).view(1, g, g)
    # A (content, place) never seen in training (held-out pairs) falls back to the background at that place.
    test_key = torch.where(seen[test_key], test_key, torch.arange(places).view(1, g, g).expand_as(test_key))
    with torch.no_grad():
        rows = [row("lookup: mode", specs, [tensor_to_pil(x) for x in tokenizer.decode(mode[test_key])])]
        images = tokenizer._decode_latent(mean[test_key])
        rows.append(row("lookup: mean latent", specs, [tensor_to_pil(x) for x in images]))
    return rows, entropy


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "runs/demo/data")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "runs/demo/tokenizer")
    p.add_argument("--codes", type=Path, default=ROOT / "runs/demo/codes/train")
    p.add_argument(
        "--reconstructions-only",
        action="store_true",
        help="skip the code entropies and lookup rows (no --codes needed: a tokenizer whose train split is not encoded)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("data", "tokenizer") + (() if args.reconstructions_only else ("codes",)):
        if not getattr(args, name).exists():
            p.error(f"--{name} {getattr(args, name)} does not exist (run `make demo` first)")
    torch.set_num_threads(args.threads)
    from tokenizer.modeling import DualTokenModel

    tokenizer = DualTokenModel.from_pretrained(args.tokenizer).eval()
    specs = load_prompt_specs(args.data / "test" / "prompts.jsonl")
    test = {r["image_id"]: r for r in scenes(args.data / "test" / "scenes.jsonl")}
    real = [load_image(args.data / "test" / s["file"]) for s in specs]
    truths = [Scene.from_dict(test[s["image_id"]]["scene"]) for s in specs]
    rows, errors, unquantized_errors = reconstruction_rows(tokenizer, specs, real, truths)
    entropy = None
    if not args.reconstructions_only:
        more, entropy = lookup_rows(tokenizer, args.codes, args.data, specs, test)
        rows += more
    if args.log:
        log = {
            "rows": rows,
            "entropy": entropy,
            "object_errors": errors,
            "unquantized_errors": unquantized_errors,
        }
        args.log.write_text(json.dumps(log, indent=1))
    return rows


if __name__ == "__main__":
    main()
