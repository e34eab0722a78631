"""The continuous batcher against Hugging Face `generate` run on one row at a time.

The reference never goes through the batcher: each row is generated alone, unpadded, by the
model's own `generate` under `steer`. Batches are kept small so rows leave and others join
while earlier rows are still decoding.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from transformers import GenerationConfig

from ifsteer.batcher import Batcher
from ifsteer.errors import InvalidSteering, VectorMismatch
from ifsteer.jobs import Job, Sampling
from ifsteer.models import LoadedModel
from ifsteer.steering import Steering, steer
from ifsteer.transformers_compat import cache_argument
from tests.conftest import make_tiny
from tests.unit.test_models import CONFIGS
from tests.unit.test_vectors import make_vector

PROMPTS = [
    "Why is the sky blue?",
    "Plan a picnic for a rainy afternoon with friends, family and two dogs.",
    "Describe a forest at dawn.",
    "Write a note to a neighbour about the noisy party last night, politely.",
    "Name a colour.",
    "Explain how bread rises in the oven and why it smells so good.",
]
LENGTHS = [9, 4, 12, 7, 10, 6]


def alone(lm: LoadedModel, prompt: str, steering, max_new_tokens: int) -> list[int]:
    """One row, no padding, through `model.generate`: what the batcher must reproduce."""
    batch = lm.encode([prompt])
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=lm.stop_token_ids(),
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    with steer(lm, steering), torch.no_grad():
        out = lm.model.generate(**batch, generation_config=config)
    ids = out[0, batch["input_ids"].shape[1] :].tolist()
    stop = set(lm.stop_token_ids())
    return next((ids[:i] for i, t in enumerate(ids) if t in stop), ids)


def with_stop_token(lm: LoadedModel, monkeypatch) -> LoadedModel:
    """The same model, stopping on a token the last (unsteered) row emits early in its answer."""
    last = alone(lm, PROMPTS[-1], [], 12)
    stopper = LoadedModel(lm.model, lm.tokenizer, lm.model_id)
    monkeypatch.setattr(stopper, "stop_token_ids", lambda: [last[3]])
    return stopper


def mixed_rows(model_id: str) -> list[list[Steering]]:
    a = make_vector(layer=1, model_id=model_id, mode="additive")
    b = make_vector(layer=2, model_id=model_id, target=3.0)
    return [
        [Steering(a, weight=6.0)],
        [],
        [Steering(b)],
        [Steering(a, weight=-4.0, positions="generated"), Steering(b, positions="prompt")],
        [Steering(b, weight=2.0, positions="generated")],
        [],
    ]


def prompt_job(lm: LoadedModel, prompt: str, **settings) -> Job:
    """A job for `prompt`, rendered as `generate` renders it."""
    return Job(lm.render(prompt).ids, **settings)


def run_jobs(lm: LoadedModel, jobs: list[Job], batch_size: int) -> list:
    batcher = Batcher(lm, batch_size=batch_size)
    ids = [batcher.submit(job) for job in jobs]
    done = batcher.run()
    return [done[i] for i in ids]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_row_matches_its_row_alone_while_rows_join_and_leave(
    arch, tiny_tokenizer, monkeypatch
):
    lm = with_stop_token(make_tiny(CONFIGS[arch](), tiny_tokenizer, model_id=arch), monkeypatch)
    rows = mixed_rows(arch)
    jobs = [
        prompt_job(lm, p, steering=r, sampling=Sampling(max_new_tokens=n))
        for p, r, n in zip(PROMPTS, rows, LENGTHS, strict=True)
    ]
    out = run_jobs(lm, jobs, batch_size=3)
    expected = [alone(lm, p, r, n) for p, r, n in zip(PROMPTS, rows, LENGTHS, strict=True)]
    assert [c.text for c in out] == [lm.tokenizer.decode(ids) for ids in expected]
    assert [c.completion_tokens for c in out] == [len(ids) for ids in expected]
    assert {c.finish_reason for c in out} == {"stop", "length"}, "rows must end both ways"


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_the_cache_goes_in_under_the_name_this_transformers_takes(arch, tiny_tokenizer):
    # A wrong keyword vanishes into **kwargs and every step decodes without the cache.
    lm = make_tiny(CONFIGS[arch](), tiny_tokenizer, model_id=arch)
    assert cache_argument(lm.model) in inspect.signature(lm.model.forward).parameters


def test_steering_changes_the_answer(tiny_lm):
    sampling = Sampling(max_new_tokens=8)
    steered, plain = run_jobs(
        tiny_lm,
        [
            prompt_job(
                tiny_lm, PROMPTS[0], steering=mixed_rows("tiny-llama")[0], sampling=sampling
            ),
            prompt_job(tiny_lm, PROMPTS[0], sampling=sampling),
        ],
        batch_size=2,
    )
    assert steered.text != plain.text


def test_identical_jobs_are_decoded_once_and_streamed_to_each(tiny_lm):
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    sampling = Sampling(max_new_tokens=8)
    jobs = [
        prompt_job(tiny_lm, PROMPTS[1], sampling=sampling, on_text=pieces[k].append)
        for k in range(3)
    ]
    batcher = Batcher(tiny_lm, batch_size=4)
    ids = [batcher.submit(job) for job in jobs]
    assert len(batcher._waiting) == 1  # one row carries all three
    done = batcher.run()
    texts = {done[i].text for i in ids}
    assert len(texts) == 1 and all("".join(p) == done[ids[0]].text for p in pieces.values())


def test_prompt_kv_is_shared_only_where_steering_spares_the_prompt(tiny_lm):
    v = make_vector(layer=1, mode="additive")
    rows = [[], [Steering(v, weight=5.0)], [Steering(v, weight=5.0, positions="generated")]]
    jobs = [
        prompt_job(tiny_lm, PROMPTS[2], steering=r, sampling=Sampling(max_new_tokens=6))
        for r in rows
    ]
    batcher = Batcher(tiny_lm, batch_size=3)
    for job in jobs:
        batcher.submit(job)
    keys = {r.prompt_key for r in batcher._waiting}
    assert len(keys) == 2  # unsteered and generated-only read the prompt alike
    done = batcher.run()
    assert [done[i].text for i in range(3)] == [
        tiny_lm.tokenizer.decode(alone(tiny_lm, PROMPTS[2], r, 6)) for r in rows
    ]


def test_a_later_submission_joins_a_running_batch(tiny_lm):
    batcher = Batcher(tiny_lm, batch_size=4)
    first = batcher.submit(prompt_job(tiny_lm, PROMPTS[1], sampling=Sampling(max_new_tokens=10)))
    for _ in range(3):
        batcher.step()
    late = batcher.submit(prompt_job(tiny_lm, PROMPTS[4], sampling=Sampling(max_new_tokens=5)))
    done = batcher.run()
    assert done[first].text == tiny_lm.tokenizer.decode(alone(tiny_lm, PROMPTS[1], [], 10))
    assert done[late].text == tiny_lm.tokenizer.decode(alone(tiny_lm, PROMPTS[4], [], 5))


def test_decided_rows_leave_early(tiny_lm):
    seen: list[str] = []

    def decided(text: str) -> bool:
        seen.append(text)
        return len(text) >= 5

    sampling = Sampling(max_new_tokens=20, ignore_eos=True)
    early, full = run_jobs(
        tiny_lm,
        [
            prompt_job(tiny_lm, PROMPTS[0], sampling=sampling, decided=decided),
            prompt_job(tiny_lm, PROMPTS[0], sampling=sampling),
        ],
        2,
    )
    assert early.finish_reason == "decided" and early.completion_tokens < 20
    assert full.text.startswith(early.text) and len(early.text) >= 5 > len(seen[-2])


def test_jobs_that_differ_only_in_deciders_share_one_row(tiny_lm):
    sampling = Sampling(max_new_tokens=20, ignore_eos=True)
    jobs = [
        prompt_job(tiny_lm, PROMPTS[0], sampling=sampling, decided=lambda text: len(text) >= 5),
        prompt_job(tiny_lm, PROMPTS[0], sampling=sampling, decided=lambda text: len(text) >= 15),
        prompt_job(tiny_lm, PROMPTS[0], sampling=sampling),
    ]
    batcher = Batcher(tiny_lm, batch_size=4)
    ids = [batcher.submit(job) for job in jobs]
    batcher.step()
    assert batcher.rows == 1
    done = batcher.run()
    each_alone = [run_jobs(tiny_lm, [job], 1)[0] for job in jobs]
    assert [done[i] for i in ids] == each_alone
    assert [c.finish_reason for c in each_alone] == ["decided", "decided", "length"]
    assert each_alone[0].completion_tokens < each_alone[1].completion_tokens < 20


def test_a_decider_job_does_not_join_a_row_already_decoding(tiny_lm):
    sampling = Sampling(max_new_tokens=20, ignore_eos=True)
    batcher = Batcher(tiny_lm, batch_size=4)
    full = batcher.submit(prompt_job(tiny_lm, PROMPTS[0], sampling=sampling))
    for _ in range(12):
        batcher.step()
    late_job = prompt_job(
        tiny_lm, PROMPTS[0], sampling=sampling, decided=lambda text: len(text) >= 5
    )
    late = batcher.submit(late_job)
    batcher.step()
    assert batcher.rows == 2  # sharing would hand it the 12 tokens already past its stop
    done = batcher.run()
    assert done[late] == run_jobs(tiny_lm, [late_job], 1)[0]
    assert done[full].completion_tokens == 20


def test_sampled_rows_keep_their_own_stream(tiny_lm):
    def sampled(seed: int | None) -> Job:
        return prompt_job(
            tiny_lm, PROMPTS[3], sampling=Sampling(max_new_tokens=10, temperature=1.0, seed=seed)
        )

    solo = run_jobs(tiny_lm, [sampled(3)], 1)[0].text
    crowd = run_jobs(tiny_lm, [sampled(None), sampled(3), sampled(None), sampled(7)], 4)
    assert crowd[1].text == solo  # neighbours drawing samples do not shift row 1's stream
    assert crowd[3].text != solo
    state = torch.get_rng_state()
    run_jobs(tiny_lm, [sampled(None)], 1)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone


def test_progress_and_finish_callbacks(tiny_lm):
    ticks: list[int] = []
    finished = []
    batcher = Batcher(tiny_lm, batch_size=2)
    for p, n in zip(PROMPTS[:3], (3, 5, 4), strict=True):
        batcher.submit(
            prompt_job(tiny_lm, p, sampling=Sampling(max_new_tokens=n), on_done=finished.append)
        )
    done = batcher.run(progress=ticks.append)
    assert sum(ticks) == 3 and sorted(c.text for c in finished) == sorted(
        c.text for c in done.values()
    )


def test_bad_jobs_are_refused_at_submit(tiny_lm):
    batcher = Batcher(tiny_lm, batch_size=2)
    with pytest.raises(VectorMismatch, match="hidden size 32"):
        batcher.submit(prompt_job(tiny_lm, "hi", steering=[Steering(make_vector(hidden=32))]))
    with pytest.raises(InvalidSteering, match="max_new_tokens must be at least 1"):
        batcher.submit(prompt_job(tiny_lm, "hi", sampling=Sampling(max_new_tokens=0)))
    with pytest.raises(InvalidSteering, match="batch_size must be at least 1"):
        Batcher(tiny_lm, batch_size=0)
    assert not batcher.busy


def test_a_cancelled_job_reports_nothing_and_frees_its_row(tiny_lm):
    batcher = Batcher(tiny_lm, batch_size=2)
    sampling = Sampling(max_new_tokens=12, ignore_eos=True)
    kept = batcher.submit(prompt_job(tiny_lm, PROMPTS[0], sampling=sampling))
    gone = batcher.submit(prompt_job(tiny_lm, PROMPTS[1], sampling=sampling))
    queued = batcher.submit(prompt_job(tiny_lm, PROMPTS[2], sampling=sampling))
    batcher.step()
    assert batcher.cancel(gone) and batcher.cancel(queued) and not batcher.cancel(99)
    finished = batcher.step()  # the cancelled row leaves here, unreported
    assert finished == [] and len(batcher._active) == 1
    done = {**dict(finished), **batcher.run()}
    assert set(done) == {kept}
    assert done[kept].text == tiny_lm.tokenizer.decode(alone(tiny_lm, PROMPTS[0], [], 12))


def test_joining_rows_are_bucketed_by_length(tiny_lm):
    batcher = Batcher(tiny_lm, batch_size=2)
    for prompt in (PROMPTS[1], PROMPTS[4], PROMPTS[3], PROMPTS[0]):  # long, short, long, short
        batcher.submit(prompt_job(tiny_lm, prompt))
    first = batcher._pick_joining()
    lengths = [len(r.ids) for r in first]
    left = [len(r.ids) for r in batcher._waiting]
    assert min(lengths) > max(left)  # the two long prompts join together, the short ones wait


@pytest.mark.parametrize(
    "degenerate",
    [
        Sampling(max_new_tokens=6, temperature=1e-300, seed=1),
        Sampling(max_new_tokens=6, temperature=5e-324, seed=1),
        Sampling(max_new_tokens=6, temperature=1.0, top_p=1e-46, seed=1),
    ],
)
def test_a_row_float32_cannot_sample_falls_back_to_greedy_and_spares_its_neighbours(
    tiny_lm, degenerate
):
    """Issue 17 §2.2: a temperature that overflows the logits (NaN after softmax) or a top_p
    that rounds to 0 in float32 once failed the whole step; the server refuses them, and the
    batcher, which the runners drive without the server, decodes such a row greedily."""
    greedy = [prompt_job(tiny_lm, p, sampling=Sampling(max_new_tokens=6)) for p in PROMPTS[:4]]
    expected = run_jobs(tiny_lm, greedy, 4)
    out = run_jobs(
        tiny_lm, [*greedy[:2], prompt_job(tiny_lm, PROMPTS[0], sampling=degenerate), *greedy[2:]], 5
    )
    assert [c.text for c in out[:2] + out[3:]] == [c.text for c in expected]
    assert out[2].text == expected[0].text  # its limit as the temperature goes to 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prompt_prefilled_in_chunks_reads_as_in_one_forward(arch, tiny_tokenizer, monkeypatch):
    """Issue 17 §2.3: prompts are prefilled PREFILL_CHUNK columns at a time; prompt-only
    steering still sees every chunk as the prompt."""
    if arch not in CONFIGS:
        pytest.skip(f"no {arch} config")
    lm = with_stop_token(make_tiny(CONFIGS[arch](), tiny_tokenizer, model_id=arch), monkeypatch)
    rows = mixed_rows(arch)
    jobs = [
        prompt_job(lm, p, steering=r, sampling=Sampling(max_new_tokens=n))
        for p, r, n in zip(PROMPTS, rows, LENGTHS, strict=True)
    ]
    batcher = Batcher(lm, batch_size=3, prefill_chunk=5)
    ids = [batcher.submit(job) for job in jobs]
    done = batcher.run()
    expected = [alone(lm, p, r, n) for p, r, n in zip(PROMPTS, rows, LENGTHS, strict=True)]
    assert [done[i].text for i in ids] == [lm.tokenizer.decode(e) for e in expected]


def test_a_step_prefills_a_bounded_number_of_tokens(tiny_lm):
    batcher = Batcher(tiny_lm, batch_size=8, prefill_tokens=100)
    for prompt in PROMPTS:
        batcher.submit(prompt_job(tiny_lm, prompt))
    widths = [len(r.ids) for r in batcher._waiting]
    assert max(widths) <= 100 < sum(widths)  # the premise: all would fit the batch, not the budget
    first = batcher._pick_joining()
    assert len(first) * max(len(r.ids) for r in first) <= 100
    alone_too_wide = Batcher(tiny_lm, batch_size=8, prefill_tokens=1)
    alone_too_wide.submit(prompt_job(tiny_lm, PROMPTS[1]))
    alone_too_wide.submit(prompt_job(tiny_lm, PROMPTS[0]))
    assert len(alone_too_wide._pick_joining()) == 1  # the head joins however long it is
    bounded = Batcher(tiny_lm, batch_size=8, prefill_tokens=100)
    jobs = [prompt_job(tiny_lm, p, sampling=Sampling(max_new_tokens=4)) for p in PROMPTS]
    ids = [bounded.submit(job) for job in jobs]
    done = bounded.run()
    assert [done[i].text for i in ids] == [c.text for c in run_jobs(tiny_lm, jobs, 8)]


def teacher_forced_logprob(lm: LoadedModel, prompt_ids, answer_ids, steering) -> float:
    """The answer's summed log-probability read in one forward over prompt and answer."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    with steer(lm, steering), torch.no_grad():
        logits = lm.model(input_ids=ids, use_cache=False).logits[0].float()
    picked = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)
    return float(picked.gather(1, torch.tensor(answer_ids)[:, None]).sum())


def test_a_recorded_logprob_is_the_answer_read_back_under_its_own_steering(tiny_lm):
    """While rows join and leave, each row's summed log-probability is what one forward over
    its prompt and answer gives (so an unsteered answer's perplexity needs no second forward);
    a job that does not ask records nothing, and does not share the asking job's row."""
    v = make_vector(layer=1, mode="additive")
    rows = [[], [Steering(v, weight=5.0)], [], [Steering(v, weight=-3.0)]]
    jobs = [
        prompt_job(tiny_lm, p, steering=r, sampling=Sampling(max_new_tokens=n), logprobs=True)
        for p, r, n in zip(PROMPTS, rows, LENGTHS, strict=False)
    ]
    silent = prompt_job(tiny_lm, PROMPTS[0], sampling=Sampling(max_new_tokens=LENGTHS[0]))
    batcher = Batcher(tiny_lm, batch_size=2)
    ids = [batcher.submit(job) for job in [*jobs, silent]]
    assert len(batcher._waiting) == len(jobs) + 1
    done = batcher.run()
    for job, job_id in zip(jobs, ids, strict=False):
        completion = done[job_id]
        answer = alone(
            tiny_lm, PROMPTS[ids.index(job_id)], job.steering, LENGTHS[ids.index(job_id)]
        )
        expected = teacher_forced_logprob(tiny_lm, job.ids, answer, job.steering)
        assert completion.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert completion.perplexity == pytest.approx(math.exp(-expected / len(answer)), rel=1e-4)
    assert done[ids[-1]].logprob is None and done[ids[-1]].perplexity is None
