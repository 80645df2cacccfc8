"""Errors a user can act on.

Every error that is the user's to fix (a bad flag value, a missing file, a
prompt too long for the context) is a :class:`ChatforgeError`; the CLI prints
its message on one line and exits non-zero, with no traceback. Any other
exception escaping a command is a bug, and is shown as one.

Bad values are :class:`InputError`\\ s (also ``ValueError``\\ s, so library code
that catches ``ValueError`` keeps working); a bad value of one named setting is
a :class:`ParamError`, which carries the setting's name apart from the message
so each front end can name it as its users spell it: ``--top-p`` on the command
line, ``top_p`` in a request body, ``max_tokens`` for ``max_new_tokens``.
"""

from __future__ import annotations


class ChatforgeError(Exception):
    """An error caused by input the user can fix; the message says how."""


class InputError(ChatforgeError, ValueError):
    """A value the user gave (data, a request, a prompt) that cannot be used."""


class ParamError(InputError):
    """A bad value of the setting ``param`` (a config field such as ``top_p``).

    ``message`` is what follows the setting's name: ``ParamError("top_p", "must be
    in (0, 1] (got 2.0)")`` reads "top_p must be in (0, 1] (got 2.0)" as ``str()``,
    and ``--top-p must be ...`` once :meth:`render`\\ ed with the flag's name.
    A message that starts with ``:`` or ``[`` is attached to the name without a space.
    """

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        self.message = message
        super().__init__(self.render(param))

    def render(self, name: str) -> str:
        """The message with the setting called ``name``."""
        sep = "" if self.message[:1] in (":", "[", ",") else " "
        return f"{name}{sep}{self.message}"

    def __reduce__(self) -> tuple[type[ParamError], tuple[str, str]]:
        return (type(self), (self.param, self.message))


class ModelLoadError(ChatforgeError):
    """A model reference could not be resolved or loaded."""


class ContextOverflowError(ChatforgeError, ValueError):
    """A prompt does not fit in the model's context (or in ``max_length``)."""

    def __init__(self, message: str, prompt_tokens: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.limit = limit
