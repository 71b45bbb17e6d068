"""Tokenizer evaluation and pre-tokenization on a micro tokenizer: well-formed metrics and report, encode -> decode
shapes, an encode that resumes without rewriting, and a store that the MLLM training data reads."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from mllm_testing import train_text_tokenizer
from PIL import Image
from safetensors.torch import load_file

# The micro dataset and teacher fixtures (module scope, one thread) are the training tests' own.
from test_tokenizer_train import dataset, micro_settings, one_thread, teacher  # noqa: F401

from data_recipes.code_shards import MANIFEST, CodeStore, image_key
from mllm.processor import DualTokenProcessor
from tokenizer.ablate import ABLATIONS, ablation_overrides, run_ablations, variant_settings
from tokenizer.encode import dataset_images, decode_store, encode_dataset, load_pixels, load_tokenizer
from tokenizer.encode import register as register_encode
from tokenizer.evaluate import PSNR_CAP, codebook_statistics, evaluate_tokenizer, pair_scores
from tokenizer.image_processing import reconstruction_grid
from tokenizer.modeling import DualTokenModel
from tokenizer.presets import preset_fields
from tokenizer.teacher_zero_shot import zero_shot_eval
from tokenizer.train import train_tokenizer
from train.data import build_training_data


@pytest.fixture(scope="module")
def tokenizer_dir(dataset, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(dataset, out, micro_settings(steps=4), teacher_dir=teacher, progress=False)
    return out


def test_codebook_statistics_and_grid():
    codes = torch.tensor([[0, 1], [0, 1], [2, 1], [3, 3]]).reshape(2, 2, 2)  # (..., D=2): depth 0 = 0,0,2,3
    stats = codebook_statistics(codes, 8)
    assert stats["used_codes"] == 4 and stats["usage"] == 0.5
    # histogram 0:2, 1:3, 2:1, 3:2 of 8 -> entropy = -sum p log2 p
    p = torch.tensor([2, 3, 1, 2], dtype=torch.float64) / 8
    entropy = float(-(p * p.log2()).sum())
    assert stats["entropy_bits"] == pytest.approx(entropy) and stats["perplexity"] == pytest.approx(
        2**entropy
    )
    assert stats["normalized_entropy"] == pytest.approx(entropy / 3.0)
    assert stats["used_codes_per_depth"] == [3, 2]
    grid = reconstruction_grid(torch.zeros(5, 3, 16, 16), torch.ones(5, 3, 16, 16), columns=4)
    assert grid.size == (4 * 18 + 2, 4 * 18 + 2)
    assert grid.getpixel((2, 2)) == (128, 128, 128) and grid.getpixel((2, 20)) == (255, 255, 255)


def test_pair_scores_identical_noisy_and_out_of_range():
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same_psnr, same_ssim = pair_scores(images, images.clone())
    assert torch.all(same_psnr == PSNR_CAP) and bool((same_ssim - 1).abs().max() < 1e-6)
    noisy = images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    noisy_psnr, noisy_ssim = pair_scores(images, noisy)
    assert torch.all(noisy_psnr < 30) and torch.all(noisy_psnr > 15) and torch.all(noisy_ssim < 0.99)
    # reconstructions are clamped like a saved image: overshooting white is no error on a white image
    white = torch.ones(1, 3, 32, 32)
    assert pair_scores(white, white * 1.5)[0].item() == PSNR_CAP


def test_metrics_are_well_formed(dataset, teacher, tokenizer_dir, tmp_path):
    out = tmp_path / "report"
    metrics = evaluate_tokenizer(
        tokenizer_dir, dataset, split="test", out_dir=out, grid_images=4, progress=False
    )
    images = dataset_images(dataset, "test")
    assert metrics["images"] == len(images) and metrics["teacher"] == str(teacher.resolve())
    assert 0 < metrics["psnr"] < 60 and -1 <= metrics["ssim"] <= 1 and metrics["reconstruction_fd"] >= 0
    model = load_tokenizer(tokenizer_dir)
    codes = model.encode(load_pixels(images, 32))
    for branch in ("pixel", "semantic"):
        stats = metrics["codebooks"][branch]
        grid = getattr(codes, branch)
        assert stats["used_codes"] == len(grid.unique()) and stats["usage"] == len(grid.unique()) / 64
        assert len(stats["used_codes_per_depth"]) == 2
    # the teacher's own zero-shot and the semantic path's are both reported, on the same images
    teacher_alone = zero_shot_eval(teacher, dataset, "test")
    assert metrics["zero_shot"]["teacher"]["all"] == teacher_alone["all"]
    assert metrics["teacher_zero_shot_top1"] == teacher_alone["all"]["top1"]
    semantic = zero_shot_eval(teacher, dataset, "test", image_features=model.image_embedding)
    assert metrics["zero_shot_top1"] == pytest.approx(semantic["all"]["top1"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["psnr"] == pytest.approx(metrics["psnr"])
    report = (out / "report.md").read_text()
    assert "| pixel | 64 |" in report and "DualToken semantic path" in report and "teacher SigLIP" in report
    assert "not Inception" in report
    with Image.open(out / "reconstructions.png") as grid:
        assert grid.size == (4 * 34 + 2, 2 * 34 + 2)


def test_encode_decode_resume_and_training_data_lookup(dataset, tokenizer_dir, tmp_path):
    store_dir = tmp_path / "codes"
    images = dataset_images(dataset, "train")
    partial = encode_dataset(
        tokenizer_dir, store_dir, data_dir=dataset, split="train", batch_size=16, shard_size=16, max_images=20,
        progress=False,
    )  # fmt: skip
    assert partial["encoded"] == 20 and not partial["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        CodeStore(store_dir)
    rest = encode_dataset(
        tokenizer_dir,
        store_dir,
        data_dir=dataset,
        split="train",
        batch_size=16,
        shard_size=16,
        progress=False,
    )
    assert rest["encoded"] == len(images) - 20 and rest["already_done"] == 20
    files = {p.name: p.stat().st_mtime_ns for p in store_dir.iterdir()}
    manifest = (store_dir / MANIFEST).read_text()
    again = encode_dataset(tokenizer_dir, store_dir, data_dir=dataset, split="train", progress=False)
    assert again["encoded"] == 0 and again["already_done"] == len(images)
    assert {p.name: p.stat().st_mtime_ns for p in store_dir.iterdir()} == files
    assert (store_dir / MANIFEST).read_text() == manifest

    store = CodeStore(store_dir)
    model = load_tokenizer(tokenizer_dir)
    shards = sorted(store_dir.glob("codes-*.safetensors"))
    assert sum(len(load_file(path)["image_ids"]) for path in shards) == len(images)
    shard = load_file(shards[0])
    assert shard["image_ids"].dtype == torch.int64 and shard["pixel"].dtype == torch.int16  # K = 64
    assert shard["semantic"].dtype == torch.int16 and shard["pixel"].shape == (16, 4, 4, 2)
    assert len(store) == len(images) and store.grid == (4, 4) and store.depth == 2
    expected = model.encode(load_pixels(images[:3], 32))
    for row, image in enumerate(images[:3]):
        pixel, semantic = store.get(image_key(image.ref))
        assert torch.equal(pixel, expected.pixel[row]) and torch.equal(semantic, expected.semantic[row])

    written = decode_store(tokenizer_dir, store_dir, tmp_path / "png", images=images[:3], progress=False)
    assert written == [tmp_path / "png" / image.ref for image in images[:3]]
    for path in written:
        with Image.open(path) as png:
            assert png.size == (32, 32) and png.mode == "RGB"
    by_id = decode_store(tokenizer_dir, store_dir, tmp_path / "ids", limit=2, progress=False)
    assert [p.name for p in by_id] == [f"{key}.png" for key in sorted(store.ids())[:2]]

    # the MLLM training data finds every image its LLaVA and prompt records name, with these exact codes
    text_tokenizer = train_text_tokenizer(tmp_path / "text")
    processor = DualTokenProcessor(text_tokenizer, grid_size=4, rq_depth=2)
    split = dataset / "train"
    data = build_training_data(
        processor, str(store_dir), [str(split / "llava.json")], [str(split / "prompts.jsonl")]
    )
    assert data.skipped_missing == 0 and len(data) > len(images)
    first_record = json.loads((split / "llava.json").read_text())[0]
    assert torch.equal(
        data.store.get(image_key(first_record["image"]))[0], store.get(image_key(images[0].ref))[0]
    )
    assert data[0].input_ids


def test_encode_cli_and_a_store_of_another_tokenizer_is_refused(dataset, tokenizer_dir, tmp_path):
    parser = argparse.ArgumentParser()
    register_encode(parser.add_subparsers(dest="command"))
    store_dir = tmp_path / "codes"
    args = parser.parse_args(
        f"encode --model {tokenizer_dir} --data {dataset} --split val --out {store_dir} --quiet --threads 1".split()
    )
    assert args.func(args) == 0
    assert len(CodeStore(store_dir)) == len(dataset_images(dataset, "val"))
    args = parser.parse_args(
        f"encode --model {tokenizer_dir} --data {dataset} --split test --out {store_dir} --quiet".split()
    )
    assert args.func(args) == 2  # another source into the same store: a clear error, no mixing
    # --data may be a recipe: the images its llava / prompts sources name, keyed as the MLLM data looks them up
    recipe = tmp_path / "recipe.json"
    sources = [
        {"name": "u", "kind": "llava", "path": "${DATA}/val/llava.json", "task": "understanding"},
        {"name": "g", "kind": "prompts", "path": "${DATA}/val/prompts.jsonl", "task": "t2i"},
    ]
    recipe.write_text(json.dumps({"name": "r", "splits": {"val": sources}}))
    recipe_store = tmp_path / "recipe_codes"
    args = parser.parse_args(
        f"encode --model {tokenizer_dir} --data {recipe} --recipe-root {dataset} --split val --out {recipe_store} "
        "--quiet".split()
    )
    assert args.func(args) == 0
    store = CodeStore(recipe_store)
    assert set(store.ids()) == {image.key for image in dataset_images(dataset, "val")}
    assert json.loads((recipe_store / MANIFEST).read_text())["source"].startswith("recipe:")


def test_ablation_variants_are_config_overrides_and_the_table_is_written(
    dataset, teacher, tokenizer_dir, tmp_path
):
    settings = micro_settings(steps=2, checkpoint_every=2, sample_images=0)
    fields = {
        name: preset_fields("tiny", teacher, **variant_settings(name, settings, teacher).config_fields())
        for name in ABLATIONS
    }
    assert fields["same_layer"]["pixel_layer"] == fields["same_layer"]["semantic_layer"] == 2
    assert fields["same_layer"]["shortcut_layer"] is None and fields["dualtoken"]["pixel_layer"] == 1
    assert fields["recon_only"]["semantic_weight"] == 0.0 and fields["recon_only"]["pixel_layer"] == 1
    assert fields["semantic_only"]["recon_l2_weight"] == 0.0 and fields["semantic_only"]["gan_weight"] == 0.0
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_overrides("pixel_only", 2)

    result = run_ablations(
        dataset,
        teacher,
        tmp_path / "ablate",
        settings,
        variants=["same_layer", "recon_only"],
        split="val",
        progress=False,
    )
    rows = result["variants"]
    assert list(rows) == ["same_layer", "recon_only"]
    assert rows["same_layer"]["pixel_tap"] == "L2" and rows["recon_only"]["pixel_tap"] == (
        "L1 + 0.6 x L1, per-token projection"
    )
    assert all(row["steps"] == 2 and row["batch_size"] == 4 for row in rows.values())
    same = DualTokenModel.from_pretrained(tmp_path / "ablate" / "same_layer")
    assert same.config.pixel_layer == 2 and same.config.shortcut_layer is None
    assert same.config.pixel_projection_attention
    table = (tmp_path / "ablate" / "ablation.md").read_text()
    assert sum(line.startswith("|") for line in table.splitlines()) == 2 + 2  # header, rule, 2 rows
    assert "zero-shot top-1" in table and "PSNR" in table and "SSIM" in table and "FD" in table
    assert json.loads((tmp_path / "ablate" / "ablation.json").read_text())["variants"].keys() == rows.keys()
