"""The engine's runner over a :class:`~chatforge.models.fast.FastDecoder`.

All scheduled work runs as one forward pass: each sequence contributes its
rows (one for a decode step, a chunk for a prefill), in order; row ``r``
carries its token, position, and the index of its sequence's block table.
With fp32 activations on the CPU that pass is one C call in which every row is
computed the same way whatever else is in it (see ``kernels/decode.c``); on a GPU
it is the decoder's torch forward, the step's sequences padded into one batch, with
every tensor (indices, KV pool, logits) on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chatforge.generation.runner import Work
from chatforge.generation.sequence import Sequence
from chatforge.models.fast import FastDecoder, PagedKV

BLOCK_SIZE = 16  # positions per KV block (vLLM's default)


class FastRunner:
    """Implements :class:`~chatforge.generation.runner.ModelRunner` for the fast decoder."""

    def __init__(self, model: FastDecoder, block_size: int = BLOCK_SIZE) -> None:
        self.model = model
        self.block_size = block_size
        self.kv: PagedKV = model.new_cache(n_blocks=16, block_size=block_size)

    @property
    def device(self) -> torch.device:
        """Where the decoder, its KV pool and the logits are."""
        return self.model.device

    @property
    def adapters(self) -> list:
        """The decoder's LoRA adapters (``FastDecoder.adapters``)."""
        return self.model.adapters

    def bytes_per_block(self) -> int:
        return PagedKV.bytes_per_block(self.model.cfg, self.block_size)

    def ensure_blocks(self, n: int) -> None:
        if n > self.kv.n_blocks:  # double, so the pool is regrown (copied) rarely
            self.kv.grow(max(n, 2 * self.kv.n_blocks))

    def run(self, work: list[Work]) -> list[Tensor | None]:
        tokens: list[int] = []
        positions: list[int] = []
        seq_index: list[int] = []
        lora: list[int] | None = None  # per row: adapter slot, -1 for the base
        if any(w.seq.request.adapter is not None for w in work):
            lora = []
        types: list[int] | None = None
        if any(w.seq.types is not None for w in work):
            types = []
        width = max(len(w.seq.block_table) for w in work)
        table_rows: list[list[int]] = []
        for i, w in enumerate(work):
            seq = w.seq
            tokens += seq.tokens[w.start : w.end]
            positions += range(w.start, w.end)
            seq_index += [i] * (w.end - w.start)
            if lora is not None:
                name = seq.request.adapter
                lora += [-1 if name is None else self.model.adapter_slot(name)] * (w.end - w.start)
            if types is not None:
                types += seq.types[w.start : w.end] if seq.types else [0] * (w.end - w.start)
            table_rows.append(seq.block_table + [0] * (width - len(seq.block_table)))
        # Built from Python lists straight on the decoder's device: one copy each to a GPU.
        dev = self.model.device
        h = self.model.forward(
            torch.tensor(tokens, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            torch.tensor(seq_index, dtype=torch.long, device=dev),
            torch.tensor(table_rows, dtype=torch.int32, device=dev),  # (S, max_blocks)
            self.kv,
            None if types is None else torch.tensor(types, dtype=torch.long, device=dev),
            None if lora is None else torch.tensor(lora, dtype=torch.int32, device=dev),
        )  # (R, hidden)
        out: list[Tensor | None] = []
        row = 0
        for w in work:
            n = w.end - w.start
            if w.all_rows:
                out.append(h[row : row + n])
            elif w.samples:
                out.append(h[row + n - 1 : row + n])
            else:
                out.append(None)
            row += n
        return out

    def logits(self, features: Tensor) -> Tensor:
        return self.model.logits(features)

    def hidden(self, features: Tensor) -> Tensor:
        return self.model.final_norm(features)

    def release(self, seq: Sequence) -> None:
        pass  # everything it holds is in blocks the engine gives back
