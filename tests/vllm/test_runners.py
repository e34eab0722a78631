"""`run_evaluation` and the sweeps on vLLM (`OfflineVLLM.queue`): the same code, the same
records, the HF engine's answers and verdicts.

One offline engine for the module (float32, compiled, small context). The HF reference runs the
same rows through the same functions with the default `Batcher`; both use vectors the HF model
extracted, written to files as `ifsteer extract` writes them.
"""

from __future__ import annotations

import json

import pytest

from ifsteer.backends.vllm import OfflineVLLM
from ifsteer.batcher import Batcher
from ifsteer.calibration import calibrate_groups, validation_groups
from ifsteer.errors import InvalidSteering
from ifsteer.evaluation import run_evaluation
from ifsteer.evaluation.store import read_responses
from ifsteer.jobs import Job, Sampling
from ifsteer.models import DEFAULT_MODEL, load_model
from ifsteer.rows import load_rows
from ifsteer.vectors import load_vector_files

from .conftest import CAPITAL, vllm_model_dir, write_capital_case

pytestmark = pytest.mark.vllm
TOKENS = 24


@pytest.fixture(scope="module")
def lm():
    return load_model(DEFAULT_MODEL, "float32")


@pytest.fixture(scope="module")
def data(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("runners")
    rows, layers = write_capital_case(root, lm)
    return root, load_rows(rows), layers


@pytest.fixture(scope="module")
def offline(lm):
    engine = OfflineVLLM(
        str(vllm_model_dir()),
        model_id=lm.model_id,
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=256 << 20,
    )
    engine.start()
    yield engine
    engine.close()


def _by_key(records):
    return {(r["setting"], str(r["key"])): r for r in records}


def test_eval_on_vllm_gives_the_hf_engines_answers_and_verdicts(lm, data, offline, tmp_path):
    root, rows, _ = data
    side = offline.side_model()
    assert (side.model_id, side.n_layers) == (lm.model_id, lm.n_layers)
    options = {"sampling": Sampling(max_new_tokens=TOKENS), "perplexity": False}
    hf = run_evaluation(lm, rows, root / "vectors", tmp_path / "hf", **options)
    ours = run_evaluation(
        side, rows, root / "vectors", tmp_path / "vllm", engine=offline.queue, **options
    )
    assert ours.generated == hf.generated == 4 * len(rows)
    theirs, mine = (_by_key(read_responses(s.responses_path)) for s in (hf, ours))
    assert mine.keys() == theirs.keys()
    agree: dict[str, int] = {}
    for (setting, _), record in mine.items():
        other = theirs[(setting, str(record["key"]))]
        same = (record["response"], record["strict"], record["loose"]) == (
            other["response"],
            other["strict"],
            other["loose"],
        )
        agree[setting] = agree.get(setting, 0) + same
        assert record["vectors"] == other["vectors"] and record["model"] == other["model"]
    print(f"rows equal to the HF engine's (of {len(rows)} each): {agree}")
    # Unsteered greedy text is token for token the HF engine's, so its verdicts are too.
    assert agree["no_instruction"] == agree["instruction"] == len(rows)
    # Steered: different kernels round differently, and a near-tie flipped under steering
    # changes the rest of the answer (tests/vllm/test_engine.py: 8 of 8 at 16 tokens).
    assert agree["steer"] >= len(rows) - 2 and agree["instruction_steer"] >= len(rows) - 2
    keys = [str(r.key) for r in rows]
    steered = sum(
        mine[("steer", k)]["response"] != mine[("no_instruction", k)]["response"] for k in keys
    )
    assert steered >= len(rows) // 2  # the vectors really steer


def test_vllm_records_an_unsteered_answers_logprob_as_the_hf_batcher_does(lm, data, offline):
    """What `run_evaluation` reads as an unsteered answer's perplexity: vLLM's sampled-token
    log-probabilities, summed without the stop token, match the HF batcher's."""
    _, rows, _ = data
    side = offline.side_model()
    sampling = Sampling(max_new_tokens=TOKENS)
    jobs = [Job(lm.render(row.prompt).ids, sampling=sampling, logprobs=True) for row in rows]
    hf, ours = (
        Batcher(lm, batch_size=4),
        offline.queue(side, batch_size=4, max_tokens=512, allow_transfer=False),
    )
    for queue in (hf, ours):
        for job in [*jobs, Job(jobs[0].ids, sampling=sampling)]:
            queue.submit(job)
    theirs, mine = hf.run(), ours.run()
    assert mine[len(jobs)].logprob is None  # not asked for
    for i in range(len(jobs)):
        assert mine[i].text == theirs[i].text
        assert mine[i].logprob is not None and mine[i].logprob < 0
        assert mine[i].logprob == pytest.approx(theirs[i].logprob, rel=1e-3, abs=1e-2)


def test_a_sweep_on_vllm_picks_a_point_and_writes_it(lm, data, offline, tmp_path):
    root, rows, layers = data
    groups = validation_groups(rows, {CAPITAL}, 3)
    sampling = Sampling(max_new_tokens=64)  # long enough for a settled line to fail early
    done = {}
    for name, engine in (("hf", None), ("vllm", offline.queue)):
        files = load_vector_files(root / "vectors")
        options = {"engine": engine} if engine else {}
        runner_lm = offline.side_model() if engine else lm
        (done[name],) = calibrate_groups(
            runner_lm,
            files,
            groups,
            tmp_path / name,
            layers=layers,
            sampling=sampling,
            set_default=False,
            **options,
        ).values()
    (hf, _, _), (ours, updated, written) = done["hf"], done["vllm"]
    assert (
        written.is_file() and json.loads(written.read_text())["chosen"] == ours.to_json()["chosen"]
    )
    extra = load_vector_files(root / "vectors")[CAPITAL].default.extra
    assert extra["sweep"]["layer"] == ours.chosen.point.coordinates[0] and list(updated) == [
        CAPITAL
    ]
    unsteered = [(r["response"], r["decided"]) for r in ours.responses if r["layer"] is None]
    assert unsteered == [(r["response"], r["decided"]) for r in hf.responses if r["layer"] is None]
    assert any(r["decided"] for r in hf.responses)  # the case does stop failures early
    agree = sum(
        (a["response"], a["decided"]) == (b["response"], b["decided"])
        for a, b in zip(ours.responses, hf.responses, strict=True)
    )
    print(
        f"sweep answers equal to the HF engine's: {agree} of {len(hf.responses)}; "
        f"chosen {ours.chosen.point.coordinates[0]} (HF: {hf.chosen.point.coordinates[0]})"
    )
    assert agree >= len(hf.responses) - 2
    if agree == len(hf.responses):  # the same answers and verdicts: the same grid and choice
        assert ours.grid == hf.grid and ours.chosen == hf.chosen
    assert extra["sweep"]["recommended"] == ours.recommended


def test_a_queue_checks_what_vllm_would_refuse_late(lm, offline):
    queue = offline.queue(offline.side_model())
    with pytest.raises(InvalidSteering, match="max_model_len 1024"):
        queue.submit(Job(lm.render("forest " * 1200).ids))
    assert not queue.busy


def test_vectors_build_searches_on_vllm_with_early_stopping_into_its_own_log(
    lm, offline, tmp_path, monkeypatch
):
    """`ifsteer vectors build --backend vllm --early-stop`: the search's answers come from
    vLLM's queue and land in `<id>.vllm.early.jsonl`, never in the HF engine's `<id>.jsonl`."""
    from ifsteer.calibration import SearchSpace
    from ifsteer.shipped import build, read_calibrated

    monkeypatch.setitem(build.TOKENS, "format", TOKENS)
    monkeypatch.setitem(build.N_PAIRS, "format", 4)
    builder = build.Builder(
        lm, None, tmp_path / "out", tmp_path / "work", n_prompts=2, seed=0, batch_size=8,
        engine=offline.queue, backend="vllm", early_stop=True,
    )  # fmt: skip
    builder.space = SearchSpace(
        layers=(18, 26), projection_scales=(), additive_scales=(), multi_layer=0,
        try_generated=False,
    )  # fmt: skip
    builder.run(["format"], only=[CAPITAL])
    assert read_calibrated(builder.out / "change_case__english_capital.safetensors").status == (
        "searched"
    )
    logs = sorted(p.name for p in builder.work.glob("*.jsonl"))
    assert logs == ["change_case__english_capital.vllm.early.jsonl"]
    lines = (builder.work / logs[0]).read_text().splitlines()
    assert len(lines) == 2 * 3  # no steering and two layers, on two prompts
