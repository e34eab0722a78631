from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ifsteer.errors import InvalidSteering, MalformedVectorFile, VectorMismatch
from ifsteer.prompts import PromptPair
from ifsteer.vectors import (
    SteeringVector,
    default_layers,
    extract_vectors,
    last_token_activations,
    load_vector,
    load_vectors,
    save_vectors,
    update_defaults,
)

PAIRS = [
    PromptPair("Describe a forest. Answer in lowercase.", "Describe a forest."),
    PromptPair("Explain tides to a child. Answer in lowercase.", "Explain tides to a child."),
    PromptPair("Plan a picnic. Answer in lowercase.", "Plan a picnic."),
]


def make_vector(
    layer: int = 1, hidden: int = 64, model_id: str = "tiny-llama", **kw
) -> SteeringVector:
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(layer))
    direction = direction / direction.norm()
    fields = dict(
        direction=direction,
        norm=3.5,
        layer=layer,
        target=2.25,
        model_id=model_id,
        hidden_size=hidden,
        instruction="Answer in lowercase.",
        instruction_id="change_case:english_lowercase",
    )
    fields.update(kw)
    return SteeringVector(**fields)


def test_early_exit_matches_full_forward(tiny_lm):
    prompts = [p.with_instruction for p in PAIRS] + [p.without_instruction for p in PAIRS]
    early = last_token_activations(tiny_lm, prompts, [0, 2], batch_size=4)
    batch = tiny_lm.encode(prompts)
    with torch.no_grad():
        full = tiny_lm.model(**batch, output_hidden_states=True).hidden_states
    # hidden_states[l + 1] is the output of decoder layer l (index 0 is the embeddings); the
    # last entry has the final norm applied, so compare inner layers only.
    for layer in (0, 2):
        torch.testing.assert_close(
            early[layer], full[layer + 1][:, -1].float(), atol=1e-5, rtol=1e-5
        )


def test_early_exit_stops_after_deepest_layer(tiny_lm):
    calls: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, layer in enumerate(tiny_lm.layers)
    ]
    try:
        last_token_activations(tiny_lm, ["Hello there."], [1])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1]  # layers 2 and 3 never ran


def test_extract_is_the_paper_mean_difference(tiny_lm):
    vectors = extract_vectors(
        tiny_lm, PAIRS, [1, 3], instruction="Answer in lowercase.", instruction_id="x"
    )
    acts = last_token_activations(
        tiny_lm,
        [p.with_instruction for p in PAIRS] + [p.without_instruction for p in PAIRS],
        [1, 3],
    )
    for layer, v in vectors.items():
        diff = (acts[layer][:3] - acts[layer][3:]).mean(0)
        torch.testing.assert_close(v.direction * v.norm, diff, atol=1e-5, rtol=1e-5)
        assert v.target == pytest.approx(float((acts[layer][:3] @ v.direction).mean()), abs=1e-5)
        assert v.n_pairs == 3 and v.layer == layer and v.model_id == "tiny-llama"


def test_additive_extraction_defaults_weight_to_norm(tiny_lm):
    v = extract_vectors(tiny_lm, PAIRS, [2], instruction="i", instruction_id="x", mode="additive")[
        2
    ]
    assert v.weight == pytest.approx(v.norm)


def test_extract_refuses_out_of_range_layer(tiny_lm):
    with pytest.raises(VectorMismatch, match="out of range"):
        extract_vectors(tiny_lm, PAIRS, [9], instruction="i", instruction_id="x")


def test_round_trip_is_bit_exact(tmp_path):
    vs = [
        make_vector(1, phrasings=("a", "b"), n_pairs=7),
        make_vector(3, n_pairs=7, phrasings=("a", "b")),
    ]
    path = save_vectors(tmp_path / "v.safetensors", vs, default=3)
    loaded, default = load_vectors(path)
    assert default == 3
    for v in vs:
        got = loaded[v.layer]
        assert torch.equal(got.direction, v.direction)
        assert (got.norm, got.target, got.phrasings, got.n_pairs) == (
            v.norm,
            v.target,
            ("a", "b"),
            7,
        )
    assert load_vector(path).layer == 3
    assert load_vector(path, layer=1).layer == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_a_vector_file_gets_the_mode_of_any_new_file(tmp_path, umask, mode):
    """safetensors alone writes owner-only files: a server running as another user could not
    read a vector a researcher wrote. Rewriting a file (a calibration) keeps the rule."""
    path = tmp_path / "v.safetensors"
    (tmp_path / ".v.safetensors.tmp").write_bytes(b"left by a crash")
    os.chmod(tmp_path / ".v.safetensors.tmp", 0o600)
    old = os.umask(umask)
    try:
        save_vectors(path, [make_vector(1)])
        assert path.stat().st_mode & 0o777 == mode
        update_defaults(path, weight=2.0)
        assert path.stat().st_mode & 0o777 == mode
    finally:
        os.umask(old)
    assert load_vector(path).weight == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_missing_layer_names_the_stored_ones(tmp_path):
    path = save_vectors(tmp_path / "v.safetensors", [make_vector(1)])
    with pytest.raises(VectorMismatch, match=r"holds layers \[1\]"):
        load_vector(path, layer=2)


def test_update_defaults_records_calibration(tmp_path):
    path = save_vectors(tmp_path / "v.safetensors", [make_vector(1), make_vector(2)], default=1)
    update_defaults(path, layer=2, weight=4.0, mode="additive", extra={"sweep": "done"})
    v = load_vector(path)
    assert (v.layer, v.weight, v.mode, v.extra["sweep"]) == (2, 4.0, "additive", "done")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a safetensors file", "not a safetensors file"),
        (None, "without ifsteer metadata"),
        ("bad-json", "not valid JSON"),
    ],
)
def test_malformed_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    if content is None:
        save_file({"x": torch.zeros(2)}, str(path))
    elif content == "bad-json":
        save_file({"x": torch.zeros(2)}, str(path), metadata={"ifsteer": "{"})
    else:
        path.write_bytes(content)
    with pytest.raises(MalformedVectorFile, match=message):
        load_vector(path)


def test_incomplete_metadata_is_refused(tmp_path):
    path = tmp_path / "v.safetensors"
    save_file(
        {"layer.1.direction": torch.zeros(4)},
        str(path),
        metadata={"ifsteer": json.dumps({"format": "ifsteer.vector", "format_version": 1})},
    )
    with pytest.raises(MalformedVectorFile, match="incomplete"):
        load_vector(path)


def test_algebra_scales_weight_and_negates():
    v = make_vector(mode="additive", weight=2.0)
    assert (v * 3).weight == 6.0 and (3 * v).weight == 6.0
    assert (-v).weight == -2.0
    assert (v / 4).weight == 0.5
    torch.testing.assert_close((v * 3).value, 3 * v.value)


def test_sum_is_the_sum_of_displacements():
    a = make_vector(1, mode="additive", weight=2.0)
    b = make_vector(1, mode="additive", weight=5.0, direction=make_vector(2).direction)
    s = a + b
    torch.testing.assert_close(s.value, a.value + b.value)
    torch.testing.assert_close(s.direction.norm(), torch.tensor(1.0))
    assert (a - a).weight == 0.0


def test_sum_refuses_other_layer_and_projection():
    with pytest.raises(VectorMismatch, match="layer"):
        make_vector(1, mode="additive") + make_vector(2, mode="additive")
    with pytest.raises(InvalidSteering, match="projection"):
        make_vector(1) + make_vector(1)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(hidden_size=32), "hidden size 64"),
        (dict(layer=7), "layers 0..3"),
        (dict(model_id="other"), "allow_transfer"),
    ],
)
def test_check_fits_refuses_with_one_line(kw, message):
    v = make_vector(**{"layer": 1, **kw}) if "hidden_size" not in kw else make_vector(1, hidden=64)
    if "hidden_size" in kw:
        with pytest.raises(VectorMismatch, match=message) as err:
            v.check_fits("tiny-llama", 32, 4)
    else:
        with pytest.raises(VectorMismatch, match=message) as err:
            v.check_fits("tiny-llama", 64, 4)
    assert "\n" not in str(err.value)


def test_transfer_allowed_when_asked():
    make_vector(1, model_id="instruct").check_fits("base", 64, 4, allow_transfer=True)


def test_default_layers_follow_the_paper():
    assert default_layers(30) == list(range(6, 30, 2))
