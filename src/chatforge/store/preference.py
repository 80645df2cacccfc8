"""Preference pairs from judgements, in TRL's conversational preference format.

One JSONL line per pair, as TRL's ``DPOTrainer`` reads it::

    {"prompt": [{"role": "system", ...}, {"role": "user", ...}, ...],
     "chosen": [{"role": "assistant", "content": "the better reply"}],
     "rejected": [{"role": "assistant", "content": "the worse reply"}]}

``prompt`` is what the model saw for the reply: the system prompt in force, the
history before it (edited replies as edited, stopped replies left out, the user
messages around them joined as the chat joins them) and the question. The pairs,
among the replies to one question (the main-line reply and its alternatives):

- ``pick``: the chosen reply beats each reply not chosen;
- ``edit``: the person's latest edit beats the reply as written;
- ``good-bad``: each reply marked good beats each marked bad (the latest thumbs
  counts).

What gives no pair is counted by reason, so the export can say what it left out.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from chatforge.store.log import ConversationLog, LoggedConversation, LoggedMessage

PAIR_SOURCES = ("pick", "edit", "good-bad")
"""Where a pair comes from, in the order the counts are shown."""

GOOD_ALONE = "good-alone"
BAD_ALONE = "bad-alone"
EDIT_UNCHANGED = "edit-unchanged"
EMPTY = "empty"
REPEATED = "repeated"
NO_QUESTION = "no-question"
OTHER_PROMPT = "other-prompt"

_LEFT_OUT = {
    GOOD_ALONE: ("good reply", "good replies", "with no bad one to the same prompt"),
    BAD_ALONE: ("bad reply", "bad replies", "with no good one to the same prompt"),
    EDIT_UNCHANGED: ("edit", "edits", "that left the reply as it was"),
    EMPTY: ("pair", "pairs", "with an empty reply"),
    REPEATED: ("pair", "pairs", "given twice (a pick and thumbs on the same replies)"),
    NO_QUESTION: ("judged reply", "judged replies", "with no question before it"),
    OTHER_PROMPT: ("pick", "picks", "between replies to different prompts"),
}


def describe_left_out(reason: str, n: int) -> str:
    """``n`` things left out for ``reason``, in words: "2 good replies with no bad one ..."."""
    one, many, why = _LEFT_OUT[reason]
    return f"{n} {one if n == 1 else many} {why}"


@dataclass
class PreferenceCounts:
    """What an export wrote (pairs by source) and left out (judgements by reason)."""

    written: Counter = field(default_factory=Counter)
    left_out: Counter = field(default_factory=Counter)

    @property
    def pairs(self) -> int:
        """Pairs written in all."""
        return sum(self.written.values())


@dataclass
class PreferencePair:
    """One preference: ``chosen`` beats ``rejected`` as a reply to ``prompt``."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str  # one of PAIR_SOURCES

    def to_trl(self) -> dict:
        """TRL's conversational preference row."""
        return {
            "prompt": self.prompt,
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


def prompt_for(conv: LoggedConversation, index: int) -> list[dict[str, str]] | None:
    """The messages the model saw for the main-line reply ``conv.messages[index]``:
    the system prompt then in force, the history and the question (None: no question)."""
    system = conv.initial_system
    history: list[dict[str, str]] = []
    for m in conv.messages[:index]:
        if m.role == "system":  # changed here: the later replies were written under it
            system = m.content or None
        elif m.role == "user" and history and history[-1]["role"] == "user":
            history[-1] = {"role": "user", "content": history[-1]["content"] + "\n\n" + m.content}
        elif m.role == "user" or m.sent:
            history.append({"role": m.role, "content": m.final_text})
    if not history or history[-1]["role"] != "user":
        return None
    return ([{"role": "system", "content": system}] if system else []) + history


def _group_pairs(replies: list[LoggedMessage], left_out: Counter) -> Iterator[tuple[str, str, str]]:
    """(chosen, rejected, source) for the replies to one question."""
    by_id = {m.id: m for m in replies}
    for m in replies:
        for j in m.judgements:
            if j.kind == "pick":
                other = by_id.get(j.other_id)
                if other is None:
                    left_out[OTHER_PROMPT] += 1
                else:
                    yield m.content, other.content, "pick"
        if m.edit is not None:
            if m.edit.strip() == m.content.strip():
                left_out[EDIT_UNCHANGED] += 1
            else:
                yield m.edit, m.content, "edit"
    goods = [m for m in replies if m.verdict == "good"]
    bads = [m for m in replies if m.verdict == "bad"]
    if goods and not bads:
        left_out[GOOD_ALONE] += len(goods)
    if bads and not goods:
        left_out[BAD_ALONE] += len(bads)
    for good in goods:
        for bad in bads:
            yield good.content, bad.content, "good-bad"


def preference_pairs(conv: LoggedConversation, counts: PreferenceCounts) -> list[PreferencePair]:
    """The pairs a conversation's judgements give; what gives none is counted."""
    out: list[PreferencePair] = []
    for i, m in enumerate(conv.messages):
        if m.role != "assistant":
            continue
        replies = sorted([m, *m.alternatives], key=lambda r: r.id or 0)
        if not any(r.judgements for r in replies):
            continue
        prompt = prompt_for(conv, i)
        if prompt is None:
            counts.left_out[NO_QUESTION] += 1
            continue
        seen: set[tuple[str, str]] = set()
        for chosen, rejected, source in _group_pairs(replies, counts.left_out):
            if not chosen.strip() or not rejected.strip():
                counts.left_out[EMPTY] += 1
            elif (chosen, rejected) in seen:
                counts.left_out[REPEATED] += 1
            else:
                seen.add((chosen, rejected))
                out.append(PreferencePair(prompt, chosen, rejected, source))
    return out


def export_preference(
    log: ConversationLog,
    out: TextIO,
    *,
    cids: list[int] | None = None,
    model: str | None = None,
    since: float | None = None,
) -> PreferenceCounts:
    """Write the log's preference pairs to ``out`` as TRL's conversational preference
    JSONL (the filters as :meth:`ConversationLog.export_training`'s); returns the counts."""
    counts = PreferenceCounts()
    for conv in log.conversations(cids=cids, model=model, since=since):
        for pair in preference_pairs(conv, counts):
            out.write(json.dumps(pair.to_trl(), ensure_ascii=False) + "\n")
            counts.written[pair.source] += 1
    return counts
