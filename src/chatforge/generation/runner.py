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
        return state
