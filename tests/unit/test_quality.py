from __future__ import annotations

import json
import logging
import math
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from ifsteer.quality import (
    PAPER_FLUENCY,
    SEARCH_FLUENCY,
    Fluency,
    Judge,
    chat_completions_url,
    compression_ratio,
    judge,
    perplexities,
    repetition_rate,
    tail_compression,
)

# --- repetition and degeneracy --------------------------------------------------------------


def test_repetition_rate_counts_repeated_trigrams():
    # trigrams: abc bca cab abc bca cab abc -> the last four were seen before
    assert repetition_rate("a b c a b c a b c") == pytest.approx(4 / 7)
    assert repetition_rate("The the THE", n=1) == pytest.approx(2 / 3)  # case-insensitive
    assert repetition_rate("Every word here is different from the others.") == 0.0


def test_repetition_rate_of_short_text_is_zero():
    assert repetition_rate("") == 0.0
    assert repetition_rate("two words") == 0.0
    assert repetition_rate("two words", n=2) == 0.0  # one bigram, nothing before it


def test_the_papers_fluency_rule():
    loop = "I like it. " * 20
    prose = "Tides follow the moon, which pulls the oceans toward it as Earth turns."
    assert PAPER_FLUENCY.degenerate(loop)
    assert not PAPER_FLUENCY.degenerate(prose)
    assert not PAPER_FLUENCY.degenerate(prose, 12.0)
    assert not PAPER_FLUENCY.degenerate(prose, 1e6)  # no ceiling in the paper's rule
    assert PAPER_FLUENCY.degenerate(prose, 1.8)  # the paper's threshold: perplexity below 2.5
    assert not PAPER_FLUENCY.degenerate(prose, math.nan)
    assert not replace(PAPER_FLUENCY, min_perplexity=1.5).degenerate(prose, 1.8)
    assert not replace(PAPER_FLUENCY, max_repetition=0.99).degenerate(loop)
    assert not PAPER_FLUENCY.degenerate("")


def test_the_search_fluency_band():
    fluency = Fluency(max_repetition=0.5, min_perplexity=2.0, max_perplexity=50.0)
    prose = "Tides follow the moon, which pulls the oceans toward it as Earth turns."
    assert not fluency.degenerate(prose, 10.0)
    assert fluency.degenerate("I like it. " * 20, 10.0)
    assert fluency.degenerate(prose, 1.2)  # looping
    assert fluency.degenerate(prose, 400.0)  # broken
    assert not fluency.degenerate("", math.nan)  # empty answers fail their check instead
    assert fluency.degenerate("صيريوريوريوريو" + "ريو" * 80, 10.0)  # a loop inside one "word"
    assert not SEARCH_FLUENCY.degenerate(prose, None)


def test_compression_ratio_separates_loops_from_prose():
    prose = (
        "Bees dance to tell the hive where flowers are; the angle and length of the dance matter."
    )
    assert compression_ratio("صيريوريوريوريو" + "ريو" * 80) < 0.2 < compression_ratio(prose)
    assert compression_ratio("") == 1.0
    # Only the end counts: a fine opening does not hide a loop that took over.
    assert tail_compression(prose * 3 + "a cup of tea, " * 40) < 0.2


# --- perplexity -----------------------------------------------------------------------------


def _reference_perplexity(lm, prompt: str, response: str) -> float:
    """Straight from the definition: mean NLL of the response tokens after the prompt."""
    tok = lm.tokenizer
    prompt_ids = tok(lm.format_prompt(prompt), add_special_tokens=not lm.is_chat).input_ids
    response_ids = tok(response, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
    nll = [-logprobs[len(prompt_ids) + i - 1, token].item() for i, token in enumerate(response_ids)]
    return math.exp(sum(nll) / len(nll))


def test_perplexities_match_the_definition_and_ignore_batching(tiny_lm):
    prompts = ["Why is the sky blue?", "Plan a picnic for a rainy afternoon with friends.", "Hi"]
    responses = ["Because of scattering.", "Bring umbrellas", "Hello there, how can I help you?"]
    batched = perplexities(tiny_lm, prompts, responses, batch_size=3)
    pairs = list(zip(prompts, responses, strict=True))
    alone = [perplexities(tiny_lm, [p], [r])[0] for p, r in pairs]
    reference = [_reference_perplexity(tiny_lm, p, r) for p, r in pairs]
    assert batched == pytest.approx(reference, rel=1e-4)
    assert alone == pytest.approx(reference, rel=1e-4)
    # A random model over a 320-token vocabulary is about as unsure as it can be.
    assert all(50 < p < 2000 for p in batched)


def test_perplexity_of_an_empty_response_is_nan(tiny_lm):
    values = perplexities(tiny_lm, ["Why?", "Why not?"], ["", "Because."])
    assert math.isnan(values[0]) and math.isfinite(values[1])


def test_perplexities_need_one_response_per_prompt(tiny_lm):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        perplexities(tiny_lm, ["a", "b"], ["c"])


# --- LLM judge against a real OpenAI-compatible stub ----------------------------------------


class _Stub(ThreadingHTTPServer):
    """A tiny OpenAI-compatible /v1/chat/completions that writes questions and answers."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.status = 200
        self.questions = (
            "Here you go:\n1. Is it relevant?\n2. **Is it correct?**\n3. Is it complete?"
        )
        self.answers = "1. Yes\n2. no\n3. yes"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Stub

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        content = body["messages"][-1]["content"]
        text = self.server.questions if "yes/no questions" in content else self.server.answers
        payload = json.dumps(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        ).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[_Stub]:
    server = _Stub()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_judge_scores_the_share_of_yes(stub):
    score = judge(
        stub.url, "judge-model", "Explain tides. (unique 1)", "The moon pulls.", api_key="k"
    )
    assert score == pytest.approx(2 / 3)
    first, second = stub.requests
    assert first["path"] == second["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer k" and first["body"]["model"] == "judge-model"
    answered = second["body"]["messages"][-1]["content"]
    assert "The moon pulls." in answered
    assert "1. Is it relevant?" in answered and "2. Is it correct?" in answered


def test_judge_asks_for_questions_once_per_prompt(stub):
    prompt = "Describe a forest. (unique 2)"
    assert judge(stub.url + "/v1", "m", prompt, "Trees.") == pytest.approx(2 / 3)
    stub.answers = "1. yes\n2. yes\n3. yes"
    assert Judge(stub.url, "m").score(prompt, "Tall trees.") == 1.0
    asked_questions = [r for r in stub.requests if "yes/no questions" in str(r["body"])]
    assert len(asked_questions) == 1 and len(stub.requests) == 3


def test_judge_failure_is_a_warning_not_a_crash(stub, caplog):
    stub.status = 500
    with caplog.at_level(logging.WARNING, logger="ifsteer.quality"):
        assert judge(stub.url, "m", "Plan a picnic. (unique 3)", "Bring food.") is None
    assert "judge" in caplog.text and "500" in caplog.text


def test_judge_unreadable_answers_give_none(stub):
    stub.answers = "I would rather not say."
    assert judge(stub.url, "m", "Why cats purr? (unique 4)", "They are happy.") is None


def test_judge_unreachable_endpoint_gives_none(caplog):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="ifsteer.quality"):
        assert judge(f"http://127.0.0.1:{port}", "m", "Hi? (unique 5)", "Hello.", timeout=2) is None
    assert "failed" in caplog.text


def test_chat_completions_url():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
