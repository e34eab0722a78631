"""One point type for both calibration plans (`calibration.point`): the sweep's points steer as
the sweep always steered, the search's as the search did, and both name and rank alike."""

from __future__ import annotations

import pytest

from ifsteer.calibration import FILE_WEIGHT, Point, PointResult, choose
from ifsteer.calibration.point import projection_target, steerings_for
from ifsteer.errors import InvalidSteering
from ifsteer.steering import Steering
from ifsteer.vectors import SteeringVector

LOWER = "change_case:english_lowercase"


def vector(layer: int, mode: str = "projection", weight: float = 1.0) -> SteeringVector:
    import torch

    direction = torch.zeros(8)
    direction[layer % 8] = 1.0
    return SteeringVector(
        direction=direction,
        norm=4.0,
        layer=layer,
        target=2.5,
        mode=mode,
        weight=weight,
        model_id="m",
        hidden_size=8,
        instruction="",
        instruction_id=LOWER,
    )


def test_a_sweep_point_steers_each_file_at_its_own_or_the_given_weight():
    additive = {4: vector(4, "additive", weight=3.0)}
    own = Point.swept(4)
    assert own.weight == FILE_WEIGHT and own.mode is None
    # what the sweep built by hand before: the file's own mode and weight
    assert steerings_for(own, additive) == [Steering(additive[4], mode=None, weight=3.0)]
    assert steerings_for(own, additive, negate=True) == [
        Steering(additive[4], mode=None, weight=-3.0)
    ]
    given = Point.swept(4, 40.0, "additive")
    assert steerings_for(given, additive) == [Steering(additive[4], mode="additive", weight=40.0)]
    assert steerings_for(Point.swept(None), additive) == []


def test_a_search_point_steers_relative_to_each_vector():
    vectors = {2: vector(2), 6: vector(6)}
    projection = steerings_for(Point((2, 6), "projection", 2.0), vectors)
    assert [s.vector.target for s in projection] == [projection_target(vectors[2], 2.0)] * 2
    assert all(s.effective_weight == 1.0 for s in projection)
    additive = steerings_for(Point((2, 6), "additive", 2.0, "generated"), vectors)
    assert [s.effective_weight for s in additive] == [2.0 * 4.0 / 2] * 2
    assert {s.positions for s in additive} == {"generated"}
    with pytest.raises(InvalidSteering, match="layer"):
        steerings_for(Point((3,)), vectors)


def test_keys_and_coordinates_name_both_kinds_of_point():
    assert Point((8,), "projection", 2.0).key == "L8:projection:2:all"  # the search's logs
    assert Point.swept(8).key == "L8:file:w=file:all"
    assert Point.swept(8, -20.0, "additive").key == "L8:additive:w=-20:all"
    assert Point.swept(8, -20.0).coordinates == (8, -20.0)
    assert Point.swept(8).coordinates == (8, None) and Point().coordinates == (None, None)
    with pytest.raises(InvalidSteering, match="not a point of the paper's sweep"):
        Point((8,), "projection", 2.0).coordinates  # noqa: B018
    with pytest.raises(InvalidSteering, match="needs a weight"):
        Point((8,), None)


def _result(point: Point, score: float) -> PointResult:
    return PointResult(point, score, score, 0.0, 0.0, None, 4)


def test_one_rank_orders_sweep_points_by_layer_then_weight_and_search_points_as_before():
    sweep = [Point.swept(6, 80.0), Point.swept(6, -40.0), Point.swept(4, 120.0)]
    assert sorted(sweep, key=Point.rank) == [sweep[2], sweep[1], sweep[0]]
    search = [
        Point((4, 8)),
        Point((8,), positions="generated"),
        Point((8,), "additive", 1.0),
        Point((8,), "projection", 4.0),
        Point((8,)),
        Point((4,), "projection", 2.0),
    ]
    assert sorted(search, key=Point.rank) == [
        search[5],
        search[4],
        search[3],
        search[2],
        search[1],
        search[0],
    ]
    tied = [_result(Point(), 0.25), *(_result(p, 0.5) for p in sweep)]
    assert choose(tied).point == Point.swept(4, 120.0)
