"""``ConversationTokenizer``: a conversation as ``input_ids``, ``token_type_ids`` and
``attention_mask``, laid out by the model's prompt format (convmodel's table for sep).

For ``["Hello", "How are you"]`` in the sep format::

    token           <sep>  Hello  <sep>  How  are  you  <sep>
    token_type_ids    0      0      1     1    1    1     0
    attention_mask    1      1      1     1    1    1     1

Each utterance is a block ``<sep> + tokens`` whose type is the utterance's parity; the
final ``<sep>`` (type ``len(context) % 2``) is where the reply starts, and the reply's
tokens take that type. This is :class:`~chatforge.conversation.formats.SepFormat`'s own
encoding, the prompt the engine is given, not a second implementation of it.

Formats without token types of their own (a chat template, eos) get them from the turn
parity too: the tokens of the ``i``-th non-system message have type ``i % 2``; what the
template writes before the first turn and system messages have type 0; the generation
prompt after the last turn has the reply's type ``n_turns % 2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from chatforge.conversation.formats import (
    ChatTemplateFormat,
    PromptFormat,
    detect_format,
    ensure_sep_token,
    get_format,
)
from chatforge.conversation.messages import Message, as_message
from chatforge.errors import InputError, ParamError

KEYS = ("input_ids", "token_type_ids", "attention_mask")


def context_messages(context: Sequence[Any]) -> list[Message]:
    """A context as messages: strings alternate roles so that the last is the user's
    (the reply is the assistant's); :class:`Message`\\ s and ``{"role", "content"}``
    dicts are taken as they are. Strings and messages cannot be mixed."""
    if isinstance(context, (str, bytes)) or not isinstance(context, Sequence):
        raise InputError(
            "a context is a list of utterances (strings) or of messages, "
            f"got {type(context).__name__}"
        )
    if not context:
        raise InputError("a context needs at least one utterance")
    if all(isinstance(u, str) for u in context):
        n = len(context)
        return [
            Message("user" if (n - 1 - i) % 2 == 0 else "assistant", u)
            for i, u in enumerate(context)
        ]
    if any(isinstance(u, str) for u in context):
        raise InputError("a context holds either strings or messages, not both")
    for i, u in enumerate(context):
        if not isinstance(u, (Message, Mapping)):
            raise InputError(
                f"context item {i} is {type(u).__name__}; expected a string, a Message "
                'or {"role": ..., "content": ...}'
            )
    return [as_message(u) for u in context]


def default_format(tokenizer: Any, recorded: str | None = None) -> str:
    """convmodel's rule on top of ours: the recorded format, else the tokenizer's chat
    template, else sep (``<sep>`` is added when the tokenizer has none; never eos)."""
    name = detect_format(tokenizer, recorded)
    return "sep" if name == "eos" and recorded is None else name


def turn_types(fmt: PromptFormat, msgs: list[Message], ids: list[int]) -> list[int]:
    """Token types from the turn parity for a format that has none (see the module doc).

    ``ids`` is ``fmt.encode(msgs)``'s prompt. Turn boundaries come from rendering the
    prefixes ``msgs[:k]``: as text for a chat template (tokens are placed by their
    character offsets), as tokens otherwise. A format whose prefixes are not prefixes
    of the whole prompt cannot be split by turn: that is an :class:`InputError`.
    """
    ends: list[int] = []  # where message k's rendering ends (chars or tokens)
    if isinstance(fmt, ChatTemplateFormat):
        tok = fmt.tokenizer

        def render(m: list[Message], gen: bool) -> str:
            return tok.apply_chat_template(
                [x.to_dict() for x in m], tokenize=False, add_generation_prompt=gen
            )

        full = render(msgs, True)
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != list(ids):
            raise InputError(
                "this tokenizer's chat template does not tokenise as its rendered text does, "
                "so its tokens cannot be given turn types"
            )
        positions = [start for start, _ in enc["offset_mapping"]]
        for k in range(1, len(msgs) + 1):
            text = render(msgs[:k], False)
            if not full.startswith(text):
                raise _not_prefix()
            ends.append(len(text))
    else:
        positions = list(range(len(ids)))
        for k in range(1, len(msgs) + 1):
            part = fmt.encode(msgs[:k], add_generation_prompt=False).input_ids
            if list(ids[: len(part)]) != list(part):
                raise _not_prefix()
            ends.append(len(part))
    kinds: list[int] = []  # the type of each message's span
    turn = 0
    for m in msgs:
        kinds.append(0 if m.role == "system" else turn % 2)
        turn += m.role != "system"
    reply = turn % 2
    types = []
    k = 0
    for pos in positions:
        while k < len(ends) and pos >= ends[k]:
            k += 1
        types.append(kinds[k] if k < len(kinds) else reply)
    return types


def _not_prefix() -> InputError:
    return InputError(
        "this prompt format renders earlier turns differently when later turns follow, "
        "so its tokens cannot be given turn types"
    )


class ConversationTokenizer:
    """A Hugging Face tokenizer that encodes conversations (convmodel's interface).

    ``tok(["Hello", "How are you"])`` is a dict of ``input_ids``, ``token_type_ids``
    and ``attention_mask`` (all ones); a list of contexts is a padded batch (see
    :meth:`__call__`). ``format`` is ``"sep"`` (adds ``<sep>`` to the tokenizer when it
    has none), ``"chat_template"``, ``"eos"``, or None for :func:`default_format`.
    """

    def __init__(self, tokenizer: Any, format: str | None = None, *, recorded: str | None = None):
        name = format or default_format(tokenizer, recorded)
        if name == "sep":
            ensure_sep_token(tokenizer)
        self.hf_tokenizer = tokenizer
        self.prompt_format: PromptFormat = get_format(name, tokenizer)

    @classmethod
    def from_format(cls, fmt: PromptFormat) -> ConversationTokenizer:
        """Wrap a prompt format that exists already (a loaded model's ``format``)."""
        self = cls.__new__(cls)
        self.hf_tokenizer = fmt.tokenizer
        self.prompt_format = fmt
        return self

    @classmethod
    def from_pretrained(
        cls, path_or_alias: str | Path, format: str | None = None
    ) -> ConversationTokenizer:
        """The tokenizer of a model directory, tokenizer directory or alias (``smollm2``);
        the format a chatforge model directory records is used unless ``format`` is given."""
        from transformers import AutoTokenizer

        from chatforge.errors import ModelLoadError
        from chatforge.models.loading import resolve
        from chatforge.models.meta import ModelMeta

        path = Path(str(path_or_alias)).expanduser()
        if path.is_dir() and not (path / "config.json").exists():
            directory = path  # a bare tokenizer directory (`chatforge tokenizer train`)
        else:
            directory = resolve(str(path_or_alias))[0]
        try:
            tok = AutoTokenizer.from_pretrained(directory)
        except Exception as e:
            raise ModelLoadError(f"could not load the tokenizer in {directory}: {e}") from e
        meta = ModelMeta.read(directory)
        return cls(tok, format, recorded=meta.prompt_format if meta else None)

    # -- what the format says ---------------------------------------------------------

    @property
    def format(self) -> str:
        """The prompt format's name: ``sep``, ``chat_template`` or ``eos``."""
        return self.prompt_format.name

    @property
    def sep_token_id(self) -> int | None:
        """The id of ``<sep>`` in the sep format, else None."""
        return getattr(self.prompt_format, "sep_id", None)

    @property
    def sep_token(self) -> str | None:
        sep = self.sep_token_id
        return None if sep is None else self.hf_tokenizer.convert_ids_to_tokens(sep)

    @property
    def pad_token_id(self) -> int:
        """Padding of a batch: the tokenizer's pad token, else EOS, else 0."""
        tok = self.hf_tokenizer
        for tid in (tok.pad_token_id, tok.eos_token_id):
            if isinstance(tid, int):
                return tid
        return 0

    def __len__(self) -> int:
        return len(self.hf_tokenizer)

    # -- encoding ---------------------------------------------------------------------

    def encode_context(self, context: Sequence[Any]) -> dict[str, list[int]]:
        """One context as ``input_ids``, ``token_type_ids`` and ``attention_mask`` lists."""
        msgs = context_messages(context)
        enc = self.prompt_format.encode(msgs, add_generation_prompt=True)
        ids = list(enc.input_ids)
        types = enc.token_type_ids
        if types is None:
            types = turn_types(self.prompt_format, msgs, ids)
        return {"input_ids": ids, "token_type_ids": list(types), "attention_mask": [1] * len(ids)}

    def __call__(
        self,
        context: Sequence[Any],
        return_tensors: str | None = None,
        padding_side: str = "right",
    ) -> dict[str, Any]:
        """Encode one context, or a batch (a list of contexts).

        One context gives flat lists (``return_tensors="pt"``: ``(1, T)`` tensors). A
        batch gives one list per context, padded to the longest with
        :attr:`pad_token_id`, token type 0 and attention 0, on ``padding_side``
        (``"right"`` for training; ``"left"`` for a batched ``generate`` of your own).
        """
        if padding_side not in ("right", "left"):
            raise ParamError("padding_side", f"must be 'right' or 'left', got {padding_side!r}")
        if return_tensors not in (None, "pt"):
            raise ParamError("return_tensors", f"must be None or 'pt', got {return_tensors!r}")
        batched = (
            isinstance(context, Sequence)
            and not isinstance(context, str)
            and bool(context)
            and all(isinstance(c, (list, tuple)) for c in context)
        )
        if not batched:
            one = self.encode_context(context)
            if return_tensors == "pt":
                import torch

                return {k: torch.tensor([v]) for k, v in one.items()}
            return one
        rows = [self.encode_context(c) for c in context]
        width = max(len(r["input_ids"]) for r in rows)
        pads = {"input_ids": self.pad_token_id, "token_type_ids": 0, "attention_mask": 0}
        out: dict[str, Any] = {k: [] for k in KEYS}
        for r in rows:
            for k in KEYS:
                fill = [pads[k]] * (width - len(r[k]))
                out[k].append(r[k] + fill if padding_side == "right" else fill + r[k])
        if return_tensors == "pt":
            import torch

            return {k: torch.tensor(v) for k, v in out.items()}
        return out

    # -- pass-through -----------------------------------------------------------------

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        """Token ids of one text (no special tokens unless asked)."""
        kwargs.setdefault("add_special_tokens", False)
        return list(self.hf_tokenizer.encode(text, **kwargs))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf_tokenizer.convert_ids_to_tokens(list(ids)))

    def save_pretrained(self, directory: str | Path) -> Any:
        return self.hf_tokenizer.save_pretrained(directory)

    def __repr__(self) -> str:
        return (
            f"ConversationTokenizer(format={self.format!r}, vocab={len(self)}, "
            f"sep_token={self.sep_token!r})"
        )
