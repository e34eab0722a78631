"""llama.cpp control-vector export, read back with gguf's own reader."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ifsteer.cli import app
from ifsteer.errors import InvalidSteering, MalformedVectorFile, VectorMismatch
from ifsteer.gguf_export import additive_coefficient, read_gguf, to_gguf
from ifsteer.vectors import save_vectors
from tests.unit.test_vectors import make_vector


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _tensors(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1
    return {t.name: np.array(t.data) for t in reader.tensors}


def test_additive_vector_round_trips_as_weight_times_direction(tmp_path):
    v = make_vector(layer=2, mode="additive", weight=7.5)
    path = to_gguf([v], tmp_path / "v.gguf")
    fields = _fields(path)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "tiny-llama"
    assert fields["controlvector.layer_count"] == 1
    tensors = _tensors(path)
    # llama.cpp adds direction.N after decoder layer N (0-based), the layer our vector is at.
    assert list(tensors) == ["direction.2"]
    np.testing.assert_allclose(tensors["direction.2"], 7.5 * v.direction.numpy(), rtol=1e-6)


def test_an_exported_file_gets_the_mode_of_any_new_file(tmp_path):
    """llama.cpp may run as another user than the one who exported the vector."""
    old = os.umask(0o022)
    try:
        path = to_gguf([make_vector(layer=2, mode="additive")], tmp_path / "v.gguf")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["v.gguf"]


def test_projection_is_exported_as_its_additive_equivalent(tmp_path):
    v = make_vector(layer=3, target=2.25, norm=3.5)  # projection, weight 1
    path = to_gguf({"lowercase": v, "louder": v * 2}, tmp_path / "p.gguf")
    # weight 1: exactly the mean difference u = ‖u‖·û; weight 2 adds one more c̄.
    assert additive_coefficient(v) == pytest.approx(3.5)
    assert additive_coefficient(v * 2) == pytest.approx(3.5 + 2.25)
    summed = (3.5 + 3.5 + 2.25) * v.direction.numpy()  # two vectors at one layer add up
    np.testing.assert_allclose(read_gguf(path)[3], summed, rtol=1e-6)
    assert "additive-equivalent" in _fields(path)["ifsteer.vectors"]


def test_vectors_at_several_layers_give_one_tensor_each(tmp_path):
    a = make_vector(layer=1, mode="additive", weight=2.0)
    b = make_vector(layer=3, mode="additive", weight=-4.0)
    path = to_gguf([a, b], tmp_path / "two.gguf")
    tensors = _tensors(path)
    assert sorted(tensors) == ["direction.1", "direction.3"]
    np.testing.assert_allclose(tensors["direction.3"], -4.0 * b.direction.numpy(), rtol=1e-6)
    assert _fields(path)["controlvector.layer_count"] == 2


@pytest.mark.parametrize(
    ("vectors", "error", "match"),
    [
        ([], InvalidSteering, "nothing to export"),
        ([make_vector(layer=0)], InvalidSteering, "layer 0"),
        ([make_vector(layer=1), make_vector(layer=1, hidden=32)], VectorMismatch, "hidden size"),
    ],
)
def test_what_llama_cpp_cannot_read_is_refused(tmp_path, vectors, error, match):
    with pytest.raises(error, match=match):
        to_gguf(vectors, tmp_path / "bad.gguf")
    assert not list(tmp_path.iterdir())  # no half-written file left behind


def test_reading_a_file_that_is_not_a_control_vector_fails(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MalformedVectorFile, match="not a llama.cpp control vector"):
        read_gguf(tmp_path / "model.gguf")


def test_cli_exports_a_chosen_layer_with_a_weight(tmp_path):
    layers = [
        make_vector(
            layer=layer,
            mode="additive",
            weight=1.0,
            direction=torch.nn.functional.normalize(torch.randn(64), dim=0),
        )
        for layer in (1, 2)
    ]
    source = save_vectors(tmp_path / "v.safetensors", layers, default=1)
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(
        app, ["vectors", "export-gguf", str(source), str(out), "--layer", "2", "--weight", "12"]
    )
    assert result.exit_code == 0, result.output
    assert "direction.2" in result.output
    np.testing.assert_allclose(read_gguf(out)[2], 12 * layers[1].direction.numpy(), rtol=1e-6)
