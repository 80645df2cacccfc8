"""The engine's runner over a :class:`~chatforge.models.fast.FastDecoder`.

The decoder's KV cache has one slot per sequence and decodes slots
``0..B-1`` as a batch. The scheduler thinks in rows (its running list), so the
runner keeps a handle per sequence and a handle -> slot map, and keeps the
occupied slots dense: when a sequence leaves, the sequence in the highest slot
moves into its place (one copy of one sequence's cache). Row order and slot
order may differ; decode permutes the (B,) tokens and (B, V) logits, which
costs nothing next to the forward pass.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from chatforge.models.fast import FastDecoder

# Padded prompt tokens prefilled in one pass (bounds the (B, H, T, T) attention work).
PREFILL_GROUP_TOKENS = 4096


@dataclass
class FastState:
    """The sequences of one batch, in row order."""

    handles: list[int]


class FastRunner:
    """Implements the :class:`~chatforge.generation.runner.Runner` interface."""

    def __init__(self, model: FastDecoder) -> None:
        self.model = model
        self.cache = model.new_cache()  # this runner's own: engines never share a cache
        self._slot_of: dict[int, int] = {}  # handle -> slot
        self._handle_at: dict[int, int] = {}  # slot -> handle
        self._ids = itertools.count()

    @property
    def in_use(self) -> int:
        return len(self._slot_of)

    def _allocate(self) -> tuple[int, int]:
        handle, slot = next(self._ids), len(self._slot_of)
        self._slot_of[handle] = slot
        self._handle_at[slot] = handle
        return handle, slot

    @torch.inference_mode()
    def _free(self, handle: int) -> None:
        slot = self._slot_of.pop(handle)
        last = len(self._slot_of)  # the highest occupied slot before this removal
        del self._handle_at[slot]
        if slot != last:
            moved = self._handle_at.pop(last)
            self.cache.move(last, slot)
            self._slot_of[moved] = slot
            self._handle_at[slot] = moved
        else:
            self.cache.lens[slot] = 0

    def prefill(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> tuple[Tensor, FastState]:
        """Prefill the (left-padded) prompts into fresh, consecutive slots; logits (B, V).

        Prompts are re-padded on the right and run together in groups of at most
        ``PREFILL_GROUP_TOKENS`` padded tokens (one weight pass per group).
        """
        prompts = [input_ids[i][attention_mask[i].bool()] for i in range(input_ids.shape[0])]
        types = None
        if token_type_ids is not None:
            types = [token_type_ids[i][attention_mask[i].bool()] for i in range(len(prompts))]
        handles, logits = [], []
        start = 0
        while start < len(prompts):
            end = start + 1
            longest = len(prompts[start])
            while end < len(prompts):
                longest2 = max(longest, len(prompts[end]))
                if longest2 * (end - start + 1) > PREFILL_GROUP_TOKENS:
                    break
                longest, end = longest2, end + 1
            group = prompts[start:end]
            ids = torch.zeros(len(group), longest, dtype=torch.long)  # (B, T) right-padded
            tt = None if types is None else torch.zeros_like(ids)
            for j, p in enumerate(group):
                ids[j, : len(p)] = p
                if tt is not None:
                    tt[j, : len(p)] = types[start + j]
            slots = []
            for _ in group:
                handle, slot = self._allocate()
                handles.append(handle)
                slots.append(slot)
            lengths = torch.tensor([len(p) for p in group], dtype=torch.long)
            logits.append(self.model.prefill_batch(ids, lengths, slots[0], self.cache, tt))
            start = end
        return torch.cat(logits), FastState(handles)

    def decode(self, state: FastState, tokens: Tensor, token_types: Tensor | None = None) -> Tensor:
        slots = torch.tensor([self._slot_of[h] for h in state.handles], dtype=torch.long)
        b = len(state.handles)
        if b != self.in_use:
            raise RuntimeError("decode needs every occupied slot in the batch")
        identity = bool((slots == torch.arange(b)).all())
        if identity:
            return self.model.decode(tokens, self.cache, token_types)
        # Put the rows in slot order, decode, and give the logits back in row order.
        by_slot = torch.empty_like(tokens)
        by_slot[slots] = tokens
        types = None
        if token_types is not None:
            types = torch.empty_like(token_types)
            types[slots] = token_types
        return self.model.decode(by_slot, self.cache, types)[slots]

    def select(self, state: FastState, rows: Tensor) -> FastState:
        keep = [state.handles[int(r)] for r in rows]
        for h in set(state.handles) - set(keep):
            self._free(h)
        return FastState(keep)

    def merge(self, a: FastState, b: FastState) -> FastState:
        return FastState(a.handles + b.handles)

    def release_all(self) -> None:
        """Forget every sequence (after an error left a batch half-done)."""
        for h in list(self._slot_of):
            self._free(h)
