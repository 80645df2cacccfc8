"""Chat with any OpenAI-compatible endpoint (OpenRouter, vLLM, a chatforge server).

:class:`RemoteSession` has the interface of :class:`~chatforge.chat.ChatSession`
(``stream``/``send``/``reset``/``system``/``config``/``last``/``conversation``),
so ``chatforge chat --api-base URL`` is the same experience as a local chat::

    chat = RemoteSession("http://127.0.0.1:8000/v1", "smollm2")
    print(chat.send("What is the capital of France?").text)

The endpoint owns the context: the whole conversation is sent each turn.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from chatforge.chat import Reply, SessionBase, model_messages
from chatforge.conversation import Conversation
from chatforge.errors import ChatforgeError
from chatforge.generation.config import GenerationConfig

MAX_REMOTE_STOP = 4  # OpenAI's limit on stop sequences
API_KEY_ENV = "CHATFORGE_API_KEY"
"""The variable a remote chat reads its key from when no flag names one."""
KEY_HELP = f"pass --api-key KEY, --api-key-env NAME, or set {API_KEY_ENV}"


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


class RemoteSession(SessionBase):
    """A multi-turn conversation with a model behind an OpenAI-compatible API."""

    def __init__(
        self,
        api_base: str,
        model: str,
        api_key: str | None = None,
        config: GenerationConfig | None = None,
        system: str | None = None,
        timeout: float = 600.0,
        key_source: str | None = None,
    ) -> None:
        """``key_source`` says where ``api_key`` came from (e.g. ``--api-key``); a 401
        from the endpoint names it, so the user knows which key to fix."""
        try:
            from openai import OpenAI
        except ImportError:
            raise ChatforgeError(
                "chatting with a remote endpoint needs the openai package: "
                "pip install 'chatforge[remote]'"
            ) from None

        self.api_base = api_base
        self.model = model
        self.model_name = model
        self.key_source = key_source if api_key else None
        self.config = config or GenerationConfig.default()  # as ChatSession
        # Local servers need no key, but the client insists on one.
        self.client = OpenAI(
            base_url=api_base, api_key=api_key or "none", timeout=timeout, max_retries=2
        )
        self.conversation = Conversation(system=system)
        self.last: Reply | None = None

    def request_params(self) -> dict[str, Any]:
        """Our generation settings as chat-completion parameters.

        Standard ones go as they are; ``top_k``/``min_p``/``repetition_penalty``
        (understood by chatforge, OpenRouter, vLLM) only when switched on, so a
        strict endpoint is not sent fields it rejects unless the user asked.
        """
        c = self.config
        params: dict[str, Any] = {"temperature": 0.0 if c.greedy else c.temperature}
        if c.top_p != 1.0:
            params["top_p"] = c.top_p
        if c.max_new_tokens is not None:
            params["max_tokens"] = c.max_new_tokens
        if c.stop:
            if len(c.stop) > MAX_REMOTE_STOP:
                raise ChatforgeError(
                    f"remote endpoints take at most {MAX_REMOTE_STOP} stop strings"
                )
            params["stop"] = list(c.stop)
        if c.seed is not None:
            params["seed"] = c.seed
        extra = {}
        if c.top_k:
            extra["top_k"] = c.top_k
        if c.min_p:
            extra["min_p"] = c.min_p
        if c.repetition_penalty != 1.0:
            extra["repetition_penalty"] = c.repetition_penalty
        if extra:
            params["extra_body"] = extra
        return params

    def stream(self, text: str) -> Iterator[str]:
        """Add a user message and yield the reply as it streams in.

        As with a local chat, an interrupted reply (Ctrl-C, or the caller closing
        the iterator) is kept in :attr:`last` with finish reason ``interrupted``
        but not in the conversation, so it is never sent back to the endpoint;
        closing the HTTP stream tells the server to stop generating.
        """
        import openai

        messages = model_messages(self.conversation, text)
        t0 = time.perf_counter()
        try:
            stream = self.client.chat.completions.create(
                model=self.model,
                messages=[m.to_dict() for m in messages],
                stream=True,
                stream_options={"include_usage": True},
                **self.request_params(),
            )
        except openai.APIError as e:
            raise ChatforgeError(self._describe(e)) from None
        self.conversation.add_user(text)
        parts: list[str] = []
        finish: str | None = None
        usage = None
        first: float | None = None
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        if first is None:
                            first = time.perf_counter() - t0
                        parts.append(choice.delta.content)
                        yield choice.delta.content
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except openai.APIError as e:
            finish = finish or "error"
            raise ChatforgeError(self._describe(e)) from None
        finally:
            stream.close()  # frees the server's batch place when we stop early
            reply = "".join(parts)
            finish = finish or "interrupted"
            if finish == "error":  # the exchange failed: take the turn back
                self.conversation.messages.pop()
            elif finish != "interrupted":
                self.conversation.add_assistant(reply)
            self.last = Reply(
                text=reply,
                finish_reason=finish,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
                seconds=time.perf_counter() - t0,
                config=self.config,
                cached_tokens=_cached_tokens(usage),
                first_token_seconds=first,
            )

    def _describe(self, e: Exception) -> str:
        return describe_api_error(e, self.api_base, self.key_source)


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


def _cached_tokens(usage: Any) -> int:
    """Prompt tokens the endpoint served from its cache (0 when it does not say)."""
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    return int(getattr(details, "cached_tokens", 0) or 0)
