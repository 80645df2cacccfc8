"""Preference pairs for DPO: read the files people have, encode them with the model's format.

A pair is a prompt (the conversation so far, system prompt first) and two replies to
it, the ``chosen`` and the ``rejected`` one. Each JSONL line may be any of the shapes
TRL's ``DPOTrainer`` and public preference sets use:

* conversational, explicit prompt (TRL; ``chatforge logs export --format preference``):
  ``{"prompt": [{"role", "content"}, ...], "chosen": [{"role": "assistant", ...}],
  "rejected": [...]}``;
* conversational, implicit prompt (TRL): ``{"chosen": [messages...], "rejected":
  [messages...]}``, the two conversations equal up to their last assistant reply;
* standard, explicit prompt (TRL): ``{"prompt": "text", "chosen": "text", "rejected":
  "text"}``; the prompt is taken as the user's message;
* Anthropic HH: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``,
  turns marked ``Human:`` / ``Assistant:``, the two equal up to the last reply.

A malformed line is reported as ``file:line: what is wrong`` and skipped and counted
(``on_error="skip"``) or raised (``"fail"``), as the SFT data readers do.

:func:`encode_pair` turns a pair into token ids with the model's prompt format, the
way training sees a conversation (:meth:`PromptFormat.encode_for_training`): the
completion is the reply's tokens and the token that ends it (``<|im_end|>``, EOS).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.conversation.messages import Message
from chatforge.errors import ParamError
from chatforge.training.data import DataError, read_jsonl
from chatforge.training.examples import apply_train_on

SHAPES = ("conversational", "implicit", "standard", "hh")


@dataclass
class Pair:
    """A prompt and two replies to it, the better one first."""

    prompt: list[Message]  # system (optional), then alternating user/assistant, ending with user
    chosen: str
    rejected: str


@dataclass
class PreferenceSet:
    """What preference files held: the pairs, their shapes, and the lines skipped."""

    pairs: list[Pair] = field(default_factory=list)
    shapes: dict[str, int] = field(default_factory=dict)  # shape -> lines of it
    errors: list[str] = field(default_factory=list)  # "file:line: what is wrong"
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def split_tail(self, fraction: float) -> tuple[PreferenceSet, PreferenceSet]:
        """``(head, tail)``: the last ``fraction`` of pairs held out for validation."""
        if not 0.0 < fraction < 1.0:
            raise ParamError("valid_split", f"must be in (0, 1), got {fraction}")
        n = len(self.pairs)
        k = max(1, int(round(n * fraction)))
        if k >= n:
            raise DataError(f"too few pairs to hold out {fraction:.0%} for validation ({n})")
        head = PreferenceSet(self.pairs[: n - k], dict(self.shapes), list(self.errors))
        head.sources = list(self.sources)
        return head, PreferenceSet(self.pairs[n - k :], sources=list(self.sources))


def load_preferences(
    sources: str | Path | Iterable[str | Path],
    on_error: str = "skip",
    warn: Callable[[str], None] | None = None,
) -> PreferenceSet:
    """Read preference pairs from one or more JSONL files (see the module docstring)."""
    if on_error not in ("skip", "fail"):
        raise ParamError("on_error", f"must be 'skip' or 'fail', got {on_error!r}")
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out = PreferenceSet()
    for src in map(str, sources):
        read = read_jsonl(src, parse_pair, on_error, out.errors, warn, "preference file")
        out.sources.append(src)
        for pair, shape in read:
            out.pairs.append(pair)
            out.shapes[shape] = out.shapes.get(shape, 0) + 1
    if not out.pairs:
        raise DataError(f"no usable preference pair in {', '.join(out.sources)}")
    return out


def is_preference_file(source: str | Path) -> bool:
    """Whether ``source``'s first JSON line is a preference pair (has chosen and rejected)."""
    path = Path(source).expanduser()
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    obj = json.loads(raw)
                    return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj
    except (OSError, ValueError):
        return False
    return False


def parse_pair(obj: Any) -> tuple[Pair, str]:
    """One JSON object as a :class:`Pair` and the name of its shape (:data:`SHAPES`);
    ValueError says what is wrong."""
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise ValueError('expected {"prompt", "chosen", "rejected"} or {"chosen", "rejected"}')
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:  # Anthropic HH: whole dialogues as text
            c_prompt, c_reply = _hh_turns(chosen, "chosen")
            r_prompt, r_reply = _hh_turns(rejected, "rejected")
            if c_prompt != r_prompt:
                raise ValueError("chosen and rejected dialogues differ before their last reply")
            return _pair(c_prompt, c_reply, r_reply), "hh"
        if not isinstance(prompt, str):
            raise ValueError("prompt must be text when chosen and rejected are text")
        return _pair([Message("user", prompt)], chosen, rejected), "standard"
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise ValueError("chosen and rejected must both be text or both be message lists")
    c_msgs, r_msgs = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if prompt is not None:
        if not isinstance(prompt, list):
            raise ValueError("prompt must be a message list when chosen and rejected are")
        prompt_msgs = _messages(prompt, "prompt")
        return _pair(prompt_msgs, _only_reply(c_msgs, "chosen"), _only_reply(r_msgs, "rejected")), (
            "conversational"
        )
    if not c_msgs or not r_msgs or c_msgs[:-1] != r_msgs[:-1]:
        raise ValueError("chosen and rejected conversations differ before their last reply")
    return _pair(
        c_msgs[:-1], _only_reply(c_msgs[-1:], "chosen"), _only_reply(r_msgs[-1:], "rejected")
    ), "implicit"


def _pair(prompt: list[Message], chosen: str, rejected: str) -> Pair:
    turns = [m for m in prompt if m.role != "system"]
    if not turns or turns[-1].role != "user":
        raise ValueError("the prompt must end with a user message")
    if not chosen.strip() or not rejected.strip():
        raise ValueError("chosen and rejected replies must not be empty")
    if chosen == rejected:
        raise ValueError("chosen and rejected replies are the same text")
    return Pair(prompt, chosen, rejected)


def _messages(items: list, what: str) -> list[Message]:
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'{what} message {i} needs "role" and "content"')
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{what} message {i} has unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{what} message {i} content is not text")
        out.append(Message(m["role"], m["content"]))
    return out


def _only_reply(msgs: list[Message], what: str) -> str:
    if len(msgs) != 1 or msgs[0].role != "assistant":
        raise ValueError(f"{what} must be one assistant message")
    return msgs[0].content


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_turns(text: str, what: str) -> tuple[list[Message], str]:
    """An Anthropic HH dialogue as (prompt messages, last assistant reply)."""
    parts = _HH_TURN.split(text)
    # parts: [before the first marker, speaker, text, speaker, text, ...]
    if len(parts) < 5 or parts[0].strip():
        raise ValueError(f'{what} is not a "\\n\\nHuman: ... \\n\\nAssistant: ..." dialogue')
    msgs = [
        Message("user" if who == "Human" else "assistant", said.strip())
        for who, said in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if msgs[-1].role != "assistant":
        raise ValueError(f"{what} does not end with an Assistant turn")
    return msgs[:-1], msgs[-1].content


# -- encoding ------------------------------------------------------------------------


@dataclass
class PairExample:
    """A pair as token ids: the shared prompt and each completion (reply + end token)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    types: tuple[list[int], list[int]] | None = None  # token types (sep format) of each whole row

    def __len__(self) -> int:
        """The longer of its two rows (what a batch is padded to)."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    @property
    def tokens(self) -> int:
        """Real tokens of both rows (the prompt is fed twice)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class PairStats:
    """What encoding did to the pairs."""

    pairs: int = 0  # pairs read
    kept: int = 0
    truncated: int = 0  # a completion cut to fit the context
    dropped: int = 0  # the prompt alone leaves no room for a reply, or it failed to encode
    drop_reasons: list[str] = field(default_factory=list)


def encode_pair(fmt: Any, pair: Pair, context: int, stats: PairStats) -> PairExample | None:
    """``pair`` as token ids with ``fmt`` (a :class:`~chatforge.conversation.formats.PromptFormat`),
    at most ``context`` tokens per row; None (counted in ``stats``) when it cannot fit."""
    stats.pairs += 1
    try:
        rows = [
            fmt.encode_for_training([*pair.prompt, Message("assistant", reply)])
            for reply in (pair.chosen, pair.rejected)
        ]
    except ValueError as e:
        return _drop_pair(stats, str(e))
    spans = []  # (start, end) of the final reply and its end token, in each row
    for _ids, _types, mask in rows:
        last = apply_train_on(mask, "last")
        if True not in last:
            return _drop_pair(stats, "the format gives the reply no tokens")
        spans.append((last.index(True), len(last) - last[::-1].index(True)))
    (c_ids, c_types, _), (r_ids, r_types, _) = rows
    # The prompt renders the same before either reply; a template that does not is refused.
    n_prompt = spans[0][0]
    if spans[1][0] != n_prompt or c_ids[:n_prompt] != r_ids[:n_prompt]:
        return _drop_pair(stats, "the prompt encodes differently before the two replies")
    if n_prompt >= context:
        return _drop_pair(stats, f"the prompt alone is {n_prompt} tokens (context {context})")
    room = context - n_prompt
    # What the template writes after the end token (ChatML's newline) is not learned.
    chosen, rejected = c_ids[n_prompt : spans[0][1]], r_ids[n_prompt : spans[1][1]]
    if len(chosen) > room or len(rejected) > room:
        stats.truncated += 1
        chosen, rejected = chosen[:room], rejected[:room]
    types = None
    if c_types is not None and r_types is not None:
        types = (c_types[: n_prompt + len(chosen)], r_types[: n_prompt + len(rejected)])
    stats.kept += 1
    return PairExample(c_ids[:n_prompt], chosen, rejected, types)


def _drop_pair(stats: PairStats, why: str) -> None:
    stats.dropped += 1
    if len(stats.drop_reasons) < 3:
        stats.drop_reasons.append(why)
    return None


def encode_pairs(
    fmt: Any, pairs: Sequence[Pair], context: int
) -> tuple[list[PairExample], PairStats]:
    """Every pair that fits, encoded (:func:`encode_pair`), with the counts."""
    stats = PairStats()
    out = [ex for p in pairs if (ex := encode_pair(fmt, p, context, stats)) is not None]
    return out, stats
