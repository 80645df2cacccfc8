"""Model runners: what the engine needs from a model, one forward at a time.

The engine owns the loop (prefill, sample, decode step, stop rules); a runner
owns the forward pass and the KV cache. :class:`HFRunner` drives any
Hugging Face causal LM; a faster implementation (own model code, quantised
weights, a preallocated cache) can implement the same three methods.

Batches are left-padded so that every row's newest token is in the last
column: the LM head is then computed for that column only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class Runner(Protocol):
    """The forward-pass interface the engine drives."""

    def prefill(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None
    ) -> tuple[Tensor, Any]:
        """Run the prompts (B, T) and return last-position logits (B, V) and a cache state."""
        ...

    def decode(self, state: Any, tokens: Tensor, token_types: Tensor | None) -> Tensor:
        """Append one token per row (B,) and return the next logits (B, V)."""
        ...

    def select(self, state: Any, rows: Tensor) -> Any:
        """Keep only ``rows`` (finished sequences leave the batch); return the new state."""
        ...

    def merge(self, a: Any, b: Any) -> Any:
        """One state holding the rows of ``a`` then those of ``b`` (new sequences join)."""
        ...


@dataclass
class HFState:
    """Per-batch decoding state of :class:`HFRunner`."""

    cache: Any  # transformers DynamicCache
    attention_mask: Tensor  # (B, capacity) long; columns [:length] are in use
    length: int  # columns filled so far (prompt + generated)
    positions: Tensor  # (B,) position id of each row's newest token


class HFRunner:
    """Runs a transformers causal LM with its own DynamicCache."""

    def __init__(self, model: Any, max_new_tokens_hint: int = 256) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.takes_token_types = "token_type_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params
        self.takes_position_ids = "position_ids" in params
        self.device = next(model.parameters()).device
        self.capacity_hint = max_new_tokens_hint

    def _forward(self, **kw: Any) -> Tensor:
        if self.takes_logits_to_keep:
            kw["logits_to_keep"] = 1
        if not self.takes_position_ids:
            kw.pop("position_ids", None)
        out = self.model(**kw, use_cache=True, return_dict=True)
        return out.logits[:, -1, :].float(), out.past_key_values  # (B, V)

    @torch.inference_mode()
    def prefill(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> tuple[Tensor, HFState]:
        from transformers import DynamicCache

        b, t = input_ids.shape
        # Position ids as transformers' generate computes them for left padding.
        positions = attention_mask.long().cumsum(-1) - 1
        positions.masked_fill_(attention_mask == 0, 1)
        kw: dict[str, Any] = dict(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=DynamicCache(),
        )
        if token_type_ids is not None and self.takes_token_types:
            kw["token_type_ids"] = token_type_ids.to(self.device)
        logits, cache = self._forward(**kw)
        mask = torch.zeros(b, t + self.capacity_hint, dtype=torch.long, device=self.device)
        mask[:, :t] = attention_mask
        return logits, HFState(cache, mask, t, positions[:, -1].to(self.device))

    @torch.inference_mode()
    def decode(self, state: HFState, tokens: Tensor, token_types: Tensor | None = None) -> Tensor:
        if state.length >= state.attention_mask.shape[1]:  # grow rarely, in big steps
            extra = torch.zeros_like(state.attention_mask)
            state.attention_mask = torch.cat([state.attention_mask, extra], dim=1)
        state.attention_mask[:, state.length] = 1
        state.length += 1
        state.positions = state.positions + 1
        kw: dict[str, Any] = dict(
            input_ids=tokens.view(-1, 1).to(self.device),  # (B, 1)
            attention_mask=state.attention_mask[:, : state.length],
            position_ids=state.positions.view(-1, 1),
            past_key_values=state.cache,
        )
        if token_types is not None and self.takes_token_types:
            kw["token_type_ids"] = token_types.view(-1, 1).to(self.device)
        logits, state.cache = self._forward(**kw)
        return logits

    def select(self, state: HFState, rows: Tensor) -> HFState:
        rows = rows.to(self.device)
        state.cache.batch_select_indices(rows)
        state.attention_mask = state.attention_mask.index_select(0, rows)
        state.positions = state.positions.index_select(0, rows)
        # Columns that are padding in every remaining row cost attention for nothing.
        used = state.attention_mask[:, : state.length].any(dim=0)  # (L,)
        first = int(used.float().argmax()) if bool(used.any()) else 0
        if first > 0:
            self._crop_left(state, first)
        return state

    @staticmethod
    def _layers(cache: Any) -> list[Any]:
        return list(cache.layers)

    def _crop_left(self, state: HFState, n: int) -> None:
        for layer in self._layers(state.cache):
            layer.keys = layer.keys[:, :, n:]
            layer.values = layer.values[:, :, n:]
        state.attention_mask = state.attention_mask[:, n:]
        state.length -= n

    def merge(self, a: HFState, b: HFState) -> HFState:
        """Left-pad the shorter cache so both have the same length, then stack the rows."""
        length = max(a.length, b.length)
        capacity = length + self.capacity_hint
        for la, lb in zip(self._layers(a.cache), self._layers(b.cache), strict=True):
            la.keys = torch.cat([_left_pad(la.keys, length), _left_pad(lb.keys, length)])
            la.values = torch.cat([_left_pad(la.values, length), _left_pad(lb.values, length)])
        masks = []
        for st in (a, b):
            m = torch.zeros(
                st.attention_mask.shape[0], capacity, dtype=torch.long, device=self.device
            )
            m[:, length - st.length : length] = st.attention_mask[:, : st.length]
            masks.append(m)
        a.attention_mask = torch.cat(masks)
        a.length = length
        a.positions = torch.cat([a.positions, b.positions])
        return a


def _left_pad(t: Tensor, length: int) -> Tensor:
    """(B, H, L, D) -> (B, H, length, D) with zeros in front."""
    missing = length - t.shape[2]
    if missing <= 0:
        return t
    pad = torch.zeros(t.shape[0], t.shape[1], missing, t.shape[3], dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)
