"""Calibrated vector files: what they record, and the vectors that ship in the package."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ifsteer.calibration import Point, steerings_for
from ifsteer.cli import app
from ifsteer.errors import IfsteerError, InvalidSteering, MalformedVectorFile
from ifsteer.gguf_export import read_gguf
from ifsteer.instructions import get_instruction
from ifsteer.prompts import build_pairs
from ifsteer.shipped import (
    NotShipped,
    file_name,
    file_steerings,
    listing,
    load_shipped,
    read_calibrated,
    recommended_files,
    shipped_dir,
    shipped_ids,
    write_calibrated,
)
from ifsteer.vectors import extract_vectors, load_vector
from ifsteer.vectors.files import update_defaults

TITLE = "detectable_format:title"
REQUIRED = (
    "status",
    "recommended",
    "point",
    "validation",
    "layers",
    "weights",
    "positions",
    "paper_targets",
)


@pytest.fixture(scope="module")
def title_vectors(tiny_lm):
    pairs = build_pairs(get_instruction(TITLE), 8, seed=0)
    return extract_vectors(tiny_lm, pairs, [1, 2, 3], instruction="t", instruction_id=TITLE)


def calibration(point: Point, vectors) -> dict:
    return {
        "recommended": True,
        "point": point.key,
        "validation": {"score": 0.4, "no_steering_score": 0.1, "n_prompts": 10},
        "paper_targets": {str(layer): vectors[layer].target for layer in point.layers},
    }


@pytest.mark.parametrize(
    "point", [Point((2,), "projection", 2.0), Point((1, 3), "additive", 4.0, "generated")]
)
def test_a_written_point_reads_back_as_the_same_steerings(tmp_path, title_vectors, point):
    steerings = steerings_for(point, title_vectors)
    path = write_calibrated(
        tmp_path / file_name(TITLE), steerings, calibration(point, title_vectors)
    )
    shipped = read_calibrated(path)
    again = shipped.steerings()
    assert [s.vector.layer for s in again] == list(point.layers)
    assert [s.effective_weight for s in again] == pytest.approx(
        [s.effective_weight for s in steerings]
    )
    assert [s.vector.target for s in again] == pytest.approx([s.vector.target for s in steerings])
    assert {s.positions for s in again} == {point.positions}
    assert shipped.recommended and shipped.instruction_id == TITLE
    # A plain load gives the calibrated default layer, target and weight too.
    plain = load_vector(path)
    assert plain.layer == point.layers[0] and plain.mode == point.mode
    # With nothing kept for exclusion, a forbidden word gets the point's own vectors negated.
    assert [s.effective_weight for s in shipped.excluding()] == pytest.approx(
        [-s.effective_weight for s in steerings]
    )


def two_layer_point(tmp_path, title_vectors) -> tuple[list, Path]:
    """A calibrated file whose point steers at layers 1 and 3 together, and its steerings."""
    point = Point((1, 3), "additive", 4.0)
    steerings = steerings_for(point, title_vectors)
    path = write_calibrated(
        tmp_path / file_name(TITLE), steerings, calibration(point, title_vectors)
    )
    return steerings, path


def test_a_calibrated_file_given_by_path_steers_at_its_whole_point(tmp_path, title_vectors):
    steerings, path = two_layer_point(tmp_path, title_vectors)
    whole = file_steerings(path)
    assert [(s.vector.layer, s.effective_mode) for s in whole] == [(1, "additive"), (3, "additive")]
    assert [s.effective_weight for s in whole] == pytest.approx(
        [s.effective_weight for s in steerings]
    )
    # A layer, mode or weight of one's own steers the one vector, as eval takes an override.
    assert [s.vector.layer for s in file_steerings(path, layer=3)] == [3]
    alone = file_steerings(path, weight=2.0)
    assert [(s.vector.layer, s.effective_weight) for s in alone] == [(1, 2.0)]
    assert [s.effective_mode for s in file_steerings(path, mode="projection")] == ["projection"]


def test_a_calibrated_file_exports_every_layer_of_its_point_to_gguf(tmp_path, title_vectors):
    steerings, path = two_layer_point(tmp_path, title_vectors)
    out = tmp_path / "point.gguf"
    result = CliRunner().invoke(app, ["vectors", "export-gguf", str(path), str(out)])
    assert result.exit_code == 0, result.output
    exported = read_gguf(out)
    assert sorted(exported) == [1, 3]
    for s in steerings:
        expected = s.effective_weight * s.vector.direction.numpy()
        np.testing.assert_allclose(exported[s.vector.layer], expected, rtol=1e-5)
    # Steering only the generated tokens has no control-vector form: refused, nothing written.
    generated = Point((1, 3), "additive", 4.0, "generated")
    write_calibrated(
        path, steerings_for(generated, title_vectors), calibration(generated, title_vectors)
    )
    refused = CliRunner().invoke(
        app, ["vectors", "export-gguf", str(path), str(tmp_path / "g.gguf")]
    )
    assert isinstance(refused.exception, InvalidSteering)
    assert "generated tokens" in str(refused.exception) and not (tmp_path / "g.gguf").exists()


def test_a_file_keeps_other_vectors_for_exclusion_through_a_rewrite(tmp_path, title_vectors):
    """A trained point at layer 1 and the paper's projection vector at layer 3 for exclusion:
    one file, each read back at its own layer, mode and weight, and kept when the record is
    rewritten (a competition recorded later)."""
    point = Point((1,), "additive", 0.5)
    paper = steerings_for(Point((3,), "projection", 2.0), title_vectors)
    path = write_calibrated(
        tmp_path / file_name(TITLE),
        steerings_for(point, title_vectors),
        calibration(point, title_vectors),
        paper,
    )
    shipped = read_calibrated(path)
    assert shipped.layers == (1,) and shipped.vectors[0].mode == "additive"
    excluding = shipped.excluding()
    assert [(s.vector.layer, s.effective_mode) for s in excluding] == [(3, "projection")]
    assert excluding[0].effective_weight == pytest.approx(-paper[0].effective_weight)
    assert torch.equal(excluding[0].vector.direction, paper[0].vector.direction)
    assert shipped.describe()["exclusion_layers"] == [3]
    shipped.rewrite(shipped.calibration.updated(competition={"winner": "trained"}))
    again = read_calibrated(path)
    assert again.calibration.competition == {"winner": "trained"}
    assert [s.effective_weight for s in again.excluding()] == pytest.approx(
        [s.effective_weight for s in excluding]
    )
    with pytest.raises(IfsteerError, match="layer 1; a file holds one vector per layer"):
        write_calibrated(path, steerings_for(point, title_vectors), {}, shipped.steerings())


@pytest.mark.parametrize(
    ("key", "changes"),
    [
        ("calibration", {"layers": [7]}),
        ("exclusion", {"layers": [9]}),
        ("exclusion", {"weights": {"3": "heavy"}}),
    ],
)
def test_a_record_naming_what_the_file_lacks_is_refused(tmp_path, title_vectors, key, changes):
    """A hand-edited or truncated record (a layer the file does not hold, a weight that is
    not a number) fails on reading, in one line naming the record, not later in the middle
    of a generation."""
    point = Point((1,), "additive", 0.5)
    path = write_calibrated(
        tmp_path / file_name(TITLE),
        steerings_for(point, title_vectors),
        calibration(point, title_vectors),
        steerings_for(Point((3,), "projection", 2.0), title_vectors),
    )
    written = read_calibrated(path).calibration
    if key == "calibration":
        record = written.updated(**changes)
    else:
        record = written.updated(exclusion={**written["exclusion"], **changes})
    update_defaults(path, extra={"calibration": record})
    with pytest.raises(MalformedVectorFile, match=f"the {key} record is incomplete"):
        read_calibrated(path)


def test_listing_and_a_missing_vector(tmp_path, title_vectors):
    point = Point((2,))
    write_calibrated(
        tmp_path / file_name(TITLE),
        steerings_for(point, title_vectors),
        calibration(point, title_vectors),
    )
    assert shipped_ids(directory=tmp_path) == [TITLE]
    [row] = listing(directory=tmp_path)
    assert row["instruction_id"] == TITLE and row["score"] == 0.4 and row["point"] == point.key
    with pytest.raises(NotShipped, match="vectors list"):
        load_shipped("startend:quotation", directory=tmp_path)


def test_only_recommended_files_are_steered_with(tmp_path, title_vectors):
    point = Point((2,))
    steerings = steerings_for(point, title_vectors)
    write_calibrated(tmp_path / file_name(TITLE), steerings, calibration(point, title_vectors))
    lost = {**calibration(point, title_vectors), "recommended": False}
    other = [
        replace(s, vector=replace(s.vector, instruction_id="startend:quotation")) for s in steerings
    ]
    write_calibrated(tmp_path / file_name("startend:quotation"), other, lost)
    assert shipped_ids(directory=tmp_path) == [TITLE, "startend:quotation"]
    assert recommended_files(directory=tmp_path) == {TITLE: tmp_path / file_name(TITLE)}
    with pytest.raises(NotShipped, match="vectors build"):
        recommended_files("no-such-model")


def test_every_shipped_vector_fits_the_embedded_model_and_carries_its_scores():
    ids = shipped_ids()
    assert ids, f"no vectors ship in {shipped_dir()}"
    calibrated = 0
    for instruction_id in ids:
        shipped = load_shipped(instruction_id)
        assert shipped.instruction_id == instruction_id
        for vector in shipped.vectors:
            vector.check_fits("smollm2-135m-instruct", 576, 30)
        assert all(key in shipped.calibration for key in REQUIRED), instruction_id
        if shipped.calibration["status"] == "pending":
            assert not shipped.recommended and shipped.calibration["validation"] is None
            continue
        calibrated += 1
        validation = shipped.calibration["validation"]
        assert validation["n_prompts"] >= 10
        assert 0.0 <= validation["score"] <= 1.0
        assert shipped.recommended == (validation["score"] > validation["no_steering_score"])
        assert (shipped.path.stat().st_size) < 64_000
    assert calibrated >= 2
