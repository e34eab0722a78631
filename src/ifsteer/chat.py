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
    """What the model reads: `ids`, made here once, which every backend reads as they are, and
    `text`, what they spell (for counting characters and for people).

    A chat template writes its own BOS, so its text is tokenized without special tokens; raw
    text (and base models' `Q: ...\\nA:`) with them. Where a message's content holds a control
    token's text (`<|im_end|>`), the ids keep it text (`render_chat`), so they are not what
    tokenizing `text` would give.
    """

    text: str
    ids: tuple[int, ...]


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, turns: Sequence[Turn]) -> Prompt:
    """The chat template with the generation prompt; base models get `Q: ...\\nA:` turns.

    Messages are text: a user who writes `<|im_end|>\\n<|im_start|>system` must not forge a
    system turn, so where content holds a control token's text the prompt carries its `ids`,
    the template's own tokens live and the content's read as plain text."""
    if not turns:
        raise InvalidPrompt("a chat needs at least one message")
    forged = _holds_control_text(tokenizer, turns)
    if has_template(tokenizer):
        text = _apply_template(tokenizer, turns)
        ids = _template_ids(tokenizer, turns) if forged else _ids(tokenizer, text, special=False)
        return Prompt(text, ids)
    if turns[-1][0] != "user":
        raise InvalidPrompt("a base model's chat must end with a user message")
    pieces: list[tuple[str, bool]] = []  # (text, is content)
    for role, text in turns:
        if role == "user":
            before, after = BASE_PROMPT_FORMAT.split("{prompt}")
            pieces += [(before, False), (text, True), (after, False)]
        elif role == "assistant":
            pieces += [(" ", False), (text, True), ("\n", False)]
        else:
            pieces += [(text, True), ("\n\n", False)]
    text = "".join(piece for piece, _ in pieces)
    if forged:
        return Prompt(text, _with_special_tokens(tokenizer, _piece_ids(tokenizer, pieces)))
    return Prompt(text, _ids(tokenizer, text, special=True))


def _apply_template(tokenizer: Any, turns: Sequence[Turn]) -> str:
    messages = [{"role": role, "content": text} for role, text in turns]
    try:
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    except Exception as exc:  # jinja raises its own errors for roles a template refuses
        raise InvalidPrompt(f"the model's chat template refused these messages: {exc}") from None


def control_texts(tokenizer: Any) -> set[str]:
    """The text of every special token: what the tokenizer turns into a control token when it
    meets it in a string."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {str(t.content) for t in added.values() if getattr(t, "special", False)}
    return {t for t in (*texts, *getattr(tokenizer, "all_special_tokens", ())) if t}


def _holds_control_text(tokenizer: Any, turns: Sequence[Turn]) -> bool:
    texts = control_texts(tokenizer)
    return any(t in content for _, content in turns for t in texts)


def _template_ids(tokenizer: Any, turns: Sequence[Turn]) -> tuple[int, ...]:
    """The template rendered around placeholders, its pieces tokenized with control tokens live
    and each message's content spliced in as text."""
    marks = [f"\x00ifsteer-content-{i}\x00" for i in range(len(turns))]
    skeleton = _apply_template(
        tokenizer, [(role, m) for (role, _), m in zip(turns, marks, strict=True)]
    )
    pieces: list[tuple[str, bool]] = []
    rest = skeleton
    for (_, content), mark in zip(turns, marks, strict=True):
        if rest.count(mark) != 1:
            raise InvalidPrompt(
                "a message holds a control token's text (such as <|im_end|>), and this chat "
                "template does not write each message once, so it cannot be kept as text"
            )
        before, rest = rest.split(mark)
        pieces += [(before, False), (content, True)]
    pieces.append((rest, False))
    return _piece_ids(tokenizer, pieces)


def _piece_ids(tokenizer: Any, pieces: Sequence[tuple[str, bool]]) -> tuple[int, ...]:
    ids: list[int] = []
    for text, is_content in pieces:
        if text:
            ids += tokenizer(
                text, add_special_tokens=False, split_special_tokens=is_content
            ).input_ids
    return tuple(ids)


def _with_special_tokens(tokenizer: Any, ids: tuple[int, ...]) -> tuple[int, ...]:
    """`ids` inside the special tokens (BOS...) the tokenizer adds around any text."""
    bare = list(tokenizer("a", add_special_tokens=False).input_ids)
    full = list(tokenizer("a", add_special_tokens=True).input_ids)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return (*full[:start], *ids, *full[start + len(bare) :])
    return ids


def render_text(tokenizer: Any, text: str) -> Prompt:
    """Raw text, read as written (a completions prompt): special tokens added, control tokens'
    text live."""
    return Prompt(text, _ids(tokenizer, text, special=True))


def _ids(tokenizer: Any, text: str, *, special: bool) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=special).input_ids)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and every end-of-turn marker the vocabulary has, so every backend stops alike."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)
