"""Chat with any OpenAI-compatible endpoint (OpenRouter, vLLM, a chatforge server).

:class:`RemoteSession` has the interface of :class:`~chatforge.chat.ChatSession`
(``stream``/``send``/``reset``/``system``/``config``/``last``/``conversation``),
so ``chatforge chat --api-base URL`` is the same experience as a local chat::

    chat = RemoteSession("http://127.0.0.1:8000/v1", "smollm2")
    print(chat.send("What is the capital of France?").text)

The endpoint owns the context: the whole conversation is sent each turn. The request
fields, the client, the key and the error lines come from :mod:`chatforge.openai_api`
(its ``resolve_api_key``, ``describe_api_error`` and constants are re-exported here).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from chatforge.chat import Reply, SessionBase, model_messages
from chatforge.conversation import Conversation
from chatforge.errors import ChatforgeError
from chatforge.generation.config import GenerationConfig
from chatforge.openai_api import (
    API_KEY_ENV,
    KEY_HELP,
    MAX_REMOTE_STOP,
    describe_api_error,
    openai_client,
    remote_config,
    request_params,
    resolve_api_key,
)


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
        from the endpoint names it, so the user knows which key to fix. ``config``
        defaults to :func:`~chatforge.openai_api.remote_config` (what every endpoint
        takes of the default preset); a setting no request can carry (``max_length``)
        is refused here, and when :attr:`config` is set later."""
        self.api_base = api_base
        self.model = model
        self.model_name = model
        self.key_source = key_source if api_key else None
        self.config = config or remote_config()
        self.client = openai_client(api_base, api_key, timeout=timeout)
        self.conversation = Conversation(system=system)
        self.last: Reply | None = None

    @property
    def config(self) -> GenerationConfig:
        """The generation settings; setting them checks that a request can carry them."""
        return self._config

    @config.setter
    def config(self, config: GenerationConfig) -> None:
        request_params(config)  # a ParamError names what cannot be sent
        self._config = config

    def request_params(self) -> dict[str, Any]:
        """:attr:`config` as chat-completion fields
        (:func:`~chatforge.openai_api.request_params`: extras only when switched on)."""
        return request_params(self.config, endpoint="chat")

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
                extra_body=self.request_params(),  # sent as they are, extras included
            )
        except openai.APIError as e:
            raise ChatforgeError(self._describe(e)) from None
        self.conversation.add_user(text)
        parts: list[str] = []
        finish: str | None = None
        usage = None
        first: float | None = None
        slid = 0  # a chatforge server's extra on the last chunk (the slide extra)
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
                        slid = int((choice.model_extra or {}).get("slid_tokens") or 0)
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
                slid_tokens=slid,
            )

    def _describe(self, e: Exception) -> str:
        return describe_api_error(e, self.api_base, self.key_source)


def _cached_tokens(usage: Any) -> int:
    """Prompt tokens the endpoint served from its cache (0 when it does not say)."""
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    return int(getattr(details, "cached_tokens", 0) or 0)


__all__ = [
    "API_KEY_ENV",
    "KEY_HELP",
    "MAX_REMOTE_STOP",
    "RemoteSession",
    "describe_api_error",
    "resolve_api_key",
]
