"""Training examples from our own queries: rule targets and self-distillation.

The queries are the extraction share of our base queries (`validation.extraction_queries`), so
a trained vector is never fitted on the prompts calibration scores it on, nor on IFEval's rows.

- *Rule targets* (`rules.rewrite`): the model's own unsteered answer, rewritten to follow the
  instruction. The unsteered answers do not depend on the instruction, so they are generated
  once per model and length and kept on disk (`answers-<tokens>.jsonl`).
- *Self-distillation*: the model's answers *with* the instruction in the prompt that pass its
  check (any instruction that has a checker); for a free-text instruction without a checker,
  every answer (plain distillation). The vector then learns to do without the instruction what
  the model does with it. Only answers that read fine count (`quality.Fluency`, the rule
  calibration judges steered answers by): a small model asked for German mostly loops in
  German (107 of its 114 passing answers), and a vector fitted to those learns the loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ifsteer.checks import check
from ifsteer.errors import IfsteerError
from ifsteer.generation import Sampling, generate
from ifsteer.instructions import Instruction
from ifsteer.models import LoadedModel
from ifsteer.quality import Fluency
from ifsteer.training.rules import has_rule, rewrite
from ifsteer.training.train import Example, Progress
from ifsteer.validation import check_for

__all__ = ["DISTILLED", "Answer", "distilled_examples", "rule_examples", "unsteered_answers"]

FLUENCY = Fluency()
# Which distilled answers train, as a competition records it: a change here makes a rerun of
# the build retry the distilled instructions whose trained vector lost (`compete`).
DISTILLED = "passing answers that read fine"


@dataclass(frozen=True)
class Answer:
    query: str
    text: str
    finished: bool


def unsteered_answers(
    lm: LoadedModel,
    queries: Sequence[str],
    max_new_tokens: int,
    cache: Path | None = None,
    progress: Progress | None = None,
) -> list[Answer]:
    """Greedy answers to `queries`, read from `cache` where an earlier run wrote them."""
    known: dict[str, Answer] = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text("utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that answer is generated again
            known[record["query"]] = Answer(record["query"], record["text"], record["finished"])
    todo = [q for q in dict.fromkeys(queries) if q not in known]
    if progress is not None and len(queries) > len(todo):
        progress(len(queries) - len(todo))  # those on disk already (a bar over `queries`)
    if todo:
        completions = generate(
            lm, todo, sampling=Sampling(max_new_tokens=max_new_tokens), progress=progress
        )
        fresh = [
            Answer(q, c.text, c.finish_reason == "stop")
            for q, c in zip(todo, completions, strict=True)
        ]
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with cache.open("a", encoding="utf-8") as f:
                for a in fresh:
                    record = {"query": a.query, "text": a.text, "finished": a.finished}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        known.update((a.query, a) for a in fresh)
    return [known[q] for q in queries]


def rule_examples(instruction_id: str, answers: Sequence[Answer]) -> list[Example]:
    """Each answer rewritten by the instruction's rule, kept where IFEval's check passes."""
    if not has_rule(instruction_id):
        return []
    check_id, kwargs = check_for(instruction_id)
    examples = []
    for answer in answers:
        target = rewrite(instruction_id, answer.text, answer.finished)
        if target is None or not check(check_id, kwargs, answer.query, target.text).strict:
            continue
        examples.append(
            Example(
                answer.query,
                target.text,
                target.finished,
                "rule",
                rejected=answer.text,
                rejected_finished=answer.finished,
            )
        )
    return examples


def distilled_examples(
    lm: LoadedModel,
    instruction: Instruction,
    queries: Sequence[str],
    max_new_tokens: int,
    progress: Progress | None = None,
    cache: Path | None = None,
) -> list[Example]:
    """The model's own answers with the instruction in the prompt that pass its check and read
    fine; the answers are kept in `cache`, so a stopped build does not generate them twice."""
    prompts = [f"{q} {instruction.phrasings[0]}" for q in queries]
    answers = unsteered_answers(lm, prompts, max_new_tokens, cache, progress)
    try:
        check_id, kwargs = check_for(instruction.id)
    except IfsteerError:
        check_id = None  # a free-text instruction: plain distillation
    examples = []
    for query, prompt, a in zip(queries, prompts, answers, strict=True):
        if not a.text.strip():
            continue
        if check_id is not None and not check(check_id, kwargs, prompt, a.text).loose:
            continue
        if FLUENCY.degenerate(a.text):
            continue
        examples.append(Example(query, a.text, a.finished, "distill"))
    return examples
