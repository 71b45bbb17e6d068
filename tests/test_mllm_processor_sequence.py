"""Sequence helpers: the flat exchange format round trip, padding and position ids."""

from __future__ import annotations

import pytest
import torch

from mllm.sequence import ExchangeLayout, deserialize, pad_sequences, positions_from_mask, serialize

LAYOUT = ExchangeLayout(img_token_id=5, visual_token_offset=20, codebook_size=7, rq_depth=2)


def _sample(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = [1, 2, 4, *[5] * 4, 6, 3, 4, *[5] * 4, 6, 9]
    pixel = torch.randint(0, 7, (2, 2, 2, 2), generator=generator)
    semantic = torch.randint(0, 7, (2, 2, 2, 2), generator=generator)
    return ids, pixel, semantic


def test_serialize_deserialize_round_trip():
    ids, pixel, semantic = _sample()
    flat = serialize(ids, pixel, semantic, LAYOUT)
    assert len(flat) == len(ids) + 8 * (2 * 2 - 1)
    # The first cell is its two pixel ids then its two semantic ids.
    first = flat[3:7]
    assert first[:2] == [20 + c for c in pixel[0, 0, 0].tolist()]
    assert first[2:] == [27 + c for c in semantic[0, 0, 0].tolist()]
    back_ids, back_pixel, back_semantic = deserialize(flat, LAYOUT, grid_size=2)
    assert back_ids == ids
    assert torch.equal(back_pixel, pixel) and torch.equal(back_semantic, semantic)
    assert serialize([1, 2, 3], None, None, LAYOUT) == [1, 2, 3]


def test_serialize_rejects_mismatched_codes():
    ids, pixel, semantic = _sample()
    with pytest.raises(ValueError, match="8 <img> positions but the codes hold 4"):
        serialize(ids, pixel[:1], semantic[:1], LAYOUT)
    with pytest.raises(ValueError, match="must lie in"):
        serialize(ids, pixel + 7, semantic, LAYOUT)
    with pytest.raises(ValueError, match="no codes"):
        serialize(ids, None, None, LAYOUT)


def test_deserialize_rejects_malformed_sequences():
    ids, pixel, semantic = _sample()
    flat = serialize(ids, pixel, semantic, LAYOUT)
    with pytest.raises(ValueError, match="whole number of 4-id cells"):
        deserialize(flat[:5] + flat[6:], LAYOUT, grid_size=2)
    swapped = list(flat)
    swapped[3], swapped[5] = swapped[5], swapped[3]  # a semantic id where a pixel id belongs
    with pytest.raises(ValueError, match="pixel ids followed by D semantic ids"):
        deserialize(swapped, LAYOUT, grid_size=2)
    with pytest.raises(ValueError, match="whole number of 3x3 images"):
        deserialize(flat, LAYOUT, grid_size=3)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 34\)"):
        deserialize([1, 34], LAYOUT, grid_size=2)


def test_padding_and_positions():
    padded, mask = pad_sequences([[7, 8, 9], [4]], pad_value=0, side="left")
    assert padded.tolist() == [[7, 8, 9], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    grown = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert positions_from_mask(grown, length=1).tolist() == [[3], [1]]
    right, right_mask = pad_sequences([[7, 8, 9], [4]], pad_value=-1, side="right")
    assert right.tolist() == [[7, 8, 9], [4, -1, -1]] and right_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="side"):
        pad_sequences([[1]], 0, side="middle")
