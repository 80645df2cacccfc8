"""The chat's judgement commands: ``/good``, ``/bad``, ``/edit`` and ``/pick``.

Each judges the last reply and keeps the judgement in the conversation log (see
:mod:`chatforge.store.judgement`), with the reply's model and settings already
there. ``/edit`` also changes the history: the model goes on from the person's
text. ``/pick`` chooses among the replies ``/retry`` gave to the last question
(the earlier ones are kept as alternatives by
:meth:`~chatforge.store.LoggedSession.begin_retry`).

The functions take the :class:`~chatforge.repl.ChatRepl` and the command's argument,
as its command table calls them.
"""

from __future__ import annotations

import sys
from typing import Any

from chatforge.conversation import Message

NEEDS_LOG = "judgements are kept in the conversation log; chat without --no-log to give them"


def _logged(repl: Any) -> Any:
    """The repl's :class:`~chatforge.store.LoggedSession` with a logged reply to judge;
    None (the failure reported) when there is none."""
    from chatforge.store import LoggedSession

    s = repl.session
    if not isinstance(s, LoggedSession):
        repl.fail(NEEDS_LOG)
        return None
    if s.cid is None or s.reply_id is None:
        repl.fail("no reply to judge yet")
        return None
    return s


def thumbs(repl: Any, kind: str, arg: str) -> None:
    """``/good`` or ``/bad``: a thumbs up or down on the last reply."""
    if arg:
        repl.fail(f"/{kind} takes nothing; it marks the last reply")
        return
    s = _logged(repl)
    if s is None:
        return
    s.log.judge(s.reply_id, kind, source="chat")
    repl.note(f"marked the last reply {kind}")


def ask_edit(text: str) -> str | None:
    """Open ``text`` for editing at the terminal; the edited text, or None (Ctrl-C)."""
    from prompt_toolkit import prompt

    try:
        return prompt("edit> ", default=text, multiline=True)
    except (KeyboardInterrupt, EOFError):
        return None


def edit(repl: Any, arg: str) -> None:
    """``/edit [TEXT]``: the last reply becomes TEXT (or what the person edits it into)
    in the history; the log keeps the original and the edit beside it."""
    s = _logged(repl)
    if s is None:
        return
    messages = s.conversation.messages
    last = messages[-1] if messages and messages[-1].role == "assistant" else None
    if not arg:
        if not (repl.interactive and sys.stdin.isatty()):
            repl.fail("/edit needs the new text here, e.g. /edit Paris is the capital.")
            return
        repl.note("edit the reply; Esc then Enter saves, Ctrl-C cancels")
        current = last.content if last is not None else (s.last.text if s.last else "")
        arg = (ask_edit(current) or "").strip()
        if not arg or arg == current.strip():
            repl.note("not edited")
            return
    s.log.judge(s.reply_id, "edit", text=arg, source="chat")
    if last is not None:
        last.content = arg  # the same Message: its stats for /save stay with it
    else:  # the reply was stopped (not history): the edit makes it one
        messages.append(Message("assistant", arg))
    if repl.writer:
        repl.writer.note("/edit: the last reply was replaced")
    repl.note("edited the last reply; the conversation goes on from your text")


def pick(repl: Any, arg: str) -> None:
    """``/pick N``: of the replies to the last question (the first, then each /retry),
    reply N is better than every other; the conversation goes on from it."""
    s = _logged(repl)
    if s is None:
        return
    conv = s.log.get(s.cid)
    main = next((m for m in conv.messages if m.id == s.reply_id), None)
    replies = sorted([main, *main.alternatives], key=lambda m: m.id) if main else []
    if len(replies) < 2:
        repl.fail("nothing to pick from: /retry gives the last question another reply")
        return
    if not arg.isdigit() or not 1 <= int(arg) <= len(replies):
        repl.fail(f"/pick takes a reply number from 1 to {len(replies)} (1 = the first)")
        return
    chosen = replies[int(arg) - 1]
    if not chosen.sent:
        repl.fail(f"reply {arg} was {chosen.finish_reason}: it cannot go on the history")
        return
    for other in replies:
        if other is not chosen:
            s.log.judge(chosen.id, "pick", other_id=other.id, source="chat")
    if repl.writer:
        repl.writer.note(f"/pick: reply {arg} of {len(replies)} is the better one")
    if chosen is not main:
        s.log.promote(chosen.id)
        s.reply_id = chosen.id
        messages = s.conversation.messages
        if messages and messages[-1].role == "assistant":
            messages[-1].content = chosen.final_text
        else:
            messages.append(Message("assistant", chosen.final_text))
    repl.note(f"picked reply {arg} of {len(replies)}; the conversation goes on from it")
