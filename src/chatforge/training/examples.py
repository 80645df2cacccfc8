"""Examples: tokenisation with loss masks, long conversations split by turns, and packing.

An :class:`Example` is one conversation (or one window of a long one, or one
chunk of a text corpus) as token ids plus a per-token *loss mask*: True where
the model should learn to produce the token. ``train_on`` picks the mask:

* ``assistant`` (default): tokens of every assistant turn and the token ending it;
* ``all``: every token;
* ``last``: the last assistant turn only.

Packing puts several examples into one row of at most ``context`` tokens
(first-fit decreasing), so almost no compute goes to padding. Examples in a row
must not attend to each other: :func:`collate` builds a block-diagonal causal
4D attention mask and ``position_ids`` that restart at 0 for each example.
Position ids alone are *not* enough on CPU: transformers only turns restarting
position ids into separate sequences for flash-attention, and with the sdpa or
eager kernels a packed row then attends across examples (checked by
``tests/test_training_examples.py``). The trainer verifies isolation on the
actual model before it trains (:func:`packing_isolates`) and falls back to one
example per row, padded, when the model does not honour the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from chatforge.conversation.formats import PromptFormat
from chatforge.conversation.messages import Message
from chatforge.errors import ParamError

TRAIN_ON = ("assistant", "all", "last")
IGNORE = -100


@dataclass
class Example:
    """Token ids, optional token types (sep format) and the loss mask of one training example."""

    ids: list[int]
    types: list[int] | None
    mask: list[bool]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_loss(self) -> int:
        # A token is learned when it is masked and has a token before it to predict it from.
        return sum(self.mask[1:])


@dataclass
class ExampleStats:
    """What tokenisation did to the data (``chatforge data inspect`` prints these)."""

    sources: int = 0  # conversations or texts read
    examples: int = 0  # examples kept (a long conversation may give several)
    tokens: int = 0  # tokens in kept examples
    loss_tokens: int = 0  # tokens that carry loss
    split: int = 0  # conversations split into several windows of turns
    truncated: int = 0  # examples cut to the context length (tokens lost)
    dropped: int = 0  # examples with no loss-carrying token (or failing to encode)
    drop_reasons: list[str] = field(default_factory=list)  # first few reasons


def apply_train_on(mask: list[bool], train_on: str) -> list[bool]:
    """The loss mask for ``train_on`` given the assistant mask of a conversation."""
    if train_on == "assistant":
        return list(mask)
    if train_on == "all":
        return [True] * len(mask)
    if train_on == "last":
        out = [False] * len(mask)
        i = len(mask) - 1
        while i >= 0 and not mask[i]:
            i -= 1
        while i >= 0 and mask[i]:
            out[i] = True
            i -= 1
        return out
    raise ParamError("train_on", f"must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")


def encode_conversation(
    fmt: PromptFormat, msgs: Sequence[Message], context: int, train_on: str, stats: ExampleStats
) -> list[Example]:
    """One conversation as examples of at most ``context`` tokens.

    A conversation longer than the context is split into windows of whole turns
    (each starting at a user turn, the system prompt repeated); a single window
    still too long is truncated and counted.
    """
    stats.sources += 1
    try:
        ids, types, mask = fmt.encode_for_training(msgs)
    except ValueError as e:
        _drop(stats, str(e))
        return []
    if len(ids) <= context:
        return _keep([Example(ids, types, apply_train_on(mask, train_on))], stats)
    stats.split += 1
    system = [m for m in msgs if m.role == "system"][:1]
    turns = [m for m in msgs if m.role != "system"]
    # Estimated cost of each turn: its text tokens plus the format's per-turn overhead.
    sizes = [len(fmt.tokenizer.encode(m.content, add_special_tokens=False)) for m in turns]
    overhead = max(1, (len(ids) - sum(sizes)) // max(1, len(turns) + len(system)))
    budget = context
    if system:
        budget -= overhead + len(fmt.tokenizer.encode(system[0].content, add_special_tokens=False))
    out: list[Example] = []
    start = 0
    while start < len(turns):
        end, used = start, 0
        while end < len(turns) and (end == start or used + sizes[end] + overhead <= budget):
            used += sizes[end] + overhead
            end += 1
        window = system + list(turns[start:end])
        if train_on != "all" and not any(m.role == "assistant" for m in window):
            start = end  # e.g. a trailing user turn with no reply: nothing to learn, no loss
            continue
        try:
            w_ids, w_types, w_mask = fmt.encode_for_training(window)
            while len(w_ids) > context and end - start > 2:  # the estimate was short
                end -= 1
                window = system + list(turns[start:end])
                w_ids, w_types, w_mask = fmt.encode_for_training(window)
        except ValueError as e:
            _drop(stats, str(e))
        else:
            # "last" learns the conversation's last reply only: earlier windows are left out.
            if train_on != "last" or end >= len(turns):
                w_mask = apply_train_on(w_mask, train_on)
                if len(w_ids) > context:
                    stats.truncated += 1
                    w_ids, w_mask = w_ids[:context], w_mask[:context]
                    w_types = w_types[:context] if w_types is not None else None
                out.append(Example(w_ids, w_types, w_mask))
        # The next window starts at a user turn; step back one turn if it would be a reply.
        nxt = end
        if nxt < len(turns) and turns[nxt].role == "assistant" and nxt - 1 > start:
            nxt -= 1
        start = nxt
    return _keep(out, stats)


def _drop(stats: ExampleStats, why: str) -> None:
    stats.dropped += 1
    if len(stats.drop_reasons) < 5:
        stats.drop_reasons.append(why)


def _keep(examples: list[Example], stats: ExampleStats) -> list[Example]:
    kept = []
    for ex in examples:
        if ex.n_loss == 0:
            _drop(stats, "no loss-carrying token (no assistant turn fits the context)")
            continue
        kept.append(ex)
        stats.examples += 1
        stats.tokens += len(ex)
        stats.loss_tokens += ex.n_loss
    return kept


def encode_texts(
    tokenizer: Any,
    texts: Sequence[str],
    context: int,
    stats: ExampleStats,
    on_item: Callable[[], None] | None = None,
):
    """A text corpus as context-length chunks (texts joined by EOS), every token learned."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stats.sources += 1
        stream += tokenizer.encode(text, add_special_tokens=False)
        if eos is not None:
            stream.append(eos)
        if on_item is not None:
            on_item()
    chunks = [stream[i : i + context] for i in range(0, len(stream), context)]
    return _keep([Example(c, None, [True] * len(c)) for c in chunks if len(c) > 1], stats)


def build_examples(
    fmt: PromptFormat,
    dataset: Any,
    context: int,
    train_on: str = "assistant",
    limit: int | None = None,
    on_item: Callable[[], None] | None = None,
) -> tuple[list[Example], ExampleStats]:
    """All examples of a :class:`~chatforge.training.data.Dataset`, and what happened to them.

    ``on_item()`` is called after each conversation or text (a progress bar)."""
    if train_on not in TRAIN_ON:
        raise ParamError("train_on", f"must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    stats = ExampleStats()
    if dataset.kind == "text":
        texts = dataset.texts[:limit] if limit else dataset.texts
        return encode_texts(fmt.tokenizer, texts, context, stats, on_item), stats
    out: list[Example] = []
    convs = dataset.conversations[:limit] if limit else dataset.conversations
    for conv in convs:
        out += encode_conversation(fmt, conv, context, train_on, stats)
        if on_item is not None:
            on_item()
    return out, stats


# -- packing -----------------------------------------------------------------------


@dataclass
class Row:
    """One training row: examples packed back to back (``bounds`` = their lengths)."""

    ids: list[int]
    types: list[int] | None
    targets: list[int]  # next-token targets, IGNORE where no loss (and at example ends)
    lengths: list[int]  # length of each packed example, in order

    def __len__(self) -> int:
        return len(self.ids)


def _targets(ex: Example) -> list[int]:
    # targets[t] = ids[t+1] when token t+1 carries loss; the last position predicts nothing,
    # so nothing is learned across the boundary to the next packed example.
    return [ex.ids[t + 1] if ex.mask[t + 1] else IGNORE for t in range(len(ex) - 1)] + [IGNORE]


def pack(examples: Sequence[Example], context: int, enabled: bool = True) -> list[Row]:
    """Rows of at most ``context`` tokens; first-fit decreasing, deterministic.

    With ``enabled=False`` each example is its own row (padded in :func:`collate`).
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i])
        if n > context:
            raise ValueError(f"example of {n} tokens is longer than the context ({context})")
        slot = next((b for b, f in enumerate(free) if f >= n), None) if enabled else None
        if slot is None:
            bins.append([i])
            free.append(context - n)
        else:
            bins[slot].append(i)
            free[slot] -= n
    rows = []
    for b in bins:
        exs = [examples[i] for i in sorted(b)]
        has_types = exs[0].types is not None
        rows.append(
            Row(
                ids=[t for e in exs for t in e.ids],
                types=[t for e in exs for t in e.types] if has_types else None,  # type: ignore[union-attr]
                targets=[t for e in exs for t in _targets(e)],
                lengths=[len(e) for e in exs],
            )
        )
    return rows


def collate(
    rows: Sequence[Row], pad_id: int, dtype: torch.dtype = torch.float32, spans: bool = False
) -> dict:
    """A batch: ``input_ids``/``position_ids``/``targets`` (B, T) and a 4D mask (B, 1, T, T).

    The mask is additive (0 = attend, dtype-min = blocked): causal inside each
    example, blocked across examples; padding (segment -1) only sees itself.
    With ``spans`` (a model on :mod:`~chatforge.training.packed_attention`) there
    is no mask: ``packed_spans`` gives each row's example lengths instead.
    """
    T = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    types = torch.zeros((B, T), dtype=torch.long) if rows[0].types is not None else None
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n] = torch.tensor(r.ids)
        targets[b, :n] = torch.tensor(r.targets)
        if types is not None:
            types[b, :n] = torch.tensor(r.types)
        off = 0
        for k, length in enumerate(r.lengths):
            pos[b, off : off + length] = torch.arange(length)
            seg[b, off : off + length] = k
            off += length
    batch: dict = {"input_ids": ids, "position_ids": pos, "targets": targets}
    if spans:
        batch["packed_spans"] = tuple(tuple(r.lengths) for r in rows)  # per row, lengths
    else:
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T, T)
        mask = torch.zeros(B, 1, T, T, dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        batch["attention_mask"] = mask
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def to_device(batch: dict, dev: Any) -> dict:
    """The batch's tensors moved to ``dev`` (``packed_spans`` is plain tuples)."""
    return {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of the model forward (everything but the targets)."""
    return {k: v for k, v in batch.items() if k != "targets"}


def loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed next-token cross-entropy over positions with a target; logits (B, T, V)."""
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


@torch.no_grad()
def packing_isolates(model: Any, vocab_size: int, uses_types: bool = False) -> bool:
    """True when a packed row's logits equal each example's logits computed alone."""
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, vocab_size, (5,), generator=g).tolist()
        b = torch.randint(0, vocab_size, (4,), generator=g).tolist()
        dev = next(model.parameters()).device

        def run(exs):
            t = [0] * sum(map(len, exs)) if uses_types else None
            row = Row(
                [x for e in exs for x in e], t, [IGNORE] * sum(map(len, exs)), list(map(len, exs))
            )
            batch = to_device(collate([row], 0), dev)
            return model(**model_inputs(batch)).logits[0].float()

        packed = run([a, b])
        alone = torch.cat([run([a]), run([b])])
        return bool(torch.allclose(packed, alone, atol=1e-4, rtol=1e-3))
    except Exception:  # a model that rejects 4D masks or position ids: do not pack
        return False
    finally:
        model.train(was_training)
