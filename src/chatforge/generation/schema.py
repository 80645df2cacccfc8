"""Grammars as text: a JSON Schema or a Lark grammar turned into llguidance's grammar and
checked, with no torch (a :class:`~chatforge.generation.config.GenerationConfig` checks
its ``json_schema`` here when it is built). :mod:`~chatforge.generation.grammar` turns
a grammar into token masks.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from chatforge.errors import ParamError

JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
"""How constrained JSON is spelled (llguidance ``JsonCompileOptions``)."""

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
"""The schema of OpenAI's ``response_format: {"type": "json_object"}``."""


def llguidance_module() -> Any:
    """The llguidance module (imported when first needed)."""
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError(
            "structured output needs the llguidance package: pip install llguidance"
        ) from e
    return llguidance


def json_schema_grammar(schema: dict[str, Any], *, lenient: bool = False) -> str:
    """The llguidance grammar of replies matching ``schema``; a ParamError naming
    ``json_schema`` when the schema is not one we can enforce.

    ``lenient``: ignore keywords llguidance does not implement (OpenAI's
    non-strict mode) instead of failing on them.
    """
    if not isinstance(schema, dict):
        raise ParamError("json_schema", f"must be a JSON object (got {type(schema).__name__})")
    try:
        key = json.dumps(close_objects(schema))  # not sorted: property order is generation order
    except (TypeError, ValueError) as e:
        raise ParamError("json_schema", f"is not JSON: {e}") from None
    return _schema_grammar(key, lenient)


# Keywords whose value is a subschema or a list of them, or a name -> subschema map.
_SUB = (
    "items", "additionalItems", "prefixItems", "contains", "not", "if", "then", "else",
    "propertyNames", "additionalProperties", "anyOf", "oneOf",
)  # fmt: skip
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OPEN = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def close_objects(schema: Any, close: bool = True) -> Any:
    """``schema`` (a copy) with every object that lists ``properties`` and says nothing
    about others given ``additionalProperties: false``.

    JSON Schema lets such an object hold any other key too, and a constrained small model
    then invents keys (``{"name": ..., "ݴtheҸ°t": ""}`` from ``llm --schema "name, age
    int"``). What a caller means by listing the properties is those properties, as vLLM's
    grammar backend (xgrammar's strict mode) and outlines read it; a schema that wants
    more says so (``additionalProperties: true`` or a schema). The members of an
    ``allOf`` are left open: each lists only part of the object's keys."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUB:  # a bool or other non-schema value comes back as it is
        if key in out:
            out[key] = close_objects(out[key])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(s, close=False) for s in out["allOf"]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(s) for name, s in out[key].items()}
    if (
        close
        and isinstance(out.get("properties"), dict)
        and _may_be_object(out.get("type", "object"))
        and not any(key in out for key in _OPEN)
    ):
        out["additionalProperties"] = False
    return out


def _may_be_object(kind: Any) -> bool:
    return kind == "object" or (isinstance(kind, list) and "object" in kind)


@functools.lru_cache(maxsize=256)
def _schema_grammar(schema: str, lenient: bool) -> str:
    # Compiled once per schema: a config is validated where it is built and again
    # when its request is added, and a batch file repeats one schema on every row.
    llg = llguidance_module()
    overrides = {"lenient": True} if lenient else None
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(
            schema, defaults=JSON_OPTIONS, overrides=overrides
        )
    except (ValueError, TypeError) as e:
        raise ParamError("json_schema", f"is not a valid JSON Schema: {e}") from None
    check_grammar(grammar, "json_schema")
    return grammar


def lark_grammar(text: str, *, name: str = "grammar") -> str:
    """The llguidance grammar of a Lark grammar (llguidance's dialect: ``%json{...}``
    embeds a JSON Schema); a ParamError naming ``name`` when it is invalid."""
    grammar = llguidance_module().LLMatcher.grammar_from_lark(text)
    check_grammar(grammar, name)
    return grammar


def check_grammar(grammar: str, name: str) -> None:
    error = llguidance_module().LLMatcher.validate_grammar(grammar)
    if error:
        raise ParamError(name, f"cannot be enforced: {error}")
