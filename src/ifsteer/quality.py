"""How good a response reads, apart from whether it follows the instruction.

Steering can buy instruction-following with fluency, so every evaluated response also gets an
offline fluency score: the share of repeated word n-grams, and its perplexity under the model
itself, unsteered. `Fluency` is the one rule for when a response is *degenerate*, with two
policies: the paper's (`PAPER_FLUENCY`: repeating itself, or a perplexity under 2.5, the paper's
threshold), which evaluation reports and the paper's sweep zeroes; and the staged search's
(`SEARCH_FLUENCY`: loops found by compression, perplexity under a judge model inside a band).

The optional LLM judge follows the paper (docs/method.md §5): the judge writes up to five
yes/no quality questions for a request, then answers them for a response; the score is the
share of "yes". It talks to any OpenAI-compatible endpoint and never stops a run: a failing
endpoint gives `None` and a warning.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ifsteer.models import LoadedModel

__all__ = [
    "PAPER_FLUENCY",
    "SEARCH_FLUENCY",
    "Fluency",
    "Judge",
    "chat_completions_url",
    "compression_ratio",
    "judge",
    "judge_questions",
    "perplexities",
    "repetition_rate",
    "tail_compression",
]

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+", re.UNICODE)
MAX_QUESTIONS = 5


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the word n-grams of `text` that repeat an earlier n-gram (0 = no repetition).

    Words are runs of letters and digits, lowercased; a text of fewer than `n` words has no
    n-gram to repeat and scores 0. "a b c a b c a b c" has 7 trigrams, 4 of them seen before.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        if gram in seen:
            repeats += 1
        seen.add(gram)
    return repeats / len(grams)


def perplexities(
    lm: LoadedModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 8,
) -> list[float]:
    """Perplexity of each response's tokens given its prompt in the model's format.

    The prompt is formatted as generation formats it (chat template or `Q: ...\\nA:`) and the
    response tokenized on its own, as generation produced it; only response tokens are scored.
    Call it outside any `steer` block: it measures how plausible the *unsteered* model finds
    the text. Batched with right padding; an empty response gives nan.
    """
    import torch  # here, so reading the fluency rules does not load a model stack

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    tok = lm.tokenizer
    sequences: list[tuple[list[int], int]] = []  # token ids, number of prompt tokens
    for prompt, response in zip(prompts, responses, strict=True):
        prompt_ids = tok(lm.format_prompt(prompt), add_special_tokens=not lm.is_chat).input_ids
        response_ids = tok(response, add_special_tokens=False).input_ids if response else []
        sequences.append((list(prompt_ids) + list(response_ids), len(prompt_ids)))
    result = [math.nan] * len(sequences)
    scored = [i for i, (ids, n_prompt) in enumerate(sequences) if len(ids) > n_prompt]
    scored.sort(key=lambda i: -len(sequences[i][0]))  # similar lengths share a batch
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(scored), batch_size):
        chunk = scored[start : start + batch_size]
        width = max(len(sequences[i][0]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids, n_prompt = sequences[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        with torch.no_grad():
            logits = lm.model(
                input_ids=input_ids.to(lm.device),
                attention_mask=mask.to(lm.device),
                use_cache=False,
            ).logits
            targets = labels[:, 1:].to(lm.device)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )
        counts = (targets != -100).sum(dim=1)
        for row, i in enumerate(chunk):
            result[i] = math.exp(float(losses[row].sum() / counts[row]))
    return result


def compression_ratio(text: str) -> float:
    """zlib-compressed size over UTF-8 size: ordinary prose is near 0.5, loops far lower.
    An empty text scores 1 (nothing repeats)."""
    data = text.encode("utf-8")
    return len(zlib.compress(data, 9)) / len(data) if data else 1.0


def tail_compression(text: str, chars: int = 300) -> float:
    """`compression_ratio` of the last `chars` characters: loops take over the end."""
    return compression_ratio(text[-chars:])


@dataclass(frozen=True)
class Fluency:
    """When an answer counts as degenerate, and how a point's share of them counts.

    The defaults are the staged search's (measured in docs/shipped.md). Word-trigram repetition
    misses loops inside one "word" (a script without spaces, or "صيريوريوريوريو..."), and a
    judge that knows the script finds such loops plausible, so the main signal is how well the
    *end* of the answer compresses (`tail_compression`, the last 300 characters, so answers of
    any length compare): a loop compresses to a fraction of its size. Unsteered answers that
    read fine have tail ratios 0.46–0.69, looping ones 0.05–0.35; trigram repetition of fine
    256-token answers stays ≤ 0.55 (loops 0.75–0.96); their perplexity under Gemma 3 270M base
    is 3.7–16. Thresholds sit outside the fine range.

    The unsteered model itself loops in about half of its 256-token answers, so the search
    counts an answer against a point only where steering broke it (`calibration.search`), and
    `max_degenerate` = 1 leaves the score alone; the paper's sweep zeroes a point where more
    than `max_degenerate` of the answers pass only by degenerating (`calibration.score_point`).
    """

    max_repetition: float = 0.7
    min_perplexity: float = 1.8
    max_perplexity: float = 80.0
    min_tail_compression: float = 0.4
    max_degenerate: float = 1.0

    def degenerate(self, text: str, perplexity: float | None = None) -> bool:
        """Whether `text` has collapsed; a perplexity that is None or nan was not measured.
        An empty answer is not degenerate (it fails its checks instead)."""
        if repetition_rate(text) > self.max_repetition:
            return True
        if tail_compression(text) < self.min_tail_compression:
            return True
        if perplexity is None or not math.isfinite(perplexity):
            return False
        return not self.min_perplexity <= perplexity <= self.max_perplexity


SEARCH_FLUENCY = Fluency()
# The paper's rule: trigrams repeating, or text the unsteered model (GPT-2 in the paper) finds
# implausibly predictable; a point where most passes degenerate scores zero.
PAPER_FLUENCY = Fluency(
    max_repetition=0.5,
    min_perplexity=2.5,
    max_perplexity=math.inf,
    min_tail_compression=0.0,
    max_degenerate=0.5,
)


# --- LLM judge ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judge:
    """Where the judge lives: an OpenAI-compatible server and the model name to ask for."""

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0

    def score(self, prompt: str, response: str) -> float | None:
        return judge(
            self.url, self.model, prompt, response, api_key=self.api_key, timeout=self.timeout
        )


_QUESTIONS_PROMPT = (
    "A user sent this request to an AI assistant:\n\n<request>\n{prompt}\n</request>\n\n"
    "Write at most {n} yes/no questions that check the quality of a response to this request: "
    "is it relevant, correct, complete, coherent and well written? A good response must get "
    '"yes" to every question. Do not ask about formatting or length. Write one question per '
    "line, numbered 1., 2., ..., and nothing else."
)
_ANSWERS_PROMPT = (
    "A user sent this request to an AI assistant:\n\n<request>\n{prompt}\n</request>\n\n"
    "The assistant replied:\n\n<response>\n{response}\n</response>\n\n"
    "Answer each question below about the response with yes or no. Write one line per "
    'question in the form "1. yes" or "1. no", and nothing else.\n\n{questions}'
)
_NUMBERED = re.compile(r"^\s*(?:[-*•]\s*)?(\(?\d+[.):]\s*)?(.*\S)\s*$")
_ANSWER = re.compile(r"^\s*(?:[-*•]\s*)?(?:\(?(\d+)[.):]?\s*)?\**\s*(yes|no)\b", re.IGNORECASE)
_questions_cache: dict[tuple[str, str, str], tuple[str, ...]] = {}
_cache_lock = threading.Lock()


def chat_completions_url(url: str) -> str:
    """Accept a server root, its `/v1`, or the full `/v1/chat/completions` address."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return f"{url}/chat/completions"
    return f"{url}/v1/chat/completions"


_client_lock = threading.Lock()
_client: Any = None


def _http() -> Any:
    """One pooled client for every judge call (a client per call redoes TLS setup)."""
    global _client
    import httpx

    with _client_lock:
        if _client is None:
            _client = httpx.Client()
        return _client


def _ask(url: str, model: str, content: str, api_key: str | None, timeout: float) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 512,
    }
    reply = _http().post(chat_completions_url(url), json=body, headers=headers, timeout=timeout)
    reply.raise_for_status()
    return str(reply.json()["choices"][0]["message"]["content"])


def _parse_questions(text: str) -> tuple[str, ...]:
    questions = []
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match and (match.group(1) or match.group(2).endswith("?")):
            questions.append(match.group(2).strip("* "))
    return tuple(questions[:MAX_QUESTIONS])


def _parse_answers(text: str, n_questions: int) -> list[bool]:
    """Yes/no per question, by number where the judge numbered them, else in order."""
    numbered: dict[int, bool] = {}
    ordered: list[bool] = []
    for line in text.splitlines():
        match = _ANSWER.match(line)
        if not match:
            continue
        value = match.group(2).lower() == "yes"
        if match.group(1) is not None and 1 <= int(match.group(1)) <= n_questions:
            numbered.setdefault(int(match.group(1)), value)
        else:
            ordered.append(value)
    if numbered:
        return [numbered[k] for k in sorted(numbered)]
    return ordered[:n_questions]


def judge_questions(
    url: str, model: str, prompt: str, *, api_key: str | None = None, timeout: float = 60.0
) -> tuple[str, ...]:
    """The judge's yes/no quality questions for one request; asked once per request and cached.

    Raises on a failing endpoint; `judge` turns that into a warning.
    """
    key = (chat_completions_url(url), model, prompt)
    with _cache_lock:
        cached = _questions_cache.get(key)
    if cached is not None:
        return cached
    asked = _QUESTIONS_PROMPT.format(prompt=prompt, n=MAX_QUESTIONS)
    text = _ask(url, model, asked, api_key, timeout)
    questions = _parse_questions(text)
    if not questions:
        raise ValueError(f"the judge wrote no numbered yes/no questions: {text[:120]!r}")
    with _cache_lock:
        _questions_cache[key] = questions
    return questions


def judge(
    url: str,
    model: str,
    prompt: str,
    response: str,
    *,
    api_key: str | None = None,
    timeout: float = 60.0,
) -> float | None:
    """Share of the judge's quality questions for `prompt` that it answers "yes" for `response`.

    `prompt` is the request whose quality matters; evaluation passes the query *without* the
    instruction, so the judge rates content, not compliance (which the IFEval checks score).
    Returns None, with a warning in the log, when the endpoint fails or its replies cannot be
    read: a judge outage must not stop an evaluation run.
    """
    try:
        questions = judge_questions(url, model, prompt, api_key=api_key, timeout=timeout)
        listed = "\n".join(f"{i}. {q}" for i, q in enumerate(questions, start=1))
        text = _ask(
            url,
            model,
            _ANSWERS_PROMPT.format(prompt=prompt, response=response, questions=listed),
            api_key,
            timeout,
        )
        answers = _parse_answers(text, len(questions))
        if not answers:
            raise ValueError(f"no yes/no answers in the judge's reply: {text[:120]!r}")
        return sum(answers) / len(answers)
    except Exception as exc:  # noqa: BLE001 - any failure of the judge is a warning, not a crash
        log.warning(
            "LLM judge at %s failed (%s: %s); quality score left empty",
            url,
            type(exc).__name__,
            exc,
        )
        return None
