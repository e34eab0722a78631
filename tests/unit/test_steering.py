from __future__ import annotations

import pytest
import torch

from ifsteer.errors import InvalidSteering, VectorMismatch
from ifsteer.steering import Steering, steer
from tests.unit.test_vectors import make_vector


def layer_output(lm, prompts, layer):
    """Hidden states after `layer`, recorded by a hook registered after steering's own."""
    seen = {}

    def record(_m, _i, out):
        seen["h"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    handle = lm.layers[layer].register_forward_hook(record)
    try:
        with torch.no_grad():
            lm.model(**lm.encode(prompts))
    finally:
        handle.remove()
    return seen["h"]


PROMPTS = ["Describe a forest at dawn.", "Plan a picnic."]


def installed_hooks(lm) -> list[list[int]]:
    """Hook ids on the model and its layers (transformers may keep hooks of its own there)."""
    return [list(lm.model._forward_pre_hooks)] + [list(layer._forward_hooks) for layer in lm.layers]


def test_projection_sets_the_component_to_target_everywhere(tiny_lm):
    v = make_vector(layer=1, target=2.25)
    with steer(tiny_lm, [Steering(v)]):
        h = layer_output(tiny_lm, PROMPTS, 1)
    torch.testing.assert_close(h @ v.direction, torch.full(h.shape[:2], 2.25), atol=1e-5, rtol=0)


def test_projection_weight_scales_the_target(tiny_lm):
    v = make_vector(layer=2, target=1.5)
    with steer(tiny_lm, [Steering(v, weight=-2.0)]):
        h = layer_output(tiny_lm, PROMPTS, 2)
    torch.testing.assert_close(h @ v.direction, torch.full(h.shape[:2], -3.0), atol=1e-5, rtol=0)


def test_projection_leaves_the_orthogonal_part_alone(tiny_lm):
    v = make_vector(layer=1)
    plain = layer_output(tiny_lm, PROMPTS, 1)
    with steer(tiny_lm, [Steering(v)]):
        steered = layer_output(tiny_lm, PROMPTS, 1)
    ortho = lambda h: h - (h @ v.direction).unsqueeze(-1) * v.direction  # noqa: E731
    torch.testing.assert_close(ortho(steered), ortho(plain), atol=1e-5, rtol=1e-5)


def test_additive_adds_exactly_w_times_direction(tiny_lm):
    v = make_vector(layer=0, mode="additive")
    plain = layer_output(tiny_lm, PROMPTS, 0)
    with steer(tiny_lm, [Steering(v, weight=7.0)]):
        steered = layer_output(tiny_lm, PROMPTS, 0)
    torch.testing.assert_close(
        steered - plain, (7.0 * v.direction).expand_as(plain), atol=1e-5, rtol=0
    )


def test_vector_times_w_equals_weight_w(tiny_lm):
    v = make_vector(layer=0, mode="additive", weight=1.0)
    with steer(tiny_lm, [Steering(v * 7)]):
        a = layer_output(tiny_lm, PROMPTS, 3)
    with steer(tiny_lm, [Steering(v, weight=7.0)]):
        b = layer_output(tiny_lm, PROMPTS, 3)
    torch.testing.assert_close(a, b)


def test_two_vectors_at_one_layer_stack(tiny_lm):
    a = make_vector(layer=1, mode="additive")
    b = make_vector(layer=1, mode="additive", direction=make_vector(2).direction)
    plain = layer_output(tiny_lm, PROMPTS, 1)
    with steer(tiny_lm, [Steering(a, weight=2.0), Steering(b, weight=-3.0)]):
        steered = layer_output(tiny_lm, PROMPTS, 1)
    expected = 2.0 * a.direction - 3.0 * b.direction
    torch.testing.assert_close(steered - plain, expected.expand_as(plain), atol=1e-5, rtol=0)


def test_hooks_are_removed_after_the_block_and_after_an_exception(tiny_lm):
    v = make_vector(layer=1)
    plain = layer_output(tiny_lm, PROMPTS, 3)
    before = installed_hooks(tiny_lm)
    with steer(tiny_lm, [Steering(v)]) as handle:
        assert handle.active
    assert not handle.active
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_lm, [Steering(v)]):
            raise RuntimeError("boom")
    assert installed_hooks(tiny_lm) == before
    torch.testing.assert_close(layer_output(tiny_lm, PROMPTS, 3), plain)


def test_per_row_steering_touches_only_its_rows(tiny_lm):
    v = make_vector(layer=1, mode="additive")
    prompts = ["Plan a picnic.", "Plan a picnic.", "Plan a picnic."]
    plain = layer_output(tiny_lm, prompts, 1)
    with steer(tiny_lm, per_row=[[Steering(v, weight=5.0)], [], [Steering(v, weight=-1.0)]]):
        steered = layer_output(tiny_lm, prompts, 1)
    torch.testing.assert_close(steered[1], plain[1])
    torch.testing.assert_close(
        steered[0] - plain[0], (5.0 * v.direction).expand_as(plain[0]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        steered[2] - plain[2], (-1.0 * v.direction).expand_as(plain[2]), atol=1e-5, rtol=0
    )


def test_per_row_must_match_the_batch(tiny_lm):
    v = make_vector(layer=1)
    with pytest.raises(InvalidSteering, match="per_row has 1 rows but the batch has 2"):
        with steer(tiny_lm, per_row=[[Steering(v)]]):
            layer_output(tiny_lm, PROMPTS, 1)


def test_positions_prompt_and_generated(tiny_lm):
    v = make_vector(layer=1, mode="additive")
    from ifsteer.generation import Sampling, generate

    plain = generate(tiny_lm, ["Plan a picnic."], sampling=Sampling(max_new_tokens=6))
    only_gen = generate(
        tiny_lm,
        ["Plan a picnic."],
        steering=[Steering(v, weight=40.0, positions="generated")],
        sampling=Sampling(max_new_tokens=6),
    )
    only_prompt = generate(
        tiny_lm,
        ["Plan a picnic."],
        steering=[Steering(v, weight=40.0, positions="prompt")],
        sampling=Sampling(max_new_tokens=6),
    )
    everywhere = generate(
        tiny_lm,
        ["Plan a picnic."],
        steering=[Steering(v, weight=40.0)],
        sampling=Sampling(max_new_tokens=6),
    )
    # Steering the generated positions only cannot change the first token (read at the prompt).
    assert only_gen[0].text != plain[0].text or only_gen[0].completion_tokens <= 1
    first = lambda c: tiny_lm.tokenizer(c.text).input_ids[:1]  # noqa: E731
    assert first(only_gen[0]) == first(plain[0])
    assert first(only_prompt[0]) == first(everywhere[0])


def test_refuses_vectors_that_do_not_fit(tiny_lm):
    before = installed_hooks(tiny_lm)
    with pytest.raises(VectorMismatch, match="hidden size 32"):
        with steer(tiny_lm, [Steering(make_vector(layer=1, hidden=32))]):
            pass
    with pytest.raises(VectorMismatch, match="extracted from 'other'"):
        with steer(tiny_lm, [Steering(make_vector(layer=1, model_id="other"))]):
            pass
    assert installed_hooks(tiny_lm) == before


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(mode="sideways"), "unknown mode"),
        (dict(weight=float("nan")), "finite"),
        (dict(positions="middle"), "unknown positions"),
    ],
)
def test_refuses_bad_steering(tiny_lm, kw, message):
    with pytest.raises(InvalidSteering, match=message):
        with steer(tiny_lm, [Steering(make_vector(layer=1), **kw)]):
            pass
