"""Errors of our own, so every face (CLI, server) can turn bad input into one clear line.

Each message says what is wrong and, where it can, what to do about it; the CLI prints it
without a traceback and exits with code 2, the server answers it as a 4xx.
"""

from __future__ import annotations


class IfsteerError(Exception):
    """Base of every error that is the user's input, not a bug in ifsteer."""


class ModelNotFound(IfsteerError):
    """A model name or path that names nothing loadable offline."""


class UnsupportedArchitecture(IfsteerError):
    """A model whose decoder layers we cannot locate."""


class UnknownInstruction(IfsteerError):
    """An instruction id that is not in the catalogue."""


class VectorMismatch(IfsteerError):
    """A vector that does not fit the model it is applied to (model, hidden size, layer)."""


class MalformedVectorFile(IfsteerError):
    """A file that is not an ifsteer steering vector."""


class InvalidSteering(IfsteerError):
    """A steering request that cannot be applied (mode, weight, positions, batch rows)."""


class EvaluationError(IfsteerError):
    """Evaluation input that cannot be used: a malformed data row, a mismatched resume."""
