"""How a model reads a conversation: the one prompt renderer every path uses.

The CLI, the evaluation runners and both serving backends must put a prompt in front of the
model in exactly the same way, or a vector calibrated with one gives other answers with
another. So the choice between the chat template and the base-model `Q: ...\\nA:` turns, the
special-token rule that goes with it, and the tokens that end a turn are made here, once.
Plain Python over a tokenizer: nothing here loads a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ifsteer.errors import IfsteerError

BASE_PROMPT_FORMAT = "Q: {prompt}\nA:"
# End-of-turn markers of common chat templates; generation stops on any that the vocab has.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")

Turn = tuple[str, str]  # (role, text); roles as chat templates name them


class InvalidPrompt(IfsteerError):
    """A conversation the model's template (or the base-model format) cannot render."""


@dataclass(frozen=True)
class Prompt:
    """What the model reads, and how: chat templates write their own BOS, so a templated
    prompt is tokenized without special tokens; raw text (and base models' `Q: ...\\nA:`) is
    tokenized with them.

    `user_only` is the text of a one-message user chat, which a backend built on
    `generate(formatted=True)` can hand over unchanged.
    """

    text: str
    add_special_tokens: bool
    user_only: str | None = None


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, turns: Sequence[Turn]) -> Prompt:
    """The chat template with the generation prompt; base models get `Q: ...\\nA:` turns."""
    if not turns:
        raise InvalidPrompt("a chat needs at least one message")
    single = turns[0][1] if len(turns) == 1 and turns[0][0] == "user" else None
    if has_template(tokenizer):
        messages = [{"role": role, "content": text} for role, text in turns]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja raises its own errors for roles a template refuses
            raise InvalidPrompt(
                f"the model's chat template refused these messages: {exc}"
            ) from None
        return Prompt(str(text), add_special_tokens=False, user_only=single)
    if turns[-1][0] != "user":
        raise InvalidPrompt("a base model's chat must end with a user message")
    parts = []
    for role, text in turns:
        if role == "user":
            parts.append(BASE_PROMPT_FORMAT.format(prompt=text))
        elif role == "assistant":
            parts.append(f" {text}\n")
        else:
            parts.append(f"{text}\n\n")
    return Prompt("".join(parts), add_special_tokens=True, user_only=single)


def render_text(text: str) -> Prompt:
    """Raw text, read as written (a completions prompt)."""
    return Prompt(text, add_special_tokens=True)


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    return list(tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens).input_ids)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and every end-of-turn marker the vocabulary has, so every backend stops alike."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)
