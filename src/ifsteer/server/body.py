"""Body bytes to a request model, or an `ApiError` that names the field at fault.

What no schema can check is checked here, before validation: JSON nested past the limit
(validators recurse, so a deep body is a RecursionError), integers past the digits `int()`
reads in time, and lone UTF-16 surrogates no tokenizer reads; pydantic's error locations are
turned into paths into the body.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Limits,
    Message,
    SteeringSpec,
    StreamOptions,
    TextPart,
)

Request = TypeVar("Request", bound=BaseModel)


def parse_request(raw: bytes, schema: type[Request], limits: Limits) -> Request:
    """Body bytes to a request, or an `ApiError` that names the field at fault."""
    if len(raw) > limits.max_body_bytes:
        raise ApiError(
            f"request body is {len(raw)} bytes, the limit is {limits.max_body_bytes}",
            code="request_too_large",
            status=413,
        )
    try:
        data = json.loads(raw, parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"malformed JSON body: {exc}", code="invalid_json") from None
    except RecursionError:
        raise _too_deep(limits) from None
    if not isinstance(data, dict):
        raise ApiError("the JSON body must be an object", code="invalid_json")
    _check_tree(data, limits)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        # A union field reports one error per member; the deepest is the member the input
        # was meant for (a content list whose part is not text, not "should be a string").
        errors = exc.errors(include_url=False)
        paths = [_field_path(data, error["loc"]) for error in errors]
        deepest = max(range(len(errors)), key=lambda i: len(paths[i]))  # the first of equals
        param = ".".join(str(part) for part in paths[deepest]) or None
        message = errors[deepest]["msg"].removeprefix("Value error, ")
        raise ApiError(
            f"{param}: {message}" if param else message, param=param, code="invalid_value"
        ) from None


# JSON integers are read by int(), which refuses (a ValueError, so a 500) past 4,300 digits and
# is quadratic below that; no field of ours needs more than 20 digits, wherever it sits.
MAX_INT_DIGITS = 64


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ApiError(
            f"the body holds an integer of {len(text.lstrip('-'))} digits, the limit is "
            f"{MAX_INT_DIGITS}",
            code="invalid_json",
        )
    return int(text)


def _field_path(data: Any, loc: Sequence[int | str]) -> list[int | str]:
    """pydantic's error location as a path into the body: union members' tags
    (`messages.0.content.str`) are not fields, so they are dropped; a missing field, the last
    part, is kept."""
    path: list[int | str] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, dict) and last and part in _fields():
            pass  # a required field the body lacks
        else:
            continue  # a union member's tag, such as `str` or `list[TextPart]`
        path.append(part)
    return path


def _fields() -> set[str]:
    """Every field name a request can hold (union tags such as `str` are not among them)."""
    models: list[type[BaseModel]] = [
        ChatCompletionRequest,
        CompletionRequest,
        Message,
        TextPart,
        SteeringSpec,
        StreamOptions,
    ]
    return {name for model in models for name in model.model_fields}


def _too_deep(limits: Limits) -> ApiError:
    return ApiError(
        f"the JSON body nests deeper than {limits.max_json_depth} levels", code="invalid_json"
    )


def _check_tree(data: Any, limits: Limits) -> None:
    """Depth and text checks no schema can make: validators recurse (a deep body is a
    RecursionError), and a lone surrogate (`"\\ud800"`) is valid JSON that no tokenizer reads."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        node, depth, where = stack.pop()
        if depth > limits.max_json_depth:
            raise _too_deep(limits)
        if isinstance(node, dict):
            for key, value in node.items():
                _check_text(key, where or None)
                stack.append((value, depth + 1, f"{where}.{key}" if where else key))
        elif isinstance(node, list):
            stack.extend((value, depth + 1, f"{where}.{i}") for i, value in enumerate(node))
        elif isinstance(node, str):
            _check_text(node, where or None)


def _check_text(text: str, param: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = f"{param}: " if param else ""
        raise ApiError(
            f"{where}the text holds a lone UTF-16 surrogate (such as \\ud800), which is not "
            "a character",
            param=param,
            code="invalid_value",
        ) from None


__all__ = ["MAX_INT_DIGITS", "parse_request"]
