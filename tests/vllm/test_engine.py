"""The vLLM engine steers as the Hugging Face backend does, per request, in shared batches.

One engine for the module (float32, small context, compiled as vLLM compiles by default); the HF
model in this process is the reference every check compares against, with vectors it extracted.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ifsteer.backends.vllm import VLLMEngine
from ifsteer.chat import render_chat
from ifsteer.errors import InvalidSteering
from ifsteer.generation import Completion, Sampling, generate
from ifsteer.instructions import get_instruction
from ifsteer.jobs import Job
from ifsteer.models import DEFAULT_MODEL, load_model
from ifsteer.steering import Steering
from ifsteer.vectors import default_layer, extract_instruction

from .conftest import PROMPTS, vllm_model_dir

pytestmark = pytest.mark.vllm
TOKENS = 16


@pytest.fixture(scope="module")
def hf():
    """The HF model and its vectors: a projection (the paper's mode), a strong additive one at
    another layer, and their zero-weight variant."""
    lm = load_model(DEFAULT_MODEL, "float32")
    layer = default_layer(lm.n_layers)
    vectors = extract_instruction(
        lm, get_instruction("change_case:english_capital"), [layer, layer + 4], n_pairs=16
    )
    projection = vectors[layer].with_defaults(mode="projection", weight=2.0)
    additive = vectors[layer + 4].with_defaults(mode="additive", weight=6 * vectors[layer].norm)
    return lm, {"projection": projection, "additive": additive}


@pytest.fixture(scope="module")
def engine(hf, loop):
    lm, _ = hf
    vllm_engine = VLLMEngine(
        str(vllm_model_dir()),
        model_id=lm.model_id,
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=512 << 20,
        max_num_seqs=32,
    )
    loop(vllm_engine.start())
    yield vllm_engine
    loop(vllm_engine.close())


def _job(engine: VLLMEngine, prompt: str, steering=(), tokens: int = TOKENS) -> Job:
    rendered = render_chat(engine.tokenizer, [("user", prompt)])
    return Job(rendered.ids, tuple(steering), Sampling(max_new_tokens=tokens))


def _vllm(loop, engine, prompt: str, steering=(), tokens: int = TOKENS) -> Completion:
    return loop(engine.generate(_job(engine, prompt, steering, tokens)))


def _hf(lm, prompts, steering=()) -> list[str]:
    out = generate(lm, prompts, steering=list(steering), sampling=Sampling(max_new_tokens=TOKENS))
    return [c.text for c in out]


def test_zero_weight_is_exactly_unsteered(hf, engine, loop):
    _, v = hf
    zero = [Steering(v["projection"], mode="additive", weight=0.0)]
    for prompt in PROMPTS[:2]:
        assert _vllm(loop, engine, prompt, zero).text == _vllm(loop, engine, prompt).text


def test_steered_requests_match_the_hf_backend(hf, engine, loop):
    lm, v = hf
    cases = {
        "projection": [Steering(v["projection"])],
        "two vectors": [Steering(v["projection"]), Steering(v["additive"])],
        "prompt only": [Steering(v["additive"], positions="prompt")],
        "generated only": [Steering(v["additive"], positions="generated")],
    }
    plain = [_vllm(loop, engine, p).text for p in PROMPTS]
    agree: dict[str, int] = {}
    for name, steering in cases.items():
        prompts = PROMPTS if name == "projection" else PROMPTS[:4]
        ours = [_vllm(loop, engine, p, steering).text for p in prompts]
        theirs = _hf(lm, prompts, steering)
        agree[name] = sum(a == b for a, b in zip(ours, theirs, strict=True))
        changed = sum(a != b for a, b in zip(ours, plain, strict=False))
        print(f"{name}: {agree[name]}/{len(prompts)} equal to HF, {changed} differ from unsteered")
        assert changed >= len(prompts) // 2, f"{name} barely steers: {ours}"
    # Different kernels (vLLM's fused norms, attention) round differently: a near-tie between
    # two tokens may flip and the rest of the text then diverges; most must agree.
    assert agree["projection"] >= 6, agree
    assert all(n >= 3 for n in agree.values()), agree


def test_concurrent_mixed_requests_equal_each_sent_alone(hf, engine, loop):
    _, v = hf
    settings = [
        (),
        [Steering(v["projection"])],
        [Steering(v["additive"], positions="generated")],
        [Steering(v["projection"]), Steering(v["additive"], positions="prompt")],
    ]
    requests = [(PROMPTS[i % 8], settings[i // 4]) for i in range(16)]
    alone = [_vllm(loop, engine, p, s).text for p, s in requests]

    async def burst() -> list[Completion]:
        return await asyncio.gather(*(engine.generate(_job(engine, p, s)) for p, s in requests))

    together = [c.text for c in loop(burst())]
    assert together == alone
    assert len(set(alone)) >= 12  # the settings really differ


def test_unsteered_request_never_reuses_steered_kv(hf, engine, loop):
    _, v = hf
    # Longer than two of vLLM's KV blocks (128 tokens on CPU), and new to this engine.
    prompt = "Tell me about rivers. " + "Consider their sources, courses and mouths. " * 40
    steering = [Steering(v["additive"])]
    steered = _vllm(loop, engine, prompt, steering)
    cached = engine.stats()["cached_prompt_tokens"]
    again = _vllm(loop, engine, prompt, steering)
    reused = engine.stats()["cached_prompt_tokens"] - cached
    assert again.text == steered.text and reused >= 256  # same steering: the cache is used
    plain = _vllm(loop, engine, prompt)
    assert engine.stats()["cached_prompt_tokens"] - cached == reused  # no hit for unsteered
    # A zero weight is unsteered arithmetic under another salt: computed afresh.
    fresh = _vllm(loop, engine, prompt, [dataclasses.replace(steering[0], weight=0.0)])
    assert plain.text == fresh.text != steered.text


def test_settings_the_op_cannot_follow_are_refused(monkeypatch):
    source = str(vllm_model_dir())
    with pytest.raises(InvalidSteering, match="worker_cls"):
        VLLMEngine(source, worker_cls="vllm.v1.worker.cpu_worker.CPUWorker")
    with pytest.raises(InvalidSteering, match="speculative"):
        VLLMEngine(source, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(InvalidSteering, match="V1 model runner"):
        VLLMEngine(source)


def test_workers_report_the_v1_runner_a_compiled_model_and_steered_steps(engine, loop):
    (info,) = loop(engine.worker_info())
    assert info["runner"].endswith("CPUModelRunner") or info["runner"].endswith("GPUModelRunner")
    assert info["runner"].startswith("vllm.v1.worker.")  # not vllm.v1.worker.gpu (V2)
    assert info["steered_steps"] > 0 and info["vectors"] >= 2
    assert info["compilation_mode"] > 0  # vLLM's default: compiled (CPU: DYNAMO_TRACE_ONCE)
