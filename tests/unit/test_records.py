"""Calibration metadata in vector files (`vectors.records`): the one reader and writer of
`extra["calibration"]` (a calibrated point) and `extra["sweep"]` (a sweep's choice)."""

from __future__ import annotations

import pytest
import torch

from ifsteer.errors import IfsteerError
from ifsteer.shipped import file_name, read_calibrated, shipped_dir, shipped_ids
from ifsteer.steering import Steering
from ifsteer.vectors import SteeringVector, read_vector_file, save_vectors, update_defaults
from ifsteer.vectors.records import (
    Calibration,
    SweepChoice,
    calibration_of,
    point_record,
    sweep_choice,
    sweep_recommends,
    write_calibration,
    write_sweep_choice,
)

LOWER = "change_case:english_lowercase"


def vector(layer: int, weight: float = 1.0) -> SteeringVector:
    direction = torch.zeros(8)
    direction[layer] = 1.0
    return SteeringVector(direction, 4.0, layer, 2.5, "m", 8, "", LOWER, weight=weight)


@pytest.fixture()
def swept_file(tmp_path):
    """A multi-layer file, as `ifsteer extract` writes it."""
    path = tmp_path / "lower.safetensors"
    return save_vectors(path, [vector(2), vector(4), vector(6)], default=4)


def test_a_calibrated_point_round_trips(tmp_path):
    record = point_record(
        status="searched",
        recommended=True,
        point="L2+6:additive:2:generated",
        mode="additive",
        scale=2.0,
        validation={"score": 0.7, "no_steering_score": 0.1},
        paper_targets={2: 2.5, 6: 2.5},
        seed=3,
    )
    steerings = [
        Steering(vector(2), mode="additive", weight=4.0, positions="generated"),
        Steering(vector(6), mode="additive", weight=5.0, positions="generated"),
    ]
    path = write_calibration(tmp_path / "point.safetensors", steerings, record)
    calibration = calibration_of(read_vector_file(path))
    assert (calibration.status, calibration.recommended, calibration.method) == (
        "searched",
        True,
        "mean_difference",
    )
    assert calibration.layers == (2, 6) and calibration.positions == "generated"
    assert (calibration.weight(2), calibration.weight(6), calibration.weight(4)) == (4.0, 5.0, None)
    assert calibration.paper_target(6) == 2.5 and calibration.paper_target(4) is None
    assert calibration.validation["score"] == 0.7 and calibration.seed == 3
    assert calibration.mode == "additive" and calibration.scale == 2.0
    assert calibration.updated(competition={"winner": "none"})["competition"] == {"winner": "none"}
    shipped = read_calibrated(path)
    assert shipped.weights == (4.0, 5.0) and shipped.layers == (2, 6)
    with pytest.raises(IfsteerError, match="at least one steering"):
        write_calibration(tmp_path / "none.safetensors", [], record)


def test_a_file_without_a_record_reads_with_the_defaults(swept_file):
    calibration = calibration_of(read_vector_file(swept_file))
    assert not calibration and calibration == Calibration()
    assert (calibration.status, calibration.method, calibration.positions) == (
        "searched",
        "mean_difference",
        "all",
    )
    assert calibration.layers is None and calibration.validation == {}
    assert calibration.group is None and calibration.competition is None


def test_every_shipped_file_reads_through_the_record():
    for instruction_id in shipped_ids():
        calibration = read_calibrated(shipped_dir() / file_name(instruction_id)).calibration
        assert isinstance(calibration, Calibration)
        assert calibration.status in {"searched", "verified", "pending"}
        assert calibration.layers and calibration.point.startswith("L")


def test_a_sweep_choice_round_trips_and_moves_the_default(swept_file):
    measured = {"best_layer": 6, "no_steering_score": 0.25, "with_instruction": False}
    won = SweepChoice(6, 7.5, 0.5, True, measured)
    write_sweep_choice(swept_file, won, with_instruction=False, set_default=True)
    file = read_vector_file(swept_file)
    assert sweep_choice(file) == won and sweep_choice(file, with_instruction=True) is None
    assert file.default_layer == 6 and file.default.weight == 7.5
    assert sweep_recommends(file) and sweep_recommends(file, with_instruction=True)

    lost = SweepChoice(None, None, 0.25, False, {"best_layer": 2})
    write_sweep_choice(swept_file, lost, with_instruction=True, set_default=True)
    file = read_vector_file(swept_file)
    assert file.default_layer == 6  # "no steering" won: the default stays
    assert not sweep_recommends(file, with_instruction=True) and sweep_recommends(file)


def test_a_sweep_record_written_before_this_module_reads(swept_file):
    # as `apply_choice` wrote it by hand, and as a record older than `recommended` reads
    old = {"layer": 4, "weight": None, "score": 0.5, "recommended": False, "group": LOWER}
    update_defaults(swept_file, extra={"sweep": old})
    choice = sweep_choice(read_vector_file(swept_file))
    assert choice is not None and choice.to_json() == old and not choice.recommended
    update_defaults(swept_file, extra={"sweep": {"layer": 4, "weight": None, "score": 0.5}})
    assert sweep_recommends(read_vector_file(swept_file))
