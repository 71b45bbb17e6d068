"""bench/t2i_place_probe.py's scoring: where the drawn objects are against where the caption put them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from data_recipes.shapes import Scene, ShapeObject

_SPEC = importlib.util.spec_from_file_location(
    "t2i_place_probe", Path(__file__).resolve().parents[1] / "bench" / "t2i_place_probe.py"
)
probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe)


def test_probe_asks_for_every_place_and_scores_placement_against_chance():
    asked = probe.probe_objects(per_place=2, seed=0)
    assert len(asked) == 18 and {(o.row, o.col) for o in asked} == {
        (r, c) for r in range(3) for c in range(3)
    }
    first, second = asked[0], asked[1]  # both asked at the top left
    right = Scene((first,))  # the asked object, alone, at its place
    # Two objects, one of them at the asked place but with another color; the other elsewhere.
    other_color = "blue" if second.color != "blue" else "red"
    wrong = Scene(
        (
            ShapeObject(second.shape, other_color, second.size, 0, 0),
            ShapeObject(second.shape, second.color, second.size, 2, 2),
        )
    )
    result = probe.score([first, second], [right, wrong])
    assert result["overall"] == {"object_there": 100.0, "one_object": 50.0, "asked_there": 50.0}
    assert result["chance_object_there"] == 100 * (1 / 9 + 2 / 9) / 2
    assert result["objects_per_image"] == {1: 1, 2: 1}
    assert result["drawn_at_per_asked_place"]["0,0"] == {"0,0": 2, "2,2": 1}
    empty = probe.score([first], [Scene(())])
    assert empty["overall"]["object_there"] == 0.0 and empty["chance_object_there"] == 0.0
