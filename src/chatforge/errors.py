"""Errors a user can act on.

Every error that is the user's to fix (a bad flag value, a missing file, a
prompt too long for the context) is a :class:`ChatforgeError`; the CLI prints
its message on one line and exits non-zero, with no traceback.
"""

from __future__ import annotations


class ChatforgeError(Exception):
    """An error caused by input the user can fix; the message says how."""


class ModelLoadError(ChatforgeError):
    """A model reference could not be resolved or loaded."""


class ContextOverflowError(ChatforgeError, ValueError):
    """A prompt does not fit in the model's context (or in ``max_length``)."""

    def __init__(self, message: str, prompt_tokens: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.limit = limit
