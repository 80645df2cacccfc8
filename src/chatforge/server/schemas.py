"""Request bodies of the OpenAI-compatible API, validated strictly.

Types are strict (``"0.5"`` is not a number, as with OpenAI) and unknown
fields are ignored (clients send fields we do not use, such as ``user``).
:func:`generation_config` turns a request into our validated
:class:`~chatforge.generation.config.GenerationConfig`; every failure is an
:class:`~chatforge.server.errors.APIError` 400 that names the ``param``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from chatforge.errors import ParamError
from chatforge.generation.config import GenerationConfig
from chatforge.server.errors import APIError, from_validation_errors
from chatforge.server.guard import find_lone_surrogate

MAX_STOP = 16
"""Most stop sequences per request (OpenAI allows 4, but lm-eval adds the EOS text to a
task's own four)."""


@dataclass
class Limits:
    """What one request may ask of the server."""

    max_tokens: int = 2048
    """Largest ``max_tokens``; also the reply budget when a request gives none (capped by
    the context)."""
    max_n: int = 8
    """Largest ``n`` (choices per prompt)."""
    max_body_bytes: int = 1 << 20
    """Largest request body; larger ones get 413."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Body(_Strict):
    """A top-level request body: an unknown field is a 400 naming it (as OpenAI answers),
    except those in :attr:`ignored`, which OpenAI accepts and which do not change what
    the reply is (bookkeeping such as ``user`` or ``metadata``)."""

    ignored: ClassVar[frozenset[str]] = frozenset(
        {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
    )

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields) | cls.ignored
            unknown = [k for k in data if k not in known]
            if unknown:
                raise APIError(
                    400,
                    f"unrecognized request argument supplied: {unknown[0]} (chatforge does not "
                    "implement it; remove it from the request)",
                    param=unknown[0],
                )
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        # An image or audio part sent to a text model must not be dropped in silence.
        parts = data.get("content") if isinstance(data, dict) else None
        if isinstance(parts, list):
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in (None, "text"):
                    raise APIError(
                        400,
                        f"content parts of type {kind!r} are not supported: this is a text "
                        "model; send text parts only",
                        param="messages",
                    )
        return data

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def chat_role(self) -> str:
        # "developer" is OpenAI's newer name for the system role.
        return "system" if self.role == "developer" else self.role


class JsonSchemaFormat(_Strict):
    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: free text, any JSON object, or a JSON Schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: dict[str, str]


class _Sampling(_Body):
    """Fields both endpoints share."""

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # chatforge extras (the first three also accepted by OpenRouter and vLLM); the
    # names chatforge.openai_api.EXTRAS sends
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    slide: bool | None = None  # generate past the context (GenerationConfig.slide)
    keep: int | None = None  # the head a sliding reply keeps (GenerationConfig.keep)
    response_format: ResponseFormat | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text"]] | None = None  # ["text"] is all a text model gives


class CompletionRequest(_Sampling):
    # A string, strings, token ids, or lists of token ids (what lm-eval sends).
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int | None = 16  # OpenAI's default for /v1/completions
    best_of: int | None = None  # only best_of == n (no server-side ranking)


class TokenizeRequest(_Body):
    """vLLM's ``/tokenize``: a prompt, or chat messages rendered with the model's format."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    tools: list[ToolDef] | None = None  # described in the system prompt, as chat does
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class AdapterRequest(_Body):
    """``POST /v1/adapters``: serve a LoRA adapter directory as model ``name``."""

    name: str
    path: str
    base: str | None = None  # the model it applies to (default: the server's first)


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


MAX_COMPLETION_LOGPROBS = 5
"""Most alternatives ``/v1/completions`` returns per token (OpenAI's limit)."""
MAX_CHAT_LOGPROBS = 20
"""Most alternatives ``/v1/chat/completions`` returns per token (OpenAI's limit)."""


def _check_range(name: str, value: int | None, most: int) -> None:
    if value is not None and not 0 <= value <= most:
        raise APIError(400, f"{name} must be between 0 and {most} (got {value})", param=name)


def logprob_settings(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many alternatives per token the request wants (None: no logprobs); 400 if invalid."""
    if isinstance(req, CompletionRequest):
        _check_range("logprobs", req.logprobs, MAX_COMPLETION_LOGPROBS)
        return req.logprobs
    top = req.top_logprobs
    _check_range("top_logprobs", top, MAX_CHAT_LOGPROBS)
    if not req.logprobs:
        if top:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate ``data`` (decoded JSON) as ``model``; a 400 naming the param on failure."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    bad = find_lone_surrogate(data)  # the tokenizer cannot encode one
    if bad is not None:
        param, char = bad
        raise APIError(
            400,
            f"invalid value for {param!r}: a lone surrogate ({char}) is not valid Unicode",
            param=param,
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_errors(list(e.errors())) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


# Request fields named otherwise than the GenerationConfig settings they set.
_API_NAMES = {"max_new_tokens": "max_tokens", "json_schema": "response_format"}


def api_name(param: str, max_tokens_field: str = "max_tokens") -> str:
    """The request field that sets the GenerationConfig setting ``param``.

    ``max_tokens_field`` is the field the request gave its reply length in
    (``max_completion_tokens`` is the chat endpoint's newer name for it).
    """
    name = _API_NAMES.get(param, param)
    return max_tokens_field if name == "max_tokens" else name


def param_error(e: ParamError, max_tokens_field: str = "max_tokens") -> APIError:
    """A 400 for ``e``, its message and ``param`` naming the request field."""
    name = api_name(e.param, max_tokens_field)
    return APIError(400, e.render(name), param=name)


def response_schema(req: _Sampling) -> dict[str, Any] | None:
    """The JSON Schema ``response_format`` asks replies to follow (None: free text).

    A non-strict schema is enforced too, but keywords the grammar engine does not
    implement are then skipped (``lenient``) rather than refused.
    """
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"type": "object"}
    if rf.json_schema is None:
        raise APIError(
            400, "response_format of type json_schema needs json_schema", param="response_format"
        )
    schema = dict(rf.json_schema.schema_ or {})
    if not rf.json_schema.strict:
        schema["x-guidance"] = {**schema.get("x-guidance", {}), "lenient": True}
    return schema


# Settings a named model's defaults fill in where a request leaves them out.
DEFAULTABLE = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "seed",
    "max_new_tokens",
)


def generation_config(
    req: _Sampling, limits: Limits, defaults: GenerationConfig | None = None
) -> GenerationConfig:
    """The request's sampling settings as a GenerationConfig; 400 naming the param if invalid.

    ``defaults`` (a named model's settings) fill the :data:`DEFAULTABLE` fields the
    request does not set; without them, OpenAI's defaults apply."""
    max_tokens = req.max_tokens
    param = "max_tokens"
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    score_only = isinstance(req, CompletionRequest) and req.echo and max_tokens == 0
    if score_only:
        max_tokens = 1  # the config needs a reply length; the request generates nothing
    if max_tokens is not None and max_tokens < 1:
        hint = " (0 is allowed together with echo, to score the prompt)" if max_tokens == 0 else ""
        raise APIError(400, f"{param} must be >= 1 (got {max_tokens}){hint}", param=param)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(
            400, f"{param} must be <= {limits.max_tokens} (got {max_tokens})", param=param
        )
    if isinstance(req, CompletionRequest) and req.best_of not in (None, req.n):
        raise APIError(
            400,
            f"best_of must equal n (got best_of={req.best_of}, n={req.n}): chatforge does not "
            "rank extra samples; ask for n choices and pick yourself",
            param="best_of",
        )
    if not 1 <= req.n <= limits.max_n:
        raise APIError(400, f"n must be between 1 and {limits.max_n} (got {req.n})", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop sequences (got {len(stop)})", param="stop")

    values: dict[str, Any] = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "no_repeat_ngram_size": req.no_repeat_ngram_size,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "logit_bias": req.logit_bias,
        "stop": tuple(stop),
        "seed": req.seed,
        "json_schema": response_schema(req),
        "slide": req.slide,
        "keep": req.keep,
        # No max_tokens: the server's limit, capped by the context at submit time.
        "max_new_tokens": max_tokens,
    }
    if defaults is not None:
        for name in DEFAULTABLE:
            if values[name] in (None, ()):
                values[name] = getattr(defaults, name)
        if values["max_new_tokens"] is not None:  # the server's limit still holds
            values["max_new_tokens"] = min(values["max_new_tokens"], limits.max_tokens)
    if values["temperature"] is None:
        values["temperature"] = 1.0  # OpenAI's default
    if values["max_new_tokens"] is None:
        values["max_new_tokens"] = limits.max_tokens
    try:
        return GenerationConfig(**{k: v for k, v in values.items() if v is not None})
    except ParamError as e:
        raise param_error(e, param) from None
    except ValueError as e:  # pragma: no cover - GenerationConfig raises ParamErrors
        raise APIError(400, str(e)) from None
