"""What chatforge sends to an OpenAI-compatible endpoint (a chatforge server, vLLM,
llama.cpp's server, OpenRouter, OpenAI): the one mapping from a
:class:`~chatforge.generation.config.GenerationConfig` to request fields, the settings
a remote run starts from, the API key, the client and one-line errors.
``chatforge chat --api-base`` (:class:`~chatforge.remote.RemoteSession`) and
``generate --api-base`` (:func:`~chatforge.batch.remote.generate_batch_remote`) both
use it, so the same settings are the same request.

**The rule for extras.** OpenAI's own fields (``temperature``, ``top_p``,
``max_tokens``, ``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty``,
``logit_bias``, ``response_format``) carry what they can. The settings OpenAI has no
field for, :data:`EXTRAS` (``top_k``, ``min_p``, ``repetition_penalty``,
``no_repeat_ngram_size``, ``slide``, ``keep``), are sent as top-level fields of the same
name, and only when switched on (not at their off value): chatforge's server honours
them all; vLLM and OpenRouter the first three; llama.cpp's server ``top_k`` and
``min_p``. An endpoint
that rejects a field it does not know (OpenAI) answers 400 naming it, and the user sees
that one line. A setting no request can express (``max_length``, which counts the
prompt's tokens: only the endpoint knows them) is an error naming it. Nothing set is
dropped in silence; ``top_p``/``top_k``/``min_p`` are left out of a greedy request
only, where they cannot change a token.

With no preset named, a remote run starts from the default preset's values that every
endpoint takes (:func:`remote_config`: its temperature and top-p), so a plain
``--api-base`` works against a strict endpoint; flags, ``/set`` and a preset named
(``--preset balanced``) switch extras on.

This module is a leaf: it imports nothing from the remote chat or batch modules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from chatforge.errors import ChatforgeError, InputError, ParamError
from chatforge.generation.config import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PRESET,
    PRESETS,
    GenerationConfig,
)

Endpoint = Literal["chat", "completions"]
"""Which request the fields are for: ``/v1/chat/completions`` or ``/v1/completions``."""

MAX_REMOTE_STOP = 4
"""OpenAI's limit on stop sequences."""

STANDARD = frozenset(
    {
        "temperature",
        "do_sample",  # greedy is sent as temperature 0
        "top_p",
        "max_new_tokens",  # as max_tokens
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "json_schema",  # as response_format
    }
)
"""GenerationConfig settings OpenAI's own request fields carry."""

EXTRAS: dict[str, Any] = {
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "slide": False,
    "keep": None,
}
"""Settings sent as top-level fields of the same name, which OpenAI lacks (vLLM,
OpenRouter, llama.cpp's server and chatforge's take some or all), and the value at
which each is off: only a setting switched on is sent."""

UNSENDABLE = frozenset({"max_length"})
"""Settings no request field can express: switched on, they are an error."""

_GREEDY_IDLE = frozenset({"top_p", "top_k", "min_p"})
"""Filters that cannot change a greedy reply (left out of a greedy request)."""

API_KEY_ENV = "CHATFORGE_API_KEY"
"""The variable a remote chat reads its key from when no flag names one."""
KEY_HELP = f"pass --api-key KEY, --api-key-env NAME, or set {API_KEY_ENV}"


# ------------------------------------------------------------------ request fields


def request_params(config: GenerationConfig, *, endpoint: Endpoint = "chat") -> dict[str, Any]:
    """``config`` as the JSON fields of an ``endpoint`` request (no model, messages or
    prompt). The one mapping; see the module's rule for extras.

    Greedy (temperature 0, or ``do_sample=False``) is ``temperature: 0``; the reply
    length is ``max_tokens`` (:data:`DEFAULT_MAX_NEW_TOKENS` when unset, as locally);
    ``logit_bias`` keys are strings, as OpenAI wants; ``json_schema`` is a strict
    ``response_format`` of type ``json_schema``, on ``completions`` too (chatforge and
    vLLM take it there). Raises :class:`ParamError` naming a setting no request can
    express (``max_length``) or more than :data:`MAX_REMOTE_STOP` stop strings.

    Pass the result as the openai client's ``extra_body=`` (it sends every field as it
    is) or as a raw JSON body.
    """
    if endpoint not in ("chat", "completions"):
        raise ValueError(f"endpoint must be 'chat' or 'completions' (got {endpoint!r})")
    if config.max_length is not None:
        raise ParamError(
            "max_length",
            f"cannot be sent to an OpenAI-compatible endpoint (got {config.max_length}): it "
            "counts the prompt's tokens, which only the endpoint knows; use max_new_tokens "
            "(--max-new-tokens), or run the model locally (without --api-base)",
        )
    greedy = config.greedy
    params: dict[str, Any] = {
        "temperature": 0.0 if greedy else config.temperature,
        "max_tokens": config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
    }
    if config.top_p != 1.0 and not greedy:
        params["top_p"] = config.top_p
    if config.stop:
        if len(config.stop) > MAX_REMOTE_STOP:
            raise ParamError(
                "stop",
                f"takes at most {MAX_REMOTE_STOP} strings with an OpenAI-compatible endpoint "
                f"(got {len(config.stop)})",
            )
        params["stop"] = list(config.stop)
    if config.seed is not None:
        params["seed"] = config.seed
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(config, name):
            params[name] = getattr(config, name)
    if config.logit_bias:
        params["logit_bias"] = {str(k): v for k, v in config.logit_bias.items()}
    if config.json_schema is not None:
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": config.json_schema, "strict": True},
        }
    for name, off in EXTRAS.items():
        value = getattr(config, name)
        if value != off and not (greedy and name in _GREEDY_IDLE):
            params[name] = value
    return params


def remote_config(preset: str | None = None, **given: Any) -> GenerationConfig:
    """The settings a remote run starts from: ``given`` (``None`` values ignored) over a
    preset. A ``preset`` named is applied whole, extras included (as
    :meth:`GenerationConfig.from_preset`); with none, the default preset
    (:data:`DEFAULT_PRESET`) contributes only what every endpoint takes (its temperature
    and top-p), so a plain ``--api-base`` works against a strict endpoint.
    """
    if preset is not None:
        return GenerationConfig.from_preset(preset, **given)
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(GenerationConfig.param_names()))
    if unknown:
        raise InputError(f"unknown generation parameter {unknown[0]!r}")
    base = {k: v for k, v in PRESETS[DEFAULT_PRESET].items() if k in STANDARD}
    return GenerationConfig(**{**base, **given})


# ------------------------------------------------------------------ key, client, errors


def resolve_api_key(
    api_key: str | None = None,
    api_key_env: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str | None, str | None]:
    """The key for a remote endpoint and where it came from, for error messages.

    Precedence: ``api_key`` (``--api-key``), then the variable named by
    ``api_key_env`` (``--api-key-env``, which must then be set), then
    :data:`API_KEY_ENV`, then ``OPENAI_API_KEY``. Returns ``(None, None)`` when
    there is no key (a local server needs none).
    """
    env = os.environ if environ is None else environ
    if api_key:
        return api_key, "--api-key"
    if api_key_env:
        key = env.get(api_key_env)
        if not key:  # named explicitly, so it must be set
            raise ChatforgeError(f"the environment variable {api_key_env} is not set")
        return key, f"${api_key_env} (--api-key-env)"
    for name in (API_KEY_ENV, "OPENAI_API_KEY"):
        if env.get(name):
            return env[name], f"${name}"
    return None, None


def openai_client(
    api_base: str,
    api_key: str | None = None,
    *,
    timeout: float = 600.0,
    max_retries: int = 2,
) -> Any:
    """An ``openai.OpenAI`` client for ``api_base``; one serves every thread (its
    connection pool is shared and thread-safe). A :class:`ChatforgeError` says how to
    install the package when it is missing."""
    try:
        from openai import OpenAI
    except ImportError:
        raise ChatforgeError(
            "talking to an OpenAI-compatible endpoint (--api-base) needs the openai "
            "package: pip install 'chatforge[remote]'"
        ) from None
    # A local server needs no key, but the client insists on one.
    return OpenAI(
        base_url=api_base, api_key=api_key or "none", timeout=timeout, max_retries=max_retries
    )


def describe_api_error(e: Exception, api_base: str, key_source: str | None = None) -> str:
    """One line saying what went wrong talking to ``api_base`` (an ``openai`` error);
    a 401 says where the key came from (``key_source``) and how to give another."""
    import openai

    if isinstance(e, openai.APIStatusError):
        message = e.message
        body = e.body if isinstance(e.body, dict) else {}
        inner = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(inner, dict) and inner.get("message"):
            message = inner["message"]
        text = f"{api_base} answered {e.status_code}: {message}"
        if e.status_code == 401:
            text += _key_hint(key_source)
        return text
    if isinstance(e, openai.APIConnectionError):
        return f"cannot reach {api_base}: {e.__cause__ or e}"
    return f"{api_base}: {e}"


def _key_hint(key_source: str | None) -> str:
    """Where the rejected key came from, and how to give another."""
    if key_source is None:
        return f"; no API key was given: {KEY_HELP}"
    return f"; the API key came from {key_source}: check it, or {KEY_HELP}"


__all__ = [
    "API_KEY_ENV",
    "EXTRAS",
    "KEY_HELP",
    "MAX_REMOTE_STOP",
    "STANDARD",
    "UNSENDABLE",
    "describe_api_error",
    "openai_client",
    "remote_config",
    "request_params",
    "resolve_api_key",
]
