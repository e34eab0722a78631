"""The paper's four settings over a set of rows, resumable (docs/method.md §5).

Every row is answered in up to four settings: **no_instruction** (the query alone), **steer**
(the query plus the row's vectors), **instruction** (the full IFEval prompt) and
**instruction_steer** (both). Each response is checked with IFEval's strict and loose checkers,
scored for fluency, and appended to ``responses.jsonl`` as soon as the engine finishes it; a rerun
into the same directory skips what is there, so a killed run resumes where it stopped.

A row whose vector has no file runs unsteered in the steered settings, is recorded with
``vectors: []`` and its missing ids, and counted in the summary (``n_unsteered``). Experiments
reuse this one loop and differ only in how rows are prepared (`ifsteer.rows.prepare_rows`);
``transfer`` also accepts vectors of another model of the same hidden size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ifsteer import quality
from ifsteer.batcher import Batcher
from ifsteer.checks import check_row, ensure_punkt
from ifsteer.errors import EvaluationError
from ifsteer.evaluation.plan import VectorPlan, VectorSource, plan_vectors
from ifsteer.evaluation.store import check_resume, done_key, open_for_append, read_responses
from ifsteer.evaluation.summary import write_summary
from ifsteer.jobs import Completion, Job, QueueFactory, Sampling
from ifsteer.models import LoadedModel
from ifsteer.rows import SETTINGS, STEERED, WITH_INSTRUCTION, Row, prepare_rows
from ifsteer.rundir import RESPONSES, SUMMARY
from ifsteer.vectors import Mode

__all__ = ["DEFAULT_SAMPLING", "Summary", "count_pending", "run_evaluation"]

log = logging.getLogger("ifsteer.evaluation")

# Greedy, as in the paper; long enough for most IFEval answers to finish.
DEFAULT_SAMPLING = Sampling(max_new_tokens=256)
Progress = Callable[[int], None]
# Answers between two partial summaries while a long run goes on.
_SUMMARY_EVERY = 32


# --- running --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """What a run left in `out_dir`: the summary (as in summary.json) and what this call did."""

    data: dict[str, Any]
    out_dir: Path
    generated: int
    skipped: int
    missing_vectors: tuple[str, ...] = ()

    @property
    def responses_path(self) -> Path:
        return self.out_dir / RESPONSES

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY

    def experiment(self, name: str) -> dict[str, Any]:
        return dict(self.data["experiments"].get(name, {}))


def _check_settings(settings: Sequence[str]) -> tuple[str, ...]:
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise EvaluationError(
            f"unknown settings {unknown or '(none)'}; choose among {', '.join(SETTINGS)}"
        )
    return tuple(s for s in SETTINGS if s in settings)


def count_pending(
    out_dir: str | Path,
    rows: Sequence[Row],
    *,
    experiment: str = "format",
    settings: Sequence[str] = SETTINGS,
) -> int:
    """How many responses a `run_evaluation` into `out_dir` still has to generate."""
    done = {done_key(r) for r in read_responses(Path(out_dir) / RESPONSES)}
    return sum(
        (experiment, s, str(r.key)) not in done for s in _check_settings(settings) for r in rows
    )


def _sentences(text: str) -> int:
    import nltk  # type: ignore[import-untyped]

    return len(nltk.sent_tokenize(text)) if text.strip() else 0


def run_evaluation(
    lm: LoadedModel,
    rows: Sequence[Row],
    vectors: VectorSource | None,
    out_dir: str | Path,
    *,
    settings: Sequence[str] = SETTINGS,
    experiment: str = "format",
    sampling: Sampling = DEFAULT_SAMPLING,
    batch_size: int | None = None,
    allow_transfer: bool = False,
    weights: Mapping[str, float] | None = None,
    modes: Mapping[str, Mode] | None = None,
    layers: Mapping[str, int] | None = None,
    judge: quality.Judge | None = None,
    perplexity: bool = True,
    fluency_lm: LoadedModel | None = None,
    progress: Progress | None = None,
    engine: QueueFactory = Batcher,
) -> Summary:
    """Answer `rows` in each setting, append every response to out_dir/responses.jsonl, and
    write out_dir/summary.json; responses already in the file are skipped (resume).

    `vectors` is a vector directory or a mapping from vector id to file (or SteeringVector).
    `weights`, `modes`, `layers` override what the files store, by vector id or glob
    (`{"keywords:*": 100}`); an excluded word always gets the negated weight. `transfer`
    (or `allow_transfer`) accepts vectors of another model with the same hidden size.
    Perplexity is computed unsteered under `fluency_lm` (default: `lm` itself). Greedy text
    is likely under the model that wrote it by construction (SmolLM2's own greedy answers score
    1.2-2.5), so the paper's "perplexity < 2.5 is degenerate" rule, made for an independent
    scorer (GPT-2), is applied only when `fluency_lm` is another model; with `lm` itself a
    response is degenerate by repetition alone. All answers of all settings go to one
    continuous `Batcher` (`batch_size` None: sized to the model and free memory), or
    to the queue `engine(lm, ...)` makes (`OfflineVLLM.queue`: the same jobs on vLLM; `lm`
    still tokenizes, checks the vectors and scores perplexity); `progress(n)` is called as
    soon as n more answers are on disk.
    """
    started = time.perf_counter()
    settings = _check_settings(settings)
    rows = prepare_rows(rows, experiment)
    if batch_size is not None and batch_size < 1:
        raise EvaluationError("batch_size must be at least 1")
    if any(s not in WITH_INSTRUCTION for s in settings):
        lacking = [r for r in rows if r.prompt_without_instruction is None]
        if lacking:
            raise EvaluationError(
                f"{len(lacking)} rows (first: {lacking[0].source}) have no "
                "'prompt_without_instruction', which the no_instruction and steer settings "
                "need; run only --settings instruction,instruction_steer"
            )
    allow_transfer = allow_transfer or experiment == "transfer"
    steered = [s for s in settings if s in STEERED]
    if steered and vectors is None:
        raise EvaluationError(
            f"settings {', '.join(steered)} need vectors: pass a vector directory (--vectors)"
        )
    plan = plan_vectors(
        lm,
        rows,
        vectors if steered else None,
        weights=weights or {},
        modes=modes or {},
        layers=layers or {},
        allow_transfer=allow_transfer,
    )
    if steered and plan.missing_ids:
        n_rows = sum(bool(m) for m in plan.missing.values())
        log.warning(
            "no vector file for %s: %d of %d rows run unsteered (or partly steered) in the "
            "steered settings",
            ", ".join(plan.missing_ids),
            n_rows,
            len(rows),
        )
    ensure_punkt()
    out = Path(out_dir)
    path = out / RESPONSES
    sampling_record = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
    }
    generated = skipped = 0
    with open_for_append(path) as (handle, existing):
        check_resume(existing, experiment, lm.model_id, sampling_record, plan.records, path)
        done = {done_key(r) for r in existing}
        todo = _schedule(lm, rows, settings, experiment, done)
        skipped = len(rows) * len(settings) - len(todo)
        tokens = [lm.render(row.prompt_for(setting)).ids for setting, row in todo]
        queue = engine(
            lm,
            batch_size=batch_size,
            allow_transfer=True,  # vectors were checked when planned
            max_tokens=max(map(len, tokens), default=0) + sampling.max_new_tokens,
        )
        finished: list[tuple[str, Row, Completion]] = []
        # An unsteered answer's perplexity under `lm` is its own generation's log-probability:
        # the queue records it, and no second forward reads the answer.
        own = perplexity and (fluency_lm is None or fluency_lm is lm)
        for (setting, row), ids in zip(todo, tokens, strict=True):
            queue.submit(
                Job(
                    ids,
                    steering=plan.steerings[str(row.key)] if setting in STEERED else (),
                    sampling=sampling,
                    on_done=_collect(finished, setting, row),
                    logprobs=own and setting not in STEERED,
                )
            )
        last = time.perf_counter()
        while queue.busy:
            queue.step()
            if not finished:
                continue
            now = time.perf_counter()
            records = _answer(
                lm,
                finished,
                experiment,
                plan,
                sampling_record,
                judge=judge,
                perplexity=perplexity,
                fluency_lm=fluency_lm,
                seconds=(now - last) / len(finished),
            )
            last, count = now, len(finished)
            finished.clear()
            payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            handle.write(payload.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            before, generated = generated, generated + count
            if progress is not None:
                progress(count)
            if generated // _SUMMARY_EVERY > before // _SUMMARY_EVERY:
                write_summary(out)  # a partial table to look at while a long run goes on
    data = write_summary(out)
    elapsed = time.perf_counter() - started
    log.info("evaluation %s: %d responses in %.1fs", experiment, generated, elapsed)
    return Summary(data, out, generated, skipped, plan.missing_ids if steered else ())


def _collect(
    finished: list[tuple[str, Row, Completion]], setting: str, row: Row
) -> Callable[[Completion], None]:
    return lambda completion: finished.append((setting, row, completion))


def _schedule(
    lm: LoadedModel,
    rows: Sequence[Row],
    settings: Sequence[str],
    experiment: str,
    done: set[tuple[str, str, str]],
) -> list[tuple[str, Row]]:
    """The (setting, row) answers still to make, in the order they join the engine.

    Rows go longest prompt first, so rows that join together have similar lengths; the
    settings take turns row by row, so a run stopped at any point has answered about the same
    rows in every setting and its partial table already compares like with like.
    """
    length = {str(r.key): len(lm.tokenizer(r.prompt).input_ids) for r in rows}
    ordered = sorted(rows, key=lambda r: -length[str(r.key)])
    return [
        (setting, row)
        for row in ordered
        for setting in settings
        if (experiment, setting, str(row.key)) not in done
    ]


def _answer(
    lm: LoadedModel,
    finished: Sequence[tuple[str, Row, Completion]],
    experiment: str,
    plan: VectorPlan,
    sampling_record: Mapping[str, Any],
    *,
    judge: quality.Judge | None,
    perplexity: bool,
    fluency_lm: LoadedModel | None,
    seconds: float,
) -> list[dict[str, Any]]:
    """Answers the engine just finished: checked, scored for fluency, as records.

    `seconds` is each answer's share of the wall time since the previous answers were
    written, so the records' seconds add up to the run's generation time.
    """
    prompts = [row.prompt_for(setting) for setting, row, _ in finished]
    texts = [completion.text for _, _, completion in finished]
    scorer = fluency_lm or lm
    independent = scorer is not lm
    ppl: list[float | None] = [None] * len(texts)
    if perplexity:
        ppl = [c.perplexity for _, _, c in finished]  # recorded where `lm` itself scores
        rest = [i for i, p in enumerate(ppl) if p is None]  # steered, or not recorded
        if rest:
            scored = quality.perplexities(
                scorer, [prompts[i] for i in rest], [texts[i] for i in rest], batch_size=len(rest)
            )
            for i, p in zip(rest, scored, strict=True):
                ppl[i] = p
    records = []
    for (setting, row, completion), prompt, p in zip(finished, prompts, ppl, strict=True):
        steer = setting in STEERED
        results = check_row(row.instruction_id_list, row.kwargs or (), row.prompt, completion.text)
        p = None if p is None or math.isnan(p) else p
        score = None
        if judge is not None:
            score = judge.score(row.prompt_without_instruction or row.prompt, completion.text)
        records.append(
            {
                "experiment": experiment,
                "setting": setting,
                "key": row.key,
                "instruction_id_list": list(row.instruction_id_list),
                "kwargs": list(row.kwargs or ()),
                "prompt": prompt,
                "response": completion.text,
                "strict": [r.strict for r in results],
                "loose": [r.loose for r in results],
                "vectors": plan.records[str(row.key)] if steer else [],
                "missing_vectors": plan.missing[str(row.key)] if steer else [],
                "fluency": {
                    "repetition": quality.repetition_rate(completion.text),
                    "perplexity": p,
                    "degenerate": quality.PAPER_FLUENCY.degenerate(
                        completion.text, p if independent else None
                    ),
                },
                "fluency_model": scorer.model_id if perplexity else None,
                "judge": score,
                "sentences": _sentences(completion.text),
                "completion_tokens": completion.completion_tokens,
                "finish_reason": completion.finish_reason,
                "sampling": dict(sampling_record),
                "model": lm.model_id,
                "seconds": round(seconds, 4),
            }
        )
    return records


# --- summary --------------------------------------------------------------------------------
