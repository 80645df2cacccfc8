"""Prompt templates filled from a record's fields, ``str.format`` style.

``"Order: {foods}. Comment: {comment}."`` takes ``foods`` and ``comment`` from
each record; ``{{`` and ``}}`` are literal braces, and format specs work
(``{price:.2f}``). The template is parsed once, up front, so a syntax error
fails before the model is loaded; a record that lacks a field becomes an
error row naming the field and the fields the record does have.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from chatforge.errors import ChatforgeError


class TemplateError(ValueError):
    """A record could not fill the template (its message is the error row's)."""


class PromptTemplate:
    """A template with named fields; ``None`` text means "the record's prompt or text field"."""

    def __init__(self, text: str | None) -> None:
        self.text = text
        self.fields: tuple[str, ...] = ()
        if text is None:
            return
        names: list[str] = []
        try:
            for _, name, _, _ in string.Formatter().parse(text):
                if name is None:
                    continue
                # "{a.b}" / "{a[0]}" reach into field "a"; only its presence can be checked.
                top = name.split(".", 1)[0].split("[", 1)[0]
                if top == "" or top.isdigit():
                    raise ChatforgeError(
                        f"template fields must be named, like {{text}} (got {{{name}}}); "
                        "write {{ and }} for literal braces"
                    )
                if top not in names:
                    names.append(top)
        except ValueError as e:
            raise ChatforgeError(
                f"bad template {text!r}: {e}; write {{{{ and }}}} for literal braces"
            ) from e
        if not names:
            raise ChatforgeError(
                f"the template {text!r} uses no fields; name one in braces, e.g. {{text}}"
            )
        self.fields = tuple(names)

    @classmethod
    def from_options(cls, template: str | None, template_file: str | None) -> PromptTemplate:
        """The template from ``--template`` or ``--template-file`` (at most one)."""
        if template is not None and template_file is not None:
            raise ChatforgeError("give --template or --template-file, not both")
        if template_file is not None:
            from pathlib import Path

            path = Path(template_file).expanduser()
            if not path.is_file():
                what = "does not exist" if not path.exists() else "is not a file"
                raise ChatforgeError(f"template file {template_file} {what}")
            try:
                template = path.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                raise ChatforgeError(f"cannot read template file {template_file}: {e}") from e
        return cls(template)

    def render(self, fields: Mapping[str, Any]) -> str:
        """The prompt for one record; raises :class:`TemplateError` when it cannot be filled."""
        if self.text is None:
            for name in ("prompt", "text"):
                if name in fields:
                    return str(fields[name])
            raise TemplateError(
                "no --template given and the record has no 'prompt' or 'text' field "
                f"(it has: {_names(fields)}); pass --template, e.g. --template '{{question}}'"
            )
        missing = [f for f in self.fields if f not in fields]
        if missing:
            raise TemplateError(
                f"the template needs field {missing[0]!r}, which the record lacks "
                f"(it has: {_names(fields)})"
            )
        try:
            return self.text.format_map(dict(fields))
        except (KeyError, IndexError, AttributeError, ValueError, TypeError) as e:
            raise TemplateError(f"cannot fill the template: {type(e).__name__}: {e}") from e


def _names(fields: Mapping[str, Any]) -> str:
    return ", ".join(map(str, fields)) or "no fields"
