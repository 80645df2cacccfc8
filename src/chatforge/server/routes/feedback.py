"""``POST /v1/feedback``: a judgement of served replies, kept in the conversation log.

The web workbench (thumbs, edit, the compare mode's pick) and programs send::

    {"kind": "pick" | "good" | "bad" | "edit",
     "messages": [...],      # OpenAI messages: a system one first if any, up to the prompt
     "replies": [{"model": str, "settings": {...}, "content": str,
                  "response_id": str | null, "usage": {...} | null}],
     "chosen": int,          # pick: the index of the better reply (two replies or more)
     "edited": str,          # edit: the person's text for the reply
     "source": "web" | "api"}   # default "api"

and get ``{"id": <judgement id>, "ids": [...], "conversation_id": int}`` back. Each
request becomes one logged conversation (backend ``server``): the messages, the chosen
(or only) reply on the main line, the other replies as its alternatives, and the
judgement rows (a pick: one per reply not chosen). ``chatforge logs export --format
preference`` turns them into training pairs.

Every field is checked and an unknown one is a 400 naming it: feedback must never be
dropped in silence. A server started with ``--no-log`` answers 501.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from chatforge.errors import ChatforgeError
from chatforge.server.errors import APIError
from chatforge.server.schemas import parse
from chatforge.server.state import get_state, open_for_requests
from chatforge.server.transport import read_json

router = APIRouter(dependencies=[Depends(open_for_requests)])


class _Exact(BaseModel):
    """A body part whose unknown fields are a 400 naming them."""

    model_config = ConfigDict(strict=True, extra="forbid")


class FeedbackTextPart(_Exact):
    type: Literal["text"]
    text: str


class FeedbackMessage(_Exact):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[FeedbackTextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FeedbackReply(_Exact):
    model: str
    content: str
    settings: dict[str, Any] | None = None  # the sampling settings it was made with
    response_id: str | None = None  # the chat completion's id
    usage: dict[str, Any] | None = None  # its usage block


class FeedbackRequest(_Exact):
    kind: Literal["pick", "good", "bad", "edit"]
    messages: list[FeedbackMessage]
    replies: list[FeedbackReply]
    chosen: int | None = None
    edited: str | None = None
    source: Literal["web", "api"] = "api"


def check(req: FeedbackRequest) -> None:
    """The rules pydantic cannot say: a 400 naming the field that breaks one."""
    msgs = req.messages
    if not msgs or msgs[-1].role != "user":
        raise APIError(
            400, "messages must end with the user prompt the replies answer", param="messages"
        )
    for i, m in enumerate(msgs[1:], 1):
        if m.role in ("system", "developer"):
            raise APIError(400, "a system message may only come first", param=f"messages[{i}]")
    if not req.replies:
        raise APIError(400, "give the reply (or replies) judged", param="replies")
    for i, r in enumerate(req.replies):
        if not r.content.strip():
            raise APIError(400, "a reply's content is empty", param=f"replies[{i}].content")
        if not r.model.strip():
            raise APIError(400, "a reply's model is empty", param=f"replies[{i}].model")
    if req.kind == "pick":
        if len(req.replies) < 2:
            raise APIError(400, "a pick needs two replies or more", param="replies")
        if req.chosen is None:
            raise APIError(
                400, "a pick needs chosen: the index of the better reply", param="chosen"
            )
        if not 0 <= req.chosen < len(req.replies):
            raise APIError(
                400,
                f"chosen must be 0 to {len(req.replies) - 1} (the index of a "
                f"reply); got {req.chosen}",
                param="chosen",
            )
    else:
        if len(req.replies) != 1:
            raise APIError(
                400,
                f"a {req.kind} judgement takes one reply, got "
                f"{len(req.replies)}; use kind pick to compare replies",
                param="replies",
            )
        if req.chosen is not None:
            raise APIError(400, "chosen is for kind pick only", param="chosen")
    if req.kind == "edit" and not (req.edited or "").strip():
        raise APIError(400, "an edit needs edited: the new text of the reply", param="edited")
    if req.kind != "edit" and req.edited is not None:
        raise APIError(400, "edited is for kind edit only", param="edited")


def _tokens(usage: dict[str, Any] | None, name: str) -> int | None:
    value = (usage or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def record(log: Any, req: FeedbackRequest) -> dict[str, Any]:
    """Write the request as one conversation with its judgements; the response body."""
    msgs = req.messages
    system = msgs[0].text() if msgs[0].role in ("system", "developer") else None
    chosen = req.chosen or 0
    main = req.replies[chosen]
    cid = log.new_conversation(model=main.model, backend="server", system=system)
    for m in msgs[1:] if system is not None else msgs:
        log.add_message(cid, m.role, m.text())

    def add(reply: FeedbackReply, alt_of: int | None) -> int:
        return log.add_message(
            cid,
            "assistant",
            reply.content,
            model=reply.model,
            params=reply.settings,
            prompt_tokens=_tokens(reply.usage, "prompt_tokens"),
            completion_tokens=_tokens(reply.usage, "completion_tokens"),
            alt_of=alt_of,
            response_id=reply.response_id,
        )

    main_id = add(main, None)
    others = [add(r, main_id) for i, r in enumerate(req.replies) if i != chosen]
    if req.kind == "pick":
        ids = [log.judge(main_id, "pick", other_id=o, source=req.source) for o in others]
    else:
        ids = [log.judge(main_id, req.kind, text=req.edited, source=req.source)]
    return {"id": ids[0], "ids": ids, "conversation_id": cid}


@router.post("/v1/feedback")
async def feedback(request: Request) -> dict:
    """Keep a judgement of served replies (see the module's docstring for the body)."""
    state = get_state(request)
    if not state.log.enabled:
        raise APIError(
            501,
            "this server runs with --no-log: feedback is not kept; start it without "
            "--no-log to keep judgements in the conversation log",
            code="log_disabled",
        )
    req: FeedbackRequest = parse(
        FeedbackRequest, await read_json(request, state.limits, state.body_timeout)
    )
    check(req)
    try:
        return await asyncio.to_thread(state.log.run, lambda log: record(log, req))
    except ChatforgeError as e:  # the request was checked: the log failed (disk, damage)
        raise APIError(500, f"could not keep the feedback: {e}", type="server_error") from None
