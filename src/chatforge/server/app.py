"""The OpenAI-compatible HTTP API over an :class:`EngineService`.

``create_app(loaded_or_loader)`` builds a FastAPI app. The model loads in a
background thread at startup, so ``/health`` answers 503 while loading and
200 once ready. Every request is rendered to prompt tokens here and submitted
to one shared :class:`~chatforge.generation.service.EngineService`: requests
arriving while others decode join the running batch at the next step, and a
client that goes away (mid-stream or while waiting) is cancelled, freeing its
place in the batch.

Run it with ``chatforge serve`` or any ASGI server::

    app = create_app(lambda: load_model("smollm2"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from chatforge.errors import ChatforgeError, ContextOverflowError, ParamError
from chatforge.generation.config import GenerationConfig
from chatforge.generation.engine import Engine, EngineConfig
from chatforge.generation.plan import plan_request
from chatforge.generation.service import EngineService, Handle, QueueFullError
from chatforge.generation.types import Completion
from chatforge.generation.types import Request as EngineRequest
from chatforge.server import errors
from chatforge.server.errors import APIError
from chatforge.server.guard import HostGuard, check_json_content_type
from chatforge.server.logprobs import chat_logprobs, legacy_logprobs
from chatforge.server.metrics import register_metrics
from chatforge.server.page import render_page
from chatforge.server.pool import Base, ModelPool, Route, Target
from chatforge.server.schemas import (
    AdapterRequest,
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    DetokenizeRequest,
    Limits,
    TokenizeRequest,
    generation_config,
    logprob_settings,
    param_error,
    parse,
)
from chatforge.server.tools import (
    CallStream,
    check_call_budget,
    encode_with_template,
    plan_tools,
    render_messages,
    split_reply,
)

log = logging.getLogger("chatforge.server")

# Routes anyone may fetch without the API key: the health probe, and the static
# chat page (a browser cannot send a bearer token when it navigates; the page
# asks for the key and sends it with its API calls).
_PUBLIC = frozenset({"/health", "/", "/favicon.ico"})
_DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    """What the routes share: the models (a :class:`ModelPool`) and the lifecycle.

    ``model_id``, ``loaded``, ``service``, ``status`` and ``error`` are those of the
    default model (the first ``--model``), as a one-model server has them.
    """

    pool: ModelPool
    draining: bool = False
    """Set on shutdown (SIGTERM): in-flight requests finish, new ones get 503."""
    created: int = field(default_factory=lambda: int(time.time()))
    """Unix time the server started (the models' ``created``)."""
    started: bool = False
    """Set once the start-up loads have been tried."""

    @property
    def model_id(self) -> str:
        """The id of the default model (what clients pass as ``model``)."""
        return self.pool.default.name

    @property
    def _base(self) -> Base:
        return self.pool.base_of(self.pool.default)

    @property
    def loaded(self) -> Any:
        """The default model's LoadedModel, once loaded."""
        return self._base.loaded

    @property
    def service(self) -> EngineService | None:
        """The default model's continuous-batching engine, once loaded."""
        return self._base.service

    @property
    def status(self) -> str:
        """The default model's: ``loading`` -> ``ready``; ``error`` if loading failed.
        A model unloaded after ``ttl`` is ``ready``: the next request loads it."""
        status = self._base.status
        if status in ("unloaded", "loading"):
            return "ready" if self.started and self._base.nbytes else "loading"
        return status

    @property
    def error(self) -> str | None:
        """Why the default model failed to load."""
        return self._base.error


@dataclass
class ServedModel:
    """One model a server serves (``chatforge serve --model``).

    ``load``: a LoadedModel, or a callable returning one (run on a worker thread).
    Models with the same ``base`` key share one loaded base; ``adapter_dir``: a LoRA
    adapter applied per request on it. ``system`` and ``defaults`` (a named model's):
    the system prompt and generation settings used where a request gives none.
    ``aliases``: other names that reach it; ``own_names``: also accept the loaded
    model's own name and reference (and a bundled model's hub id).
    """

    name: str | None
    load: Any
    base: str | None = None
    adapter_dir: Path | None = None
    system: str | None = None
    defaults: GenerationConfig | None = None
    aliases: Iterable[str] = ()
    own_names: bool = True
    listed_names: Iterable[str] = ()


def create_app(
    loaded_or_loader: Any = None,
    *,
    models: Iterable[ServedModel] = (),
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 32,
    threads: int | None = None,
    limits: Limits | None = None,
    model_id: str | None = None,
    retry_after: int = 1,
    on_load_error: Callable[[BaseException], None] | None = None,
    drain_timeout: float = 60.0,
    allowed_hosts: Iterable[str] = (),
    cors_origins: Iterable[str] | None = None,
    body_timeout: float = 30.0,
    served_model_names: Iterable[str] = (),
    ttl: float | None = None,
    max_memory_mb: float | None = None,
) -> FastAPI:
    """An app serving ``loaded_or_loader`` (a LoadedModel, or a callable returning one),
    or several ``models`` (:class:`ServedModel`; the first is the default).

    ``api_key``: when set, every route but ``/health`` (and the static page) needs
    ``Authorization: Bearer <key>``. ``max_queue``: requests waiting for a batch
    place beyond which new ones get 429. ``max_batch``: sequences decoded together.
    ``threads``: CPU threads for the forward pass (None: the cores other processes
    leave free, see :class:`~chatforge.threads.ThreadPolicy`).
    ``limits``: per-request limits (``max_tokens``, ``n``, body size).
    ``on_load_error`` is called when a model fails to load at start.
    ``allowed_hosts``: ``Host`` names served besides localhost, 127.0.0.1, [::1] and
    the address a connection came in on (``"*"``: any); others get 403, which stops
    DNS rebinding (see :mod:`chatforge.server.guard`). ``cors_origins``: browser
    origins allowed to call the API cross-origin (none by default). ``body_timeout``:
    seconds a client has to send its whole request body before it gets 408.
    ``ttl``: seconds a model may sit idle before it is unloaded (the next request
    for it loads it again); ``max_memory_mb``: the budget for loaded models' weights
    (idle ones are unloaded, least recently used first, to stay within it).
    """
    limits = limits or Limits()
    specs = list(models)
    if loaded_or_loader is not None:
        served = list(served_model_names)
        name = served[0] if served else model_id
        if name is None and not callable(loaded_or_loader):
            name = loaded_or_loader.info.ref or loaded_or_loader.info.name
        aliases = [*served[1:], *([model_id] if served and model_id else [])]
        specs.insert(
            0, ServedModel(name, loaded_or_loader, aliases=aliases, listed_names=served[1:])
        )

    def make_service(base: Base, loaded: Any) -> EngineService:
        # The server's own engine (its --max-batch and --threads), and the model's shared
        # one from now on: whatever else uses this model shares its prefix cache.
        engine = Engine.from_loaded(loaded, EngineConfig(max_batch=max_batch, threads=threads))
        loaded._engine = engine
        _own_names(pool, base, loaded)
        return EngineService(
            engine, max_batch=max_batch, max_queue=max_queue, observers=[metrics.observe]
        )

    pool = _build_pool(specs, ttl, max_memory_mb, make_service)
    state = ServerState(pool=pool)

    async def start() -> None:
        await pool.start()
        state.started = True
        failed = [b for b in pool.bases.values() if b.status == "error"]
        if failed and on_load_error is not None:
            on_load_error(ChatforgeError(f"could not load {failed[0].key}: {failed[0].error}"))

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(max(0.05, min(5.0, (ttl or 5.0) / 4)))
            await pool.sweep()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(start())]
        if ttl is not None:
            tasks.append(asyncio.create_task(sweeper()))
        yield
        state.draining = True
        for task in tasks:
            if not task.done():
                task.cancel()
        await pool.close(drain_timeout)  # in-flight requests have been answered by now

    app = FastAPI(title="chatforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.chatforge = state
    errors.install(app)

    # Added innermost first: host check -> CORS (preflights carry no key) -> key check.
    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)
    origins = list(cors_origins or [])
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HostGuard, allowed_hosts=list(allowed_hosts))
    # Outermost: counts every answer, those of the middleware above included.
    metrics = register_metrics(app, state)

    def open_for_requests() -> None:
        if state.draining:
            raise APIError(503, "the server is shutting down", retry_after=retry_after)

    async def target(name: str | None) -> Target:
        """The model a request names, loaded (503 while it loads at start, or if it
        failed to; one unloaded since, after ``ttl``, is loaded and waited for)."""
        open_for_requests()
        route = pool.resolve(name)
        base = pool.base_of(route)
        if base.status == "error" and not state.started:
            raise APIError(503, f"the model failed to load: {base.error}")
        if base.status == "error":
            raise APIError(503, f"the model {route.name!r} failed to load: {base.error}")
        if not state.started and not base.ready:
            raise APIError(503, "the model is still loading", retry_after=retry_after)
        return await pool.target(name)

    # ------------------------------------------------------------------ routes

    from chatforge.server.embeddings import register_embeddings  # it imports this module

    register_embeddings(app, target, limits, body_timeout, retry_after)

    @app.get("/health")
    async def health() -> JSONResponse:
        services = [b.service for b in pool.bases.values() if b.service is not None]
        fatal = next((s.fatal for s in services if s.fatal is not None), None)
        if fatal is not None:  # an engine thread died: say so, and why
            return JSONResponse({"status": "error", "error": fatal}, status_code=503)
        models = {r.name: pool.base_of(r).status for r in pool.routes}
        if state.status == "ready" and not state.draining:
            running = sum(s.load[0] for s in services)
            waiting = sum(s.load[1] for s in services)
            body = {"status": "ok", "model": state.model_id, "running": running}
            body["waiting"] = waiting
            if len(models) > 1:
                body["models"] = models
            return JSONResponse(body)
        status = "draining" if state.draining else state.status
        headers = {"Retry-After": str(retry_after)} if status == "loading" else None
        return JSONResponse(
            {"status": status, "error": state.error}, status_code=503, headers=headers
        )

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(render_page())

    def model_card(route: Route, name: str | None = None) -> dict:
        base = pool.base_of(route)
        card: dict[str, Any] = {
            "id": name or route.name,
            "object": "model",
            "created": state.created,
            "owned_by": "chatforge",
            "loaded": base.ready,
        }
        if base.ready:
            card["context_length"] = base.loaded.info.context_length
        if route.adapter is not None:  # vLLM's fields for a LoRA module
            card["parent"] = card["root"] = _base_name(pool, route)
        return card

    @app.get("/v1/models")
    async def models_route() -> dict:
        open_for_requests()
        if not state.started and not pool.base_of(pool.default).ready:
            await target(None)  # 503 while the default model loads at start
        cards = [
            model_card(route, name)
            for route in pool.routes
            for name in [route.name, *route.listed_names]
        ]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def model_route(name: str) -> dict:
        open_for_requests()
        return model_card(pool.resolve(name), name)

    @app.get("/v1/adapters")
    async def adapters() -> dict:
        """The LoRA adapters served, each applied per request on its base model."""
        open_for_requests()
        data = [
            {"name": r.name, "base": _base_name(pool, r), "path": str(r.adapter_dir)}
            for r in pool.routes
            if r.adapter is not None
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def add_adapter(request: Request) -> JSONResponse:
        """Load a LoRA adapter directory and serve it as model ``name`` on ``base``."""
        open_for_requests()
        req: AdapterRequest = parse(AdapterRequest, await _read_json(request, limits, body_timeout))
        if not MODEL_NAME.match(req.name):
            raise APIError(400, f"{req.name!r} is not a valid name", param="name")
        path = Path(req.path).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise APIError(
                400,
                f"{req.path} is not a LoRA adapter directory (no adapter_config.json)",
                param="path",
            )
        route = await pool.add_adapter(req.name, path.resolve(), req.base)
        return JSONResponse(
            {"name": route.name, "base": _base_name(pool, route), "path": str(route.adapter_dir)}
        )

    @app.delete("/v1/adapters/{name:path}")
    async def remove_adapter(name: str) -> dict:
        open_for_requests()
        await pool.remove_adapter(name)
        return {"name": name, "deleted": True}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        """vLLM's tokenizer route: ``prompt`` or ``messages`` -> ``tokens``, ``count``."""
        open_for_requests()
        req: TokenizeRequest = parse(
            TokenizeRequest, await _read_json(request, limits, body_timeout)
        )
        t = await target(req.model)
        loaded = t.loaded
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")

        def encode() -> list[int]:
            if req.messages is not None:
                messages = _with_system(req.messages, t.route.system)
                tools = plan_tools(req.tools, None, None)
                ids = encode_with_template(
                    loaded.format, messages, tools, req.add_generation_prompt
                )
                if ids is not None:
                    return ids
                msgs = render_messages(messages, tools)
                enc = loaded.format.encode(msgs, add_generation_prompt=req.add_generation_prompt)
                return list(enc.input_ids)
            return list(
                loaded.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            )

        try:
            ids = await asyncio.to_thread(encode)
        except (ValueError, TypeError) as e:
            param = "messages" if req.messages is not None else "prompt"
            raise APIError(400, f"cannot tokenise: {e}", param=param) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": loaded.info.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        """vLLM's detokenizer route: ``tokens`` -> ``prompt``."""
        open_for_requests()
        body = await _read_json(request, limits, body_timeout)
        req: DetokenizeRequest = parse(DetokenizeRequest, body)
        t = await target(req.model)
        vocab = t.service.engine.vocab_size
        bad = next((tok for tok in req.tokens if not 0 <= tok < vocab), None)
        if bad is not None:
            raise APIError(
                400, f"token {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens"
            )
        return {"prompt": t.loaded.tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict:
        """What a client needs to tokenise as the server does (``?model=`` picks one)."""
        t = await target(model)
        tok = t.loaded.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "vocab_size": t.service.engine.vocab_size,
            "max_model_len": t.loaded.info.context_length,
            "prompt_format": t.loaded.info.prompt_format,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "chat_template": getattr(tok, "chat_template", None),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        open_for_requests()
        body = await _read_json(request, limits, body_timeout)
        req: ChatCompletionRequest = parse(ChatCompletionRequest, body)
        t = await target(req.model)
        loaded, route = t.loaded, t.route
        config = generation_config(req, limits, route.defaults)
        tools = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        if tools is not None and tools.constraint is not None and config.json_schema is not None:
            raise APIError(
                400,
                "response_format cannot be combined with tools (unless tool_choice is "
                '"none"): a reply is either calls or one JSON document',
                param="response_format",
            )
        messages = _with_system(req.messages, route.system)

        def encode() -> EngineRequest:
            ids = encode_with_template(loaded.format, messages, tools)
            if ids is not None:  # a template that renders tools itself
                config.reply_budget(len(ids), loaded.info.context_length)  # fits?
                return EngineRequest(prompt_ids=ids, config=config)
            return plan_request(
                loaded.format,
                render_messages(messages, tools),
                loaded.info.context_length,
                config,
                drop_history=False,
            ).request

        try:  # templating and tokenising a long prompt takes a while: not on the loop
            planned = await asyncio.to_thread(encode)
        except ContextOverflowError as e:
            raise _context_error(e, "messages") from None
        except (ValueError, TypeError) as e:  # e.g. a template that rejects the role order
            raise APIError(400, f"cannot render these messages: {e}", param="messages") from None
        if tools is not None:  # a required call that cannot fit: a 400, not a cut reply
            budget = config.reply_budget(len(planned.prompt_ids), loaded.info.context_length)
            field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            await asyncio.to_thread(check_call_budget, tools, t.service.engine, budget, field)
        # The engine resolves the reply budget itself (max_tokens, the context).
        k = logprob_settings(req)
        constraint = [tools.constraint] if tools is not None and tools.constraint else []
        base = dataclasses.replace(
            planned, max_new_tokens=None, logprobs=k, processors=constraint, adapter=route.adapter
        )
        render = _Render(loaded.tokenizer, k, tools=bool(constraint))
        return await respond(request, req, t, [base], "messages", _CHAT, render)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        open_for_requests()
        body = await _read_json(request, limits, body_timeout)
        req: CompletionRequest = parse(CompletionRequest, body)
        t = await target(req.model)
        loaded = t.loaded
        config = generation_config(req, limits, t.route.defaults)
        k = logprob_settings(req)
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        if len(prompts) * req.n > limits.max_n:
            raise APIError(
                400,
                f"len(prompt) x n must be <= {limits.max_n} (got {len(prompts) * req.n})",
                param="prompt",
            )
        if req.stream and req.echo and k is not None:
            raise APIError(400, "echo with logprobs is not supported when streaming", param="echo")
        score_only = req.echo and req.max_tokens == 0

        def encode() -> tuple[list[list[int]], list[str]]:
            ids = [
                list(loaded.tokenizer.encode(p)) if isinstance(p, str) else list(p) for p in prompts
            ]
            texts = [p if isinstance(p, str) else loaded.tokenizer.decode(p) for p in prompts]
            return ids, texts

        try:  # tokenising a long prompt takes a while: not on the loop
            encoded, texts = await asyncio.to_thread(encode)
        except (ValueError, TypeError, OverflowError) as e:
            raise APIError(400, f"cannot tokenise the prompt: {e}", param="prompt") from None
        if not all(encoded):
            raise APIError(400, "prompt must not be empty", param="prompt")
        bases = [
            EngineRequest(
                prompt_ids=ids,
                config=config,
                logprobs=k,
                prompt_logprobs=k if req.echo and k is not None else None,
                max_new_tokens=0 if score_only else None,
                adapter=t.route.adapter,
            )
            for ids in encoded
        ]
        render = _Render(loaded.tokenizer, k, texts if req.echo else None, encoded)
        return await respond(request, req, t, bases, "prompt", _COMPLETION, render)

    async def respond(
        request: Request,
        req: ChatCompletionRequest | CompletionRequest,
        t: Target,
        bases: list[EngineRequest],
        param: str,
        shape: _Shape,
        render: _Render,
    ) -> Response:
        """Submit ``req.n`` choices per prompt in ``bases``; answer with an SSE stream of
        ``shape``'s chunks, or (not streaming) once all are done, with one JSON body.

        ``param`` names the request field that errors on submission point at.
        """
        handles = _submit(t.service, bases, req.n, request, param)
        meta = _Meta(shape.prefix, t.route.name, [len(b.prompt_ids) for b in bases], req.n, render)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return _sse(shape.chunks(handles, meta, include_usage))
        done = await _collect(handles, request)
        return JSONResponse(
            {
                "id": meta.id,
                "object": shape.object,
                "created": meta.created,
                "model": meta.model,
                "choices": [{"index": i, **shape.choice(c, meta, i)} for i, c in enumerate(done)],
                "usage": meta.usage(done),
            }
        )

    def _submit(
        service: EngineService, bases: list[EngineRequest], n: int, request: Request, param: str
    ) -> list[Handle]:
        """Submit ``n`` requests per prompt (seed + i each); all or none are queued."""
        loop = asyncio.get_running_loop()
        handles: list[Handle] = []
        try:
            for base in bases:
                for i in range(n):
                    req = base
                    if n > 1 and base.config.seed is not None:
                        seed = (base.config.seed + i) % 2**64
                        req = EngineRequest(**{**vars(base), "config": _reseed(base.config, seed)})
                    handles.append(service.submit(req, loop=loop))
        except ContextOverflowError as e:
            _cancel(handles)
            raise _context_error(e, param) from None
        except QueueFullError as e:
            _cancel(handles)
            raise APIError(
                429, f"the server is at capacity: {e}", retry_after=retry_after
            ) from None
        except ParamError as e:  # "logit_bias names token ...": its own field, not the prompt
            _cancel(handles)
            raise param_error(e) from None
        except ValueError as e:  # the prompt cannot be generated from
            _cancel(handles)
            raise APIError(400, str(e), param=param) from None
        except ChatforgeError as e:  # shutting down
            _cancel(handles)
            raise APIError(503, str(e), retry_after=retry_after) from None
        return handles

    return app


# ---------------------------------------------------------------------- helpers

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
"""A name an adapter may be served under."""


def _build_pool(
    specs: list[ServedModel],
    ttl: float | None,
    memory_mb: float | None,
    make_service: Callable[[Base, Any], EngineService],
) -> ModelPool:
    """Routes and bases from the served models: one base per distinct ``base`` key."""
    routes: list[Route] = []
    bases: dict[str, Base] = {}
    for i, spec in enumerate(specs):
        key = spec.base or spec.name or f"model-{i}"
        if key not in bases:
            load = spec.load if callable(spec.load) else (lambda m=spec.load: m)
            bases[key] = Base(key=key, load=load)
        route = Route(
            name=spec.name or "",
            base=key,
            adapter=None if spec.adapter_dir is None else (spec.name or key),
            adapter_dir=spec.adapter_dir,
            system=spec.system,
            defaults=spec.defaults,
            aliases=set(spec.aliases),
            listed_names=list(spec.listed_names),
            own_names=spec.own_names and spec.adapter_dir is None,
        )
        if route.name and any(route.name in r.names for r in routes):
            raise ChatforgeError(f"two models are served as {route.name!r}; name them apart")
        routes.append(route)
    return ModelPool(routes, bases, make_service, ttl=ttl, memory_mb=memory_mb)


def _own_names(pool: ModelPool, base: Base, loaded: Any) -> None:
    """A plain model also answers to the loaded model's own name and reference (and a
    bundled model's hub id); one loaded from a callable without a name takes its reference."""
    from chatforge.models.registry import ALIASES

    own = {loaded.info.name, loaded.info.ref}
    alias = ALIASES.get(loaded.info.ref)
    if alias is not None and alias.hub_id:
        own.add(alias.hub_id)
    taken = {n for r in pool.routes for n in r.names if r.base != base.key}
    for route in pool.routes:
        if route.base == base.key and route.own_names:
            if not route.name:
                route.name = loaded.info.ref or loaded.info.name
            route.aliases |= {n for n in own if n and n not in taken and n != route.name}


def _base_name(pool: ModelPool, route: Route) -> str:
    """The name of the plain model on ``route``'s base (the base's reference when only
    named models run on it)."""
    for r in pool.routes:
        if r.base == route.base and r.adapter is None and r.own_names:
            return r.name
    return route.base


def _with_system(messages: list[ChatMessageIn], system: str | None) -> list[ChatMessageIn]:
    """A named model's system prompt first, unless the request brings its own."""
    if not system or any(m.role in ("system", "developer") for m in messages):
        return messages
    return [ChatMessageIn(role="system", content=system), *messages]


class _BearerAuth:
    """ASGI middleware: every route but the public ones needs ``Authorization: Bearer KEY``.

    Plain ASGI rather than ``@app.middleware("http")``, whose request wrapping hides
    client disconnects from the routes (which must see them to free batch places).
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in _PUBLIC:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                response = APIError(
                    401,
                    "missing or wrong API key; send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                ).response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _context_error(e: ContextOverflowError, param: str) -> APIError:
    """OpenAI's wording (clients such as litellm match it to raise their own
    context-window error), then ours, which says what to do."""
    where = "messages" if param == "messages" else "prompt"
    return APIError(
        400,
        f"This model's maximum context length is {e.limit} tokens. However, you requested "
        f"{e.prompt_tokens + 1} tokens ({e.prompt_tokens} in the {where}, at least 1 in the "
        f"completion). Please reduce the length of the {where}. ({e})",
        param=param,
        code="context_length_exceeded",
    )


def _reseed(config: GenerationConfig, seed: int) -> GenerationConfig:
    return config.replace(seed=seed)


def _cancel(handles: list[Handle]) -> None:
    for h in handles:
        h.cancel()


def _finish(c: Completion, calls: bool = False) -> str:
    # Our "interrupted" only happens to a client that went away; OpenAI has no such value.
    if c.finish_reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


def _chat_choice(c: Completion, meta: _Meta, i: int) -> dict:
    # With tools, as streamed: calls (a call cut short dropped) or text, never call markup.
    content, calls = split_reply(c.text) if meta.render.tools else (c.text, None)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {
        "message": message,
        "logprobs": meta.render.chat(c.logprobs or []),
        "finish_reason": _finish(c, bool(calls)),
    }


async def _read_json(request: Request, limits: Limits, timeout: float) -> Any:
    """The body as JSON: 415 when it is not sent as JSON, 413 when it is over the limit,
    408 when it takes longer than ``timeout`` seconds to arrive, 400 when it is not JSON."""
    check_json_content_type(request.headers.get("content-type"))
    too_big = APIError(
        413, f"the request body is larger than {limits.max_body_bytes} bytes", code="body_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise too_big
    except TimeoutError:
        raise APIError(
            408, f"the request body did not arrive within {timeout:g} s", code="body_timeout"
        ) from None
    except ClientDisconnect:
        client = request.client
        log.info(
            "client %s went away mid-body (%s)",
            f"{client.host}:{client.port}" if client else "?",
            request.url.path,
        )
        raise APIError(499, "the client closed the request") from None
    try:
        return json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8", code="invalid_json") from None
    except ValueError as e:
        raise APIError(
            400, f"the request body is not valid JSON: {e}", code="invalid_json"
        ) from None


@dataclass
class _Render:
    """What the answer shapes need beyond the completions: logprobs and echo."""

    tokenizer: Any
    logprobs: int | None = None  # alternatives per token; None: no logprobs
    echo: list[str] | None = None  # per prompt, its text (completions with echo)
    prompt_ids: list[list[int]] | None = None  # per prompt (echoed tokens)
    tools: bool = False  # replies may be tool calls (chat with tools)

    def legacy(self, c: Completion, prompt: int, tokens: list | None = None) -> dict | None:
        """Completions ``logprobs`` of a whole choice (or of ``tokens``, a stream chunk's)."""
        if self.logprobs is None:
            return None
        if tokens is not None:
            return legacy_logprobs(self.tokenizer, [(t.token_id, t) for t in tokens])
        entries: list = []
        if self.echo is not None and self.prompt_ids is not None:
            ids = self.prompt_ids[prompt]
            scored = c.prompt_logprobs or [None] * len(ids)
            entries += list(zip(ids, scored, strict=True))
        entries += [(t.token_id, t) for t in c.logprobs or []]
        return legacy_logprobs(self.tokenizer, entries)

    def chat(self, tokens: list) -> dict | None:
        """Chat ``logprobs`` of generated tokens."""
        if self.logprobs is None:
            return None
        return {"content": chat_logprobs(self.tokenizer, tokens, self.logprobs), "refusal": None}


@dataclass
class _Meta:
    """Identity and usage accounting of one API response."""

    prefix: str
    model: str | None
    prompt_lengths: list[int]  # per prompt (each prompt has n choices)
    n: int
    render: _Render
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self, done: list[Completion]) -> dict[str, Any]:
        # As OpenAI counts it: each prompt once, every choice's completion tokens;
        # cached tokens are those of the first choice of each prompt.
        prompt = sum(self.prompt_lengths)
        completion = sum(c.completion_tokens for c in done)
        cached = sum(c.cached_tokens for c in done[:: self.n])
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


async def _collect(handles: list[Handle], request: Request) -> list[Completion]:
    """Wait for every handle's completion; cancel them all if the client disconnects."""

    async def one(h: Handle) -> Completion:
        async for ev in h.aevents():
            if ev.completion is not None:
                if ev.completion.finish_reason == "error":
                    raise APIError(500, f"generation failed: {ev.completion.error}")
                return ev.completion
        raise RuntimeError("the engine ended a request without a completion")

    # One task per choice rather than gather(): the first failure ends them all, and
    # every task is awaited, so no exception is left unretrieved.
    tasks = [asyncio.ensure_future(one(h)) for h in handles]
    try:
        while True:
            done, pending = await asyncio.wait(
                tasks, timeout=_DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION
            )
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
            if not pending:
                return [t.result() for t in tasks]
            if await request.is_disconnected():
                raise APIError(499, "the client closed the request")
    finally:
        _cancel([h for h, t in zip(handles, tasks, strict=True) if not t.done()])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _merged(handles: list[Handle]) -> AsyncIterator[tuple[int, Any]]:
    """Events of all handles as ``(choice index, event)``, as they come."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        try:
            async for ev in h.aevents():
                await q.put((i, ev))
        except Exception as e:  # noqa: BLE001 - forwarded to the consumer
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, ev = await q.get()
            if isinstance(ev, Exception):
                raise ev
            if ev.completion is not None and ev.completion.finish_reason == "error":
                raise RuntimeError(ev.completion.error)
            yield i, ev
            if ev.completion is not None:
                left -= 1
    finally:  # also when the client went away: cancelling a pump cancels its request
        for t in tasks:
            t.cancel()


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def frames() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-stream
            log.exception("generation failed mid-stream")
            err = APIError(500, f"generation failed: {type(e).__name__}: {e}")
            yield f"data: {json.dumps(err.body())}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _chat_chunks(handles: list[Handle], meta: _Meta, include_usage: bool) -> AsyncIterator:
    def chunk(choices: list[dict], usage: Any = None) -> dict:
        out = {
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = usage
        return out

    for i in range(len(handles)):  # the first chunk of each choice carries the role
        yield chunk(
            [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
    done: dict[int, Completion] = {}
    want = meta.render.logprobs is not None
    # With tools, text that may be the start of a call is held back, and each call goes
    # out whole as a tool_calls delta once its closing tag has arrived.
    splits = {i: CallStream() for i in range(len(handles))} if meta.render.tools else {}
    calls_sent: dict[int, int] = {}
    async for i, ev in _merged(handles):
        text, calls = splits[i].push(ev.text) if i in splits else (ev.text, [])
        if ev.completion is not None and i in splits:
            text += splits[i].finish()
        if text or (want and ev.tokens):
            piece: dict = {"index": i, "delta": {"content": text}, "finish_reason": None}
            if want:
                piece["logprobs"] = meta.render.chat(ev.tokens)
            yield chunk([piece])
        for call in calls:
            n = calls_sent.get(i, 0)
            calls_sent[i] = n + 1
            delta = {"tool_calls": [{"index": n, **call}]}
            yield chunk([{"index": i, "delta": delta, "finish_reason": None}])
        if ev.completion is not None:
            done[i] = ev.completion
            reason = _finish(ev.completion, calls_sent.get(i, 0) > 0)
            yield chunk([{"index": i, "delta": {}, "finish_reason": reason}])
    if include_usage:
        yield chunk([], meta.usage([done[i] for i in sorted(done)]))


async def _completion_chunks(
    handles: list[Handle], meta: _Meta, include_usage: bool
) -> AsyncIterator:
    def chunk(choices: list[dict], usage: Any = None) -> dict:
        out = {
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = usage
        return out

    done: dict[int, Completion] = {}
    render = meta.render
    if render.echo is not None:  # each choice starts with its prompt
        for i in range(len(handles)):
            text = render.echo[i // meta.n]
            yield chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
    async for i, ev in _merged(handles):
        if ev.text or (render.logprobs is not None and ev.tokens):
            lp = render.legacy(None, i // meta.n, ev.tokens)  # type: ignore[arg-type]
            yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": None}])
        if ev.completion is not None:
            done[i] = ev.completion
            reason = _finish(ev.completion)
            yield chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": reason}])
    if include_usage:
        yield chunk([], meta.usage([done[i] for i in sorted(done)]))


@dataclass(frozen=True)
class _Shape:
    """How one endpoint names and shapes its answers."""

    prefix: str
    """Of the response id (``chatcmpl-...``)."""
    object: str
    """The ``object`` of a non-streamed response."""
    choice: Callable[[Completion, _Meta, int], dict]
    """A finished choice of a non-streamed response, less its ``index``."""
    chunks: Callable[[list[Handle], _Meta, bool], AsyncIterator[dict]]
    """The streamed chunks: ``(handles, meta, include_usage)``."""


_CHAT = _Shape(
    prefix="chatcmpl",
    object="chat.completion",
    choice=_chat_choice,
    chunks=_chat_chunks,
)
_COMPLETION = _Shape(
    prefix="cmpl",
    object="text_completion",
    choice=lambda c, meta, i: {
        "text": (meta.render.echo[i // meta.n] if meta.render.echo is not None else "") + c.text,
        "logprobs": meta.render.legacy(c, i // meta.n),
        "finish_reason": _finish(c),
    },
    chunks=_completion_chunks,
)
