"""The pre-tokenized code store: round trip, compact dtypes, resume after a kill, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from data_recipes.code_shards import MANIFEST, CodeShardWriter, CodeStore, image_key


def _codes(n: int, k: int, seed: int, grid=(3, 2), depth=4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, k, (n, *grid, depth), generator=generator),
        torch.randint(0, k, (n, *grid, depth), generator=generator),
    )


def test_round_trip_across_shards(tmp_path):
    pixel, semantic = _codes(7, 64, seed=0)
    ids = [10, 3, 99, 4, 5, 6, 2**62]
    writer = CodeShardWriter(tmp_path, (3, 2), 4, 64, "tok-v1", "shapes/train", shard_size=3)
    writer.add(ids[:4], pixel[:4], semantic[:4])
    writer.add(ids[4:], pixel[4:], semantic[4:])
    writer.finish()
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["complete"] and manifest["grid"] == [3, 2] and manifest["tokenizer"] == "tok-v1"
    store = CodeStore(tmp_path)
    assert len(store) == 7 and 99 in store and 11 not in store and "99" not in store
    for row, image_id in enumerate(ids):
        got_pixel, got_semantic = store.get(image_id)
        assert got_pixel.dtype == torch.long and got_pixel.shape == (3, 2, 4)
        assert torch.equal(got_pixel, pixel[row]) and torch.equal(got_semantic, semantic[row])
    with pytest.raises(KeyError, match="no codes for image id 11"):
        store.get(11)


@pytest.mark.parametrize(
    ("codebook_size", "dtype"), [(16384, torch.int16), (32767, torch.int16), (32768, torch.int32)]
)
def test_compact_dtype_keeps_the_largest_code(tmp_path, codebook_size, dtype):
    pixel, semantic = _codes(2, codebook_size, seed=1)
    pixel[0, 0, 0, 0] = codebook_size - 1
    writer = CodeShardWriter(tmp_path, (3, 2), 4, codebook_size, "t", "s")
    writer.add([1, 2], pixel, semantic)
    writer.finish()
    with safe_open(tmp_path / "codes-00000.safetensors", framework="pt") as handle:
        assert (
            handle.get_tensor("pixel").dtype == dtype and handle.get_tensor("image_ids").dtype == torch.int64
        )
    assert int(CodeStore(tmp_path).get(1)[0][0, 0, 0]) == codebook_size - 1


def test_resume_after_an_interrupted_write(tmp_path):
    pixel, semantic = _codes(10, 64, seed=2)
    writer = CodeShardWriter(tmp_path, (3, 2), 4, 64, "t", "s", shard_size=4)
    writer.add(range(6), pixel[:6], semantic[:6])  # one shard written, two images only buffered
    (tmp_path / ".tmp-codes-00001.safetensors.x").write_bytes(b"half a shard")  # a kill mid-write
    del writer
    with pytest.raises(ValueError, match="incomplete"):
        CodeStore(tmp_path)
    assert len(CodeStore(tmp_path, allow_incomplete=True)) == 4

    resumed = CodeShardWriter(tmp_path, (3, 2), 4, 64, "t", "s", shard_size=4)
    assert resumed.done_ids == {0, 1, 2, 3}
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError, match="already"):
        resumed.add([3], pixel[3:4], semantic[3:4])
    todo = [i for i in range(10) if i not in resumed.done_ids]
    resumed.add(todo, pixel[todo], semantic[todo])
    resumed.finish()
    store = CodeStore(tmp_path)
    assert len(store) == 10
    for i in range(10):
        assert torch.equal(store.get(i)[1], semantic[i])


def test_reopening_with_another_geometry_or_tokenizer_is_refused(tmp_path):
    CodeShardWriter(tmp_path, (3, 2), 4, 64, "t", "s").finish()
    with pytest.raises(ValueError, match="depth=4"):
        CodeShardWriter(tmp_path, (3, 2), 8, 64, "t", "s")
    with pytest.raises(ValueError, match="tokenizer='t'"):
        CodeShardWriter(tmp_path, (3, 2), 4, 64, "other", "s")


def test_corrupt_or_mismatched_stores_raise_clear_errors(tmp_path):
    pixel, semantic = _codes(2, 64, seed=3)
    writer = CodeShardWriter(tmp_path, (3, 2), 4, 64, "t", "s")
    writer.add([1, 2], pixel, semantic)
    writer.finish()
    store = CodeStore(tmp_path)
    with pytest.raises(ValueError, match="the model expects"):
        store.check_geometry(grid_size=3, rq_depth=4, codebook_size=64)
    manifest_path = tmp_path / MANIFEST
    good = manifest_path.read_text()

    manifest_path.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        CodeStore(tmp_path)
    manifest_path.write_text(json.dumps({**json.loads(good), "format": "something-else"}))
    with pytest.raises(ValueError, match="dualtoken-codes/1"):
        CodeStore(tmp_path)
    manifest_path.write_text(json.dumps({**json.loads(good), "depth": "4"}))
    with pytest.raises(ValueError, match="'depth'"):
        CodeStore(tmp_path)
    manifest_path.write_text(json.dumps({**json.loads(good), "grid": [3, 3]}))
    with pytest.raises(ValueError, match="the manifest implies"):
        CodeStore(tmp_path)
    manifest_path.write_text(good)
    (tmp_path / "codes-00000.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="unreadable shard"):
        CodeStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        CodeStore(tmp_path / "nowhere")


def test_image_key_is_stable_and_normalises_paths():
    assert image_key(12) == 12
    assert (
        image_key("images/0000012.png")
        == image_key("./images/0000012.png")
        == image_key("images\\0000012.png")
    )
    assert image_key("images/0000012.png") != image_key("images/0000013.png")
    assert 0 <= image_key("coco/train2017/000000000009.jpg") < 2**63
    with pytest.raises(ValueError):
        image_key(-1)


def test_code_counts_count_every_code_at_every_depth(tmp_path):
    pixel, semantic = _codes(7, 16, seed=3)
    writer = CodeShardWriter(tmp_path, (3, 2), 4, 16, "tok-v1", "shapes/train", shard_size=3)
    writer.add(list(range(7)), pixel, semantic)
    writer.finish()
    pixel_counts, semantic_counts = CodeStore(tmp_path).code_counts()
    for counts, codes in ((pixel_counts, pixel), (semantic_counts, semantic)):
        assert counts.shape == (4, 16)
        for depth in range(4):
            expected = torch.bincount(codes[..., depth].flatten(), minlength=16)
            assert torch.equal(counts[depth], expected)
