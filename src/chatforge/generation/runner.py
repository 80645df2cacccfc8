"""Model runners: turn the scheduler's work into tensors and run the model.

The engine hands a runner a list of :class:`Work` items, one per scheduled
sequence: feed ``seq.tokens[start:end]`` (a whole prompt, a chunk of one, or
the single token sampled last step) and return the features of the rows whose
logits are needed. The runner builds its own tensors from the sequences (ids,
positions, block tables) and owns the KV storage.

* :class:`~chatforge.generation.fast_runner.FastRunner` runs chatforge's own
  decoder over a paged KV cache shared with the prefix cache.
* :class:`HFRunner` runs any transformers causal LM, one sequence at a time
  with a cache per sequence (the fallback for architectures without a fast
  path: slower for batches, but every sequence is computed alone, so its output
  does not depend on the batch).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from chatforge.generation.sequence import Sequence


@dataclass
class Work:
    """Feed ``seq.tokens[start:end]``; ``rows`` says which rows' logits come back."""

    seq: Sequence
    start: int
    end: int
    all_rows: bool
    """True: features of every fed row (prompt scoring). False: of the last row only,
    when the sequence samples after this step (``end == len(seq.tokens)``), else none."""

    @classmethod
    def feed(cls, seq: Sequence, n: int) -> Work:
        """Feed ``seq``'s next ``n`` tokens (from the first not in the KV cache). Every fed
        row's features come back where post-processing reads them all: the prompt rows of
        a prompt-logprobs request that predict a prompt token, any prompt row of an
        embedding request (never again once a sliding window has dropped tokens: its
        rows are no longer the prompt's, and those were scored)."""
        start = seq.num_computed
        all_rows = not seq.slides and (
            (seq.request.embed and start < seq.num_prompt)
            or (seq.wants_prompt_logprobs and start < seq.num_prompt - 1)
        )
        return cls(seq, start, start + n, all_rows)

    @property
    def samples(self) -> bool:
        return self.end == len(self.seq.tokens)


class ModelRunner(Protocol):
    """What the engine needs from a model."""

    block_size: int | None
    """Positions per KV block (paged runners), None for a runner with a cache per sequence."""
    device: torch.device
    """Where the model runs; the features and logits it returns are there."""

    def bytes_per_block(self) -> int: ...

    def ensure_blocks(self, n: int) -> None:
        """Make block ids ``0..n-1`` usable."""

    def run(self, work: list[Work]) -> list[Tensor | None]:
        """Run the work; per item the features (rows, F) of its requested rows, or None."""

    def logits(self, features: Tensor) -> Tensor:
        """Logits (rows, V) fp32 from features returned by :meth:`run`."""

    def hidden(self, features: Tensor) -> Tensor:
        """The final hidden states (rows, H), after the final norm, from features returned
        by :meth:`run` for an embedding request (``Request.embed``)."""

    def release(self, seq: Sequence) -> None:
        """Forget what is held for ``seq`` outside the block pool."""


class HFRunner:
    """Runs a transformers causal LM with a DynamicCache per sequence."""

    block_size = None

    def __init__(self, model: Any) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.takes_token_types = "token_type_ids" in params
        self.takes_position_ids = "position_ids" in params
        self.device = next(model.parameters()).device
        self.caches: dict[int, Any] = {}  # sequence id -> (DynamicCache, length)

    def bytes_per_block(self) -> int:
        return 0

    def ensure_blocks(self, n: int) -> None:
        pass

    @torch.inference_mode()
    def run(self, work: list[Work]) -> list[Tensor | None]:
        from transformers import DynamicCache

        out: list[Tensor | None] = []
        for w in work:
            seq = w.seq
            cache, length = self.caches.get(seq.id, (None, 0))
            if cache is None or length != w.start:
                if w.start != 0:
                    raise RuntimeError(f"sequence {seq.id}: no cache for position {w.start}")
                cache = DynamicCache()
            ids = torch.tensor([seq.tokens[w.start : w.end]], device=self.device)
            kw: dict[str, Any] = dict(input_ids=ids, past_key_values=cache, use_cache=True)
            if self.takes_position_ids:
                kw["position_ids"] = torch.arange(w.start, w.end, device=self.device)[None]
            if seq.types is not None and self.takes_token_types:
                kw["token_type_ids"] = torch.tensor(
                    [seq.types[w.start : w.end]], device=self.device
                )
            if seq.request.embed:  # features are hidden states, not logits
                kw["output_hidden_states"] = True
            result = self.model(**kw, return_dict=True)
            # (T, V) logits, or (T, H) the last layer's output after the final norm
            feats = result.hidden_states[-1][0] if seq.request.embed else result.logits[0]
            self.caches[seq.id] = (cache, w.end)
            if w.all_rows:
                out.append(feats.float())
            elif w.samples:
                out.append(feats[-1:].float())
            else:
                out.append(None)
        return out

    def logits(self, features: Tensor) -> Tensor:
        return features  # transformers' forward already gives logits

    def hidden(self, features: Tensor) -> Tensor:
        return features  # run() gave the last hidden state for embedding requests

    def release(self, seq: Sequence) -> None:
        self.caches.pop(seq.id, None)
