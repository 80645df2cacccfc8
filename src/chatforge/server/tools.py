"""Function calling: OpenAI's ``tools`` rendered for the model, its calls constrained and parsed.

How tools reach the model (documented in the README). A chat template that renders
``tools`` (Qwen2.5's, Hermes', Llama 3.1's) gets them, with earlier calls and results,
in its own syntax (:func:`encode_with_template`). Small chat models' templates
(SmolLM2's included) and chatforge's own formats have none, so chatforge then uses the
Hermes/Qwen convention every recent tool-trained model knows, in plain text:

* the tools are described at the end of the system prompt (:func:`tools_prompt`);
* a call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block
  per call; an assistant message with ``tool_calls`` in the history is rendered so;
* a ``role: "tool"`` message becomes a user turn ``<tool_response>\\n...\\n</tool_response>``
  (consecutive results share one turn).

Calls are always written in the Hermes form below. What the model may write is a
grammar (:func:`_grammar`): with
``tool_choice: "required"`` or a named function only calls, each one's arguments
constrained to the function's ``parameters`` schema; with ``"auto"`` either plain
text (which may not begin with ``<tool_call>``) or calls, so a call is recognised
and constrained from its first token; with ``"none"`` the tools are not shown.

A call the request requires is closed within the reply budget (the grammar's closing,
see :class:`~chatforge.generation.grammar.GrammarConstraint`), and a budget that cannot
hold the shortest call is refused before generating (:func:`check_call_budget`). A
reply that is calls never shows its markup as text: a call cut short (a stop string,
an ``"auto"`` call begun too late) is dropped, streamed or not (:func:`split_reply`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from chatforge.conversation import Message
from chatforge.generation.grammar import GrammarConstraint
from chatforge.generation.schema import JSON_OPTIONS, close_objects, lark_grammar
from chatforge.server.errors import APIError
from chatforge.server.schemas import ChatMessageIn, NamedToolChoice, ToolDef

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MAX_PARALLEL_CALLS = 8
"""Most calls one reply may make (``parallel_tool_calls``)."""


@dataclass
class ToolPlan:
    """What a request's ``tools``/``tool_choice`` mean for this reply."""

    tools: list[ToolDef]
    choice: str  # "none" | "auto" | "required" | "function" (one named function)
    parallel: bool
    constraint: GrammarConstraint | None  # None: free text ("none")


def plan_tools(
    tools: list[ToolDef] | None,
    tool_choice: str | NamedToolChoice | None,
    parallel: bool | None,
) -> ToolPlan | None:
    """The request's tool settings checked (400 naming the field) and turned into a
    grammar; None when the request has no tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools must have distinct function names", param="tools")
    choice = tool_choice or "auto"
    allowed = tools
    if isinstance(choice, NamedToolChoice):
        wanted = choice.function.get("name")
        allowed = [t for t in tools if t.function.name == wanted]
        if not allowed:
            raise APIError(
                400, f"tool_choice names {wanted!r}, which is not in tools", param="tool_choice"
            )
        choice = "function"
    plan = ToolPlan(tools, choice, parallel is not False and choice != "function", None)
    if choice != "none":
        plan.constraint = GrammarConstraint(
            _grammar(allowed, free_text=choice == "auto", parallel=plan.parallel),
            name="tools",
            close_after=CALL_OPEN if choice == "auto" else "",  # text needs no closing
        )
    return plan


def check_call_budget(
    plan: ToolPlan | None, engine: Any, budget: int, field: str = "max_tokens"
) -> None:
    """A 400 naming ``field`` when the request requires a call (``tool_choice``
    "required" or a named function) and ``budget`` reply tokens cannot hold the
    shortest one (e.g. a string parameter with a large ``minLength``): generating would
    only end cut short, with no call."""
    if plan is None or plan.constraint is None or plan.choice not in ("required", "function"):
        return
    if plan.constraint.shortest_reply(engine, budget) is not None:
        return
    need = plan.constraint.shortest_reply(engine, engine.context_length)
    takes = f"takes {need} tokens" if need is not None else "does not fit in the context"
    raise APIError(
        400,
        f"tool_choice requires a call, but the reply may have only {budget} tokens "
        f"({field}, and what the context leaves after the prompt) and the shortest call "
        f"to the functions' parameters schema {takes}: raise {field} or relax the schema",
        param=field,
    )


def _call_schema(tool: ToolDef) -> dict[str, Any]:
    # Arguments the function does not declare would fail the call (a Python function
    # gets an unexpected keyword), so unless the schema allows them they are not written
    # (nor keys its nested objects do not list).
    params = close_objects(tool.function.parameters or {"type": "object", "properties": {}})
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _grammar(tools: list[ToolDef], *, free_text: bool, parallel: bool) -> str:
    """Lark (llguidance's dialect): calls whose JSON follows one of ``tools``' schemas,
    or (``free_text``) any text that does not start a call."""
    schemas = [_call_schema(t) for t in tools]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    one = {**one, "x-guidance": JSON_OPTIONS}
    more = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    rules = [
        f"calls: call {more}",
        f'call: "{CALL_OPEN}\\n" %json {json.dumps(one)} "\\n{CALL_CLOSE}"',
    ]
    if free_text:
        # Text that is not a call: any characters, but not "<tool_call>" first.
        rules.insert(0, f"start: TEXT | calls\nTEXT: /(?s:.+)/ & ~/{CALL_OPEN}(?s:.*)/")
    else:
        rules.insert(0, "start: calls")
    try:
        return lark_grammar("\n".join(rules), name="tools")
    except ValueError as e:
        raise APIError(400, str(e), param="tools") from None


def tools_prompt(tools: list[ToolDef]) -> str:
    """The system-prompt text that describes ``tools`` and how to call them."""
    described = "\n".join(
        json.dumps({"type": "function", "function": t.function.model_dump(exclude_none=True)})
        for t in tools
    )
    return (
        "You may call one or more functions to help with the user's request. "
        "The functions are described in JSON within <tools></tools>:\n"
        f"<tools>\n{described}\n</tools>\n"
        "To call a function, reply with a JSON object holding its name and arguments "
        f"within {CALL_OPEN}{CALL_CLOSE} tags:\n"
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}'
    )


def render_messages(messages: list[ChatMessageIn], plan: ToolPlan | None) -> list[Message]:
    """The request's messages as the model's plain chat turns (tools in the system prompt,
    earlier calls and their results as text)."""
    out: list[Message] = []
    for m in messages:
        role = m.chat_role()
        if role == "tool":
            block = f"<tool_response>\n{m.text()}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                out[-1] = Message("user", out[-1].content + "\n" + block)
            else:
                out.append(Message("user", block))
            continue
        text = m.text()
        if role == "assistant" and m.tool_calls:
            calls = [
                f'{CALL_OPEN}\n{{"name": {json.dumps(c.function.name)}, '
                f'"arguments": {_arguments_json(c.function.arguments)}}}\n{CALL_CLOSE}'
                for c in m.tool_calls
            ]
            text = "\n".join(([text] if text else []) + calls)
        out.append(Message(role, text))
    if plan is not None and plan.choice != "none":
        prompt = tools_prompt(plan.tools)
        if out and out[0].role == "system":
            out[0] = Message("system", f"{out[0].content}\n\n{prompt}")
        else:
            out.insert(0, Message("system", prompt))
    return out


def template_supports_tools(fmt: Any) -> bool:
    """Whether the model's prompt format is a chat template that renders ``tools``."""
    template = getattr(getattr(fmt, "tokenizer", None), "chat_template", None)
    return fmt.name == "chat_template" and isinstance(template, str) and "tools" in template


def encode_with_template(
    fmt: Any,
    messages: list[ChatMessageIn],
    plan: ToolPlan | None,
    add_generation_prompt: bool = True,
) -> list[int] | None:
    """The prompt rendered by a chat template that knows tools (the tools, earlier
    ``tool_calls`` and ``role: "tool"`` results in its own syntax); None when the template
    does not, or nothing tool-related is in the request (then :func:`render_messages`)."""
    tooled = any(m.role == "tool" or m.tool_calls for m in messages)
    shown = plan is not None and plan.choice != "none"
    if not (shown or tooled) or not template_supports_tools(fmt):
        return None
    hf: list[dict[str, Any]] = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.chat_role(), "content": m.text()}
        if m.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": json.loads(_arguments_json(c.function.arguments)),
                    },
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        hf.append(entry)
    tools = [t.model_dump(exclude_none=True) for t in plan.tools] if shown and plan else None
    out = fmt.tokenizer.apply_chat_template(
        hf,
        tools=tools,
        tokenize=True,
        return_dict=False,
        add_generation_prompt=add_generation_prompt,
    )
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _arguments_json(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        raise APIError(
            400,
            f"an assistant tool call's arguments are not JSON: {arguments[:80]!r}",
            param="messages",
        ) from None


def split_reply(text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, tool_calls) of a finished reply, as a stream (:class:`CallStream`)
    sends them: a reply that starts with a call is calls only, its complete calls
    (None when there are none) and no content; a call cut short is dropped."""
    if not text.lstrip().startswith(CALL_OPEN):
        return text, None
    calls, _ = _leading_calls(text)
    return None, calls or None


def parse_calls(text: str) -> list[dict[str, Any]] | None:
    """The OpenAI ``tool_calls`` of a reply, or None when it is not a complete set of
    calls (plain text, or calls cut short)."""
    calls, rest = _leading_calls(text)
    return calls if calls and not rest.strip() else None


_JSON = json.JSONDecoder()


def _leading_calls(text: str) -> tuple[list[dict[str, Any]], str]:
    """The complete calls at the start of ``text`` and what follows them.

    Each call's body is read as JSON, not cut at the next ``</tool_call>``: a string
    argument may hold that very text (the grammar lets a string hold anything), and
    it is still one valid call.
    """
    calls: list[dict[str, Any]] = []
    rest = text.lstrip()
    while rest.startswith(CALL_OPEN):
        body = rest[len(CALL_OPEN) :].lstrip()
        try:
            call, end = _JSON.raw_decode(body)
        except ValueError:
            break
        after = body[end:].lstrip()
        if not isinstance(call, dict) or "name" not in call or not after.startswith(CALL_CLOSE):
            break
        calls.append(
            {
                "id": f"call_{secrets.token_hex(12)}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False),
                },
            }
        )
        rest = after[len(CALL_CLOSE) :].lstrip()
    return calls, rest


class CallStream:
    """Splits a streamed reply into text deltas and complete calls.

    Text is held back while it could still be the start of ``<tool_call>``; once a
    reply is known to be calls, each call is released when its closing tag arrives.
    """

    def __init__(self) -> None:
        self.text = ""
        self.mode: str | None = None  # None (undecided) | "text" | "calls"
        self.sent_calls = 0

    def push(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        """(text to send now, calls completed now) after ``piece``."""
        self.text += piece
        if self.mode is None:
            head = self.text.lstrip()
            if head.startswith(CALL_OPEN):
                self.mode = "calls"
            elif CALL_OPEN.startswith(head):
                return "", []  # still undecided
            else:
                self.mode = "text"
                return self.text, []
        if self.mode == "text":
            return piece, []
        if CALL_CLOSE not in self.text[-(len(piece) + len(CALL_CLOSE) - 1) :]:
            return "", []  # no closing tag ends in this piece: no call closed now
        calls, _ = _leading_calls(self.text)
        new = calls[self.sent_calls :]
        self.sent_calls = len(calls)
        return "", new

    def finish(self) -> str:
        """Text still held back when the reply ended (an undecided prefix)."""
        return self.text if self.mode is None else ""
