"""``ConversationModel.fit``: in-memory conversations through ``chatforge train``'s path.

``chatforge train`` reads files into a :class:`~chatforge.training.data.Dataset` of
conversations (``load_data``), then builds examples in the model's prompt format
(loss masks, windows of turns), packs them and trains with checkpoints. Here the
conversations come from iterables instead of files: each item is parsed by the same
parsers as a JSONL line (``parse_convmodel`` for a list of strings, ``parse_openai`` /
``parse_sharegpt`` for their dicts) into the same ``Dataset``, which the trainer reads
instead of files (``Trainer(datasets=...)``); everything after it is the trainer's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from chatforge.conversation.messages import Message, as_message
from chatforge.errors import ParamError
from chatforge.training.config import TrainConfig
from chatforge.training.data import (
    DataError,
    Dataset,
    parse_convmodel,
    parse_openai,
    parse_sharegpt,
)
from chatforge.training.trainer import Trainer, TrainResult

CONVMODEL_ARGS = {
    "accumulation_steps": "grad_accum",
    "warmup_steps": "warmup",
    "max_len": "context",
    "log_steps": "log_every",
    "show_progress_bar": "progress",
}
"""convmodel's ``fit`` argument names that mean one of our TrainConfig fields."""
_GIVEN_BY_FIT = {
    "data": "train_iterator",
    "valid": "valid_iterator",
    "output": "output_path",
    "model": "the model fit is called on (ConversationModel.from_pretrained)",
    "data_format": "the items themselves (lists of strings, messages, or their dicts)",
    "init": "`chatforge train --init gpt2` (fit fine-tunes a model)",
    "tokenizer": "the model's own tokenizer",
    "n_layer": "the model (fit fine-tunes it)",
    "n_embd": "the model (fit fine-tunes it)",
    "n_head": "the model (fit fine-tunes it)",
}
TRAIN_LABEL = "<train_iterator>"
VALID_LABEL = "<valid_iterator>"


def train_config(
    model: str, output_path: Any, fmt: str, has_valid: bool, args: dict
) -> TrainConfig:
    """The :class:`TrainConfig` for ``fit``'s ``train_args`` (unknown names: an error)."""
    if output_path is None:
        raise ParamError("output_path", ": fit writes the trained model there; give a directory")
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(_GIVEN_BY_FIT)
    given: dict[str, Any] = {}
    for name, value in args.items():
        if name in _GIVEN_BY_FIT:
            raise ParamError(name, f"is not a fit argument: it is given by {_GIVEN_BY_FIT[name]}")
        if name == "save_best_model":  # convmodel: keep the best validation loss, or the last
            key, value = "final", "best" if value else "last"
        else:
            key = CONVMODEL_ARGS.get(name, name)
        if key not in fields:
            raise ParamError(
                name,
                f"is not a training argument; use TrainConfig's {', '.join(sorted(fields))} "
                f"(or convmodel's {', '.join([*CONVMODEL_ARGS, 'save_best_model'])})",
            )
        if key in given:
            raise ParamError(name, f": {key} is given twice")
        given[key] = value
    given.setdefault("format", fmt)
    return TrainConfig(
        data=[TRAIN_LABEL],
        valid=VALID_LABEL if has_valid else None,
        output=str(output_path),
        model=model,
        **given,
    )


def conversation_of(item: Any) -> list[Message]:
    """One item as messages: a list of strings (turns alternate user/assistant), a list
    of messages, ``{"messages": ...}``, ``{"conversations": ...}``, or anything with a
    ``conversation`` attribute holding one of these (convmodel's ``ConversationExample``).
    Raises ValueError saying what is wrong."""
    conv = getattr(item, "conversation", item)
    if isinstance(conv, Mapping):
        if "messages" in conv:
            return parse_openai(conv)
        if "conversations" in conv:
            return parse_sharegpt(conv)
        raise ValueError('expected a list of strings, of messages, or {"messages": [...]}')
    if isinstance(conv, tuple):
        conv = list(conv)
    if isinstance(conv, list) and conv and all(isinstance(u, (Message, Mapping)) for u in conv):
        msgs = [as_message(u) for u in conv]
        if not any(m.role == "assistant" for m in msgs):
            raise ValueError("no assistant turn: nothing to learn from this conversation")
        return msgs
    return parse_convmodel(conv)


def dataset_of(items: Iterable[Any] | None, name: str, on_error: str) -> Dataset | None:
    """``items`` as a :class:`Dataset`; a bad item is skipped and counted (``on_error``
    ``"skip"``) or a :class:`DataError` naming it (``"fail"``)."""
    if items is None:
        return None
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise ParamError(name, f"must be an iterable of conversations, got {type(items).__name__}")
    label = TRAIN_LABEL if name == "train_iterator" else VALID_LABEL
    ds = Dataset("convmodel", sources=[label])
    for i, item in enumerate(items):
        try:
            ds.conversations.append(conversation_of(item))
        except ValueError as e:
            msg = f"{name} item {i}: {e}"
            if on_error == "fail":
                raise DataError(msg + " (on_error='skip' skips bad items)") from e
            ds.errors.append(msg)
    if not ds.conversations:
        first = f" (first problem: {ds.errors[0]})" if ds.errors else ""
        raise DataError(f"{name} holds no usable conversation{first}")
    return ds


def fit(
    model: str,
    fmt: str,
    train_iterator: Iterable[Any],
    valid_iterator: Iterable[Any] | None,
    output_path: Any,
    train_args: dict[str, Any],
) -> TrainResult:
    """Train ``model`` (a reference ``load_model`` takes) on in-memory conversations."""
    if train_iterator is None:
        raise ParamError("train_iterator", ": give the conversations to train on")
    cfg = train_config(model, output_path, fmt, valid_iterator is not None, train_args)
    train_ds = dataset_of(train_iterator, "train_iterator", cfg.on_error)
    valid_ds = dataset_of(valid_iterator, "valid_iterator", cfg.on_error)
    assert train_ds is not None
    return Trainer(cfg, datasets=(train_ds, valid_ds)).run()
