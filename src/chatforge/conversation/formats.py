"""The prompt formats: the tokenizer's chat template, sep (convmodel), eos (DialoGPT)
and text (no template: the prompt is continued as plain text).

A format turns messages into prompt token ids (``encode``), says which tokens
end a reply (``stop_token_ids``, and ``stop_strings``) and, for training, which
tokens belong to assistant turns (``encode_for_training``). ``start`` is the prompt
of an empty conversation: the model's start token (BOS, ``<sep>`` or EOS, as the
format says), from which a reply is sampled as from a freshly pretrained model.

The sep and eos formats have no system role: a system message is ignored.
In both, ``add_generation_prompt`` changes nothing, because the token that
ends the last turn (``<sep>`` / EOS) is also the one a reply starts after.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from chatforge.conversation.messages import Message, as_message
from chatforge.errors import InputError

SEP_TOKEN = "<sep>"
# End-of-turn tokens of common chat templates (ChatML, Llama 3, Phi-3); a reply
# stops at any of them that exists in the vocabulary.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")

MsgLike = Message | Mapping[str, Any]


@dataclass
class Encoded:
    """A prompt as token ids."""

    input_ids: list[int]
    """The prompt's token ids."""
    token_type_ids: list[int] | None
    """Per-token type ids (sep format only), else ``None``."""
    reply_token_type: int | None
    """Token type id that the generated reply tokens take (sep format), else ``None``."""

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptFormat(ABC):
    """Turns messages into token ids for one model family's prompt convention."""

    name: ClassVar[str]
    renders_system: ClassVar[bool] = True
    """Whether a system message is part of the prompt (sep and eos ignore it)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def encode(self, messages: Sequence[MsgLike], add_generation_prompt: bool = True) -> Encoded:
        """The prompt for ``messages``; with ``add_generation_prompt`` ready for a reply."""

    @abstractmethod
    def stop_token_ids(self) -> set[int]:
        """Token ids that end a reply (never part of its text)."""

    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends a reply (never part of it), besides the request's own stops."""
        return ()

    def start(self) -> Encoded:
        """The prompt of an empty conversation: the start token (BOS, else EOS)."""
        for attr in ("bos_token_id", "eos_token_id"):
            ids = _ids(getattr(self.tokenizer, attr, None))
            if ids:
                return Encoded([min(ids)], None, None)
        raise InputError(
            "an empty prompt needs a start token (BOS or EOS); this tokenizer has none"
        )

    def is_empty(self, messages: Sequence[MsgLike]) -> bool:
        """True when ``messages`` hold no text this format renders (the prompt is then
        :meth:`start`)."""
        return not any(
            m.content.strip()
            for m in map(as_message, messages)
            if self.renders_system or m.role != "system"
        )

    @abstractmethod
    def encode_for_training(
        self, messages: Sequence[MsgLike]
    ) -> tuple[list[int], list[int] | None, list[bool]]:
        """``(input_ids, token_type_ids, assistant_mask)`` for a whole conversation.

        ``assistant_mask[i]`` is True for tokens of assistant messages and the
        token that ends each of them (``<sep>`` / EOS / ``<|im_end|>``), i.e. the
        tokens a model should learn to produce.
        """

    def _text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def _vocab_id(tokenizer: Any, token: str) -> int | None:
    # convert_tokens_to_ids maps unknown tokens to unk (which may be a real id), so
    # look the token up in the vocabulary instead.
    return tokenizer.get_vocab().get(token)


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(e) for e in value} if isinstance(value, (list, tuple, set)) else {int(value)}


def _eos_ids(tokenizer: Any) -> set[int]:
    return _ids(getattr(tokenizer, "eos_token_id", None))


class ChatTemplateFormat(PromptFormat):
    """The tokenizer's own chat template (``apply_chat_template``), tokenised as HF does."""

    name = "chat_template"

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "the tokenizer has no chat template; use the 'sep' or 'eos' format instead"
            )
        super().__init__(tokenizer)
        vocab = tokenizer.get_vocab()
        self._stop = _eos_ids(tokenizer) | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}

    def _render(self, messages: Sequence[MsgLike], add_generation_prompt: bool) -> str:
        dicts = [as_message(m).to_dict() for m in messages]
        return self.tokenizer.apply_chat_template(
            dicts, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, messages: Sequence[MsgLike], add_generation_prompt: bool = True) -> Encoded:
        dicts = [as_message(m).to_dict() for m in messages]
        out = self.tokenizer.apply_chat_template(
            dicts, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
        )
        ids = out["input_ids"] if isinstance(out, Mapping) else out  # v5 may hand back a dict
        return Encoded(list(ids), None, None)

    def stop_token_ids(self) -> set[int]:
        return set(self._stop)

    def encode_for_training(
        self, messages: Sequence[MsgLike]
    ) -> tuple[list[int], list[int] | None, list[bool]]:
        """Find assistant spans by rendering prefixes of the conversation.

        For the assistant message at index ``i``, the text rendered for
        ``messages[:i]`` with a generation prompt must be a prefix of the full
        text, and so must the text for ``messages[:i+1]``; the characters between
        them are the reply (plus whatever the template writes after it). Tokens
        starting in that range are marked, then cut after the last stop token in
        the span, so ChatML's ``<|im_end|>`` is kept but the newline after it is not.

        Limitations: a template that renders earlier turns differently once later
        ones follow (e.g. one that strips reasoning from old replies) is refused
        with ValueError; a template without a generation prompt puts the assistant
        header inside the span; a conversation may not start with an assistant message.
        """
        msgs = [as_message(m) for m in messages]
        full = self._render(msgs, add_generation_prompt=False)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        starts = [s for s, _ in enc["offset_mapping"]]
        mask = [False] * len(ids)
        for i, m in enumerate(msgs):
            if m.role != "assistant":
                continue
            if i == 0:
                raise InputError(
                    "the chat template format cannot mark a reply that opens the conversation; "
                    "start it with a user (or system) message"
                )
            before = self._render(msgs[:i], add_generation_prompt=True)
            upto = self._render(msgs[: i + 1], add_generation_prompt=False)
            if not (full.startswith(before) and full.startswith(upto)):
                raise InputError(
                    "this chat template renders earlier turns differently when later turns "
                    "follow, so assistant tokens cannot be located; train on one reply per example"
                )
            span = [j for j, s in enumerate(starts) if len(before) <= s < len(upto)]
            ends = [j for j in span if ids[j] in self._stop]
            if ends:
                span = [j for j in span if j <= ends[-1]]
            for j in span:
                mask[j] = True
        return ids, None, mask


class SepFormat(PromptFormat):
    """convmodel style: ``<sep> u1 <sep> a1 <sep>`` with token types alternating per turn.

    Each non-system message is a block ``[<sep>] + tokens(text)`` whose token
    types are all ``turn_index % 2``; a final ``<sep>`` (type ``n_turns % 2``)
    ends the last turn and is where a reply starts. The reply takes token type
    ``n_turns % 2`` and ends at the next ``<sep>``. System messages are ignored.
    """

    name = "sep"
    renders_system = False

    def __init__(self, tokenizer: Any) -> None:
        sep = _vocab_id(tokenizer, SEP_TOKEN)
        if sep is None:
            raise InputError(
                f"the tokenizer has no {SEP_TOKEN!r} token, which the sep format needs; "
                "call chatforge.conversation.ensure_sep_token(tokenizer, model) first "
                "(chatforge adds it when it trains a sep-format model)"
            )
        super().__init__(tokenizer)
        self.sep_id = sep

    def encode(self, messages: Sequence[MsgLike], add_generation_prompt: bool = True) -> Encoded:
        ids, types, _ = self.encode_for_training(messages)
        return Encoded(ids, types, types[-1])  # the final <sep> has the reply's type

    def stop_token_ids(self) -> set[int]:
        # EOS as well: a GPT-2 keeps its pre-training habit of ending text with it.
        return {self.sep_id} | _eos_ids(self.tokenizer)

    def start(self) -> Encoded:
        """``<sep>`` (type 0): a conversation's first turn starts after it."""
        return Encoded([self.sep_id], [0], 0)

    def encode_for_training(
        self, messages: Sequence[MsgLike]
    ) -> tuple[list[int], list[int] | None, list[bool]]:
        ids: list[int] = []
        types: list[int] = []
        mask: list[bool] = []
        turns = [m for m in map(as_message, messages) if m.role != "system"]
        prev_assistant = False
        for i, msg in enumerate(turns):
            block = [self.sep_id, *self._text_ids(msg.content)]
            # The block's leading <sep> ends the previous turn: learned if that was a reply.
            mask += [prev_assistant] + [msg.role == "assistant"] * (len(block) - 1)
            ids += block
            types += [i % 2] * len(block)
            prev_assistant = msg.role == "assistant"
        ids.append(self.sep_id)
        types.append(len(turns) % 2)
        mask.append(prev_assistant)
        return ids, types, mask


class EosFormat(PromptFormat):
    """DialoGPT style: ``u1 EOS a1 EOS u2 EOS``; the reply follows the last EOS and ends at EOS.

    System messages are ignored.
    """

    name = "eos"
    renders_system = False

    def __init__(self, tokenizer: Any) -> None:
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise InputError("the eos format needs an EOS token; this tokenizer has none")
        super().__init__(tokenizer)
        self.eos_id = min(_eos_ids(tokenizer))

    def encode(self, messages: Sequence[MsgLike], add_generation_prompt: bool = True) -> Encoded:
        ids, _, _ = self.encode_for_training(messages)
        return Encoded(ids, None, None)

    def stop_token_ids(self) -> set[int]:
        return _eos_ids(self.tokenizer)

    def start(self) -> Encoded:
        """EOS: every turn starts after one."""
        return Encoded([self.eos_id], None, None)

    def encode_for_training(
        self, messages: Sequence[MsgLike]
    ) -> tuple[list[int], list[int] | None, list[bool]]:
        ids: list[int] = []
        mask: list[bool] = []
        for m in map(as_message, messages):
            if m.role == "system":
                continue
            piece = [*self._text_ids(m.content), self.eos_id]
            ids += piece
            mask += [m.role == "assistant"] * len(piece)
        return ids, None, mask


class TextFormat(PromptFormat):
    """Plain text, for models trained on a text corpus: no template, no separators.

    The messages are one growing text, as in a notebook: each user (or system)
    message is appended on a new line (directly where the text is empty or already
    ends with a newline), each reply directly after the text it continues. The
    prompt is that text's tokens as the tokenizer encodes it (the ones
    ``/v1/completions`` sends for the same text); an empty text is :meth:`start`. A
    reply ends at EOS or at a blank line (two newlines, :attr:`BLANK_LINE`).
    """

    name = "text"
    BLANK_LINE: ClassVar[str] = "\n\n"

    @staticmethod
    def pieces(messages: Sequence[MsgLike]) -> list[tuple[str, str]]:
        """``(role, piece)`` per message: the text each adds, joiner included."""
        out: list[tuple[str, str]] = []
        text_ends = ""  # the end of the text so far ("" while it is empty)
        for m in map(as_message, messages):
            joiner = "" if m.role == "assistant" or text_ends in ("", "\n") else "\n"
            piece = joiner + m.content
            out.append((m.role, piece))
            text_ends = piece[-1:] or text_ends
        return out

    @classmethod
    def text(cls, messages: Sequence[MsgLike]) -> str:
        """The one text ``messages`` make."""
        return "".join(piece for _, piece in cls.pieces(messages))

    def encode(self, messages: Sequence[MsgLike], add_generation_prompt: bool = True) -> Encoded:
        text = self.text(messages)
        if not text.strip():
            return self.start()
        return Encoded(list(self.tokenizer.encode(text)), None, None)

    def stop_token_ids(self) -> set[int]:
        return _eos_ids(self.tokenizer)

    def stop_strings(self) -> tuple[str, ...]:
        return (self.BLANK_LINE,)

    def encode_for_training(
        self, messages: Sequence[MsgLike]
    ) -> tuple[list[int], list[int] | None, list[bool]]:
        """The text's pieces tokenised one by one (assistant pieces learned), then EOS
        (learned when a reply ends the text)."""
        ids: list[int] = []
        mask: list[bool] = []
        for role, piece in self.pieces(messages):
            toks = self._text_ids(piece)
            ids += toks
            mask += [role == "assistant"] * len(toks)
        eos = _eos_ids(self.tokenizer)
        if eos:
            ids.append(min(eos))
            mask.append(bool(mask) and mask[-1])
        return ids, None, mask


FORMATS: dict[str, type[PromptFormat]] = {
    ChatTemplateFormat.name: ChatTemplateFormat,
    SepFormat.name: SepFormat,
    EosFormat.name: EosFormat,
    TextFormat.name: TextFormat,
}


def ensure_sep_token(tokenizer: Any, model: Any = None) -> int:
    """Add ``<sep>`` as a special token when absent; grow ``model``'s embeddings to match.

    Returns the id of ``<sep>``.
    """
    if _vocab_id(tokenizer, SEP_TOKEN) is None:
        params = inspect.signature(tokenizer.add_special_tokens).parameters
        if "replace_extra_special_tokens" in params:  # transformers 5
            tokenizer.add_special_tokens(
                {"extra_special_tokens": [SEP_TOKEN]}, replace_extra_special_tokens=False
            )
        else:  # transformers 4
            tokenizer.add_special_tokens(
                {"additional_special_tokens": [SEP_TOKEN]},
                replace_additional_special_tokens=False,
            )
    if model is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    sep = _vocab_id(tokenizer, SEP_TOKEN)
    assert sep is not None
    return sep


def detect_format(tokenizer: Any, recorded: str | None = None) -> str:
    """The format to use: ``recorded`` (from a model dir's chatforge.json) wins, then
    ``chat_template`` if the tokenizer has one, ``sep`` if ``<sep>`` is in the vocabulary,
    else ``eos``."""
    if recorded is not None:
        _check_name(recorded)
        return recorded
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplateFormat.name
    if _vocab_id(tokenizer, SEP_TOKEN) is not None:
        return SepFormat.name
    return EosFormat.name


def get_format(name: str, tokenizer: Any) -> PromptFormat:
    """The :class:`PromptFormat` called ``name`` for ``tokenizer``."""
    _check_name(name)
    return FORMATS[name](tokenizer)


def _check_name(name: str) -> None:
    if name not in FORMATS:
        raise InputError(f"unknown prompt format {name!r}; use one of {', '.join(FORMATS)}")
