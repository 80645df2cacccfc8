"""Prompt templates filled from a record's fields.

``"Order: {foods}. Comment: {comment}."`` takes ``foods`` and ``comment`` from
each record; ``{{`` and ``}}`` are literal braces. A placeholder is a plain
field name and nothing else: each is replaced by the field's value as text
(``str(value)``). Attribute or index access (``{a.b}``, ``{a[0]}``),
conversions (``{a!r}``) and format specs (``{price:.2f}``) are refused when the
template is read, naming the placeholder: ``str.format`` would evaluate them
on the record's values (``{foods.__class__}`` gives ``<class 'str'>``), a
format spec fails on a CSV value (always text) where it works on a JSON
number, and a spec such as ``{a:>{width}}`` takes its size from the data.
Format values before they go into the input file instead.

The template is parsed once, up front, so a syntax error fails before the
model is loaded; a record that lacks a field becomes an error row naming the
field and the fields the record does have.
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
        # The template as (literal text, field name or None) pieces, braces unescaped.
        self._pieces: list[tuple[str, str | None]] = []
        if text is None:
            return
        names: list[str] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise ChatforgeError(
                f"bad template {text!r}: {e}; write {{{{ and }}}} for literal braces"
            ) from e
        for literal, name, spec, conversion in parsed:
            if name is None:
                self._pieces.append((literal, None))
                continue
            placeholder = _placeholder(name, spec, conversion)
            if name == "" or name.isdigit():
                raise ChatforgeError(
                    f"template fields must be named, like {{text}} (got {placeholder}); "
                    "write {{ and }} for literal braces"
                )
            why = _not_plain(name, spec, conversion)
            if why:
                raise ChatforgeError(
                    f"template placeholder {placeholder} is not a plain field name: {why} "
                    "(a template takes {field} names only)"
                )
            self._pieces.append((literal, name))
            if name not in names:
                names.append(name)
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
        # Values are inserted as text, never formatted: nothing in a placeholder is evaluated.
        return "".join(
            literal if name is None else literal + str(fields[name])
            for literal, name in self._pieces
        )


def _placeholder(name: str, spec: str | None, conversion: str | None) -> str:
    """A placeholder as it was written (for messages)."""
    text = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
    return "{" + text + "}"


def _not_plain(name: str, spec: str | None, conversion: str | None) -> str | None:
    """Why a placeholder is more than a field name, or None when it is just one."""
    if "." in name or "[" in name:
        return "attribute and index access are not allowed"
    if conversion:
        return f"conversions like !{conversion} are not allowed"
    if spec:
        return f"format specs like :{spec} are not allowed; format the value in the input file"
    return None


def _names(fields: Mapping[str, Any]) -> str:
    return ", ".join(map(str, fields)) or "no fields"
