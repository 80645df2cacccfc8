"""Which sequences run this step, and how many of their tokens: admission and preemption.

Each step every running sequence that has a token to feed gets it (decode),
sequences still prefilling get a chunk, and waiting requests are admitted
while there is room: a place in the batch (``max_batch``), prompt tokens
left in this step's budget (``prefill_tokens``; a long prompt is prefilled
in chunks across steps, so it never stalls the streams already running) and
KV blocks. A new request first takes whatever prefix of its prompt the prefix
cache holds.

When a running sequence needs a block and none is left, the most recently
admitted sequence is preempted: its blocks go back (they stay in the prefix
cache) and it waits at the head of the queue to be recomputed. Because every
row is computed the same way whatever else runs (see ``kernels/decode.c``),
recomputing changes nothing in its output. A sliding sequence whose window
changed (:meth:`Scheduler.recompute`) takes the same path: its new window is
computed from scratch, its head's blocks from the prefix cache.

Nothing here touches tensors, samples, or decodes text.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from chatforge.generation.kv import BlockManager, block_hashes
from chatforge.generation.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    """Limits of the engine's scheduler."""

    max_batch: int = 32
    """Most sequences running together; more requests wait for a free place."""
    prefill_tokens: int = 2048
    """Prompt tokens fed per step (decode tokens not counted); longer prompts are chunked."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {self.max_batch})")
        if self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1 (got {self.prefill_tokens})")


class Scheduler:
    """A waiting queue and a running list over a :class:`BlockManager` (None: no paging)."""

    def __init__(
        self, config: SchedulerConfig, blocks: BlockManager | None, prefix_cache: bool = True
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0  # sequences sent back to wait for memory (for metrics)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, aborted or failed) and give its blocks back."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = Status.FINISHED

    # -- one step ---------------------------------------------------------------------

    def schedule(self, max_batch: int | None = None) -> list[tuple[Sequence, int]]:
        """This step's work: ``(sequence, tokens to feed)``, running ones first."""
        limit = max_batch or self.config.max_batch
        budget = self.config.prefill_tokens
        work: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = seq.pending
            if n > 1:  # still prefilling: a chunk of what is left of the budget
                n = min(n, budget)
                if n == 0:
                    continue
            if not self._grow(seq, n, work):
                continue  # seq itself was preempted
            work.append((seq, n))
            if seq.pending > 1:
                budget -= n
        # Admit in arrival order while there is a place, budget and memory.
        pending_hashes = self._pending_hashes(work)
        skipped: list[Sequence] = []
        while self.waiting and len(self.running) < limit and budget > 0:
            seq = self.waiting.popleft()
            if self._shares_pending_prefix(seq, pending_hashes):
                skipped.append(seq)  # next step its prefix is cached: compute it once
                continue
            self._take_cached_prefix(seq)
            n = min(seq.pending, budget)
            if not self._reserve(seq, seq.num_computed + n):
                self._free(seq)
                self.waiting.appendleft(seq)
                break
            seq.status = Status.RUNNING
            seq.admitted_once = True
            self.running.append(seq)
            work.append((seq, n))
            budget -= n
            if self.blocks is not None and seq.block_hashes:
                pending_hashes.update(
                    seq.block_hashes[seq.num_computed // self.blocks.block_size :]
                )
        for seq in reversed(skipped):
            self.waiting.appendleft(seq)
        return work

    # -- KV blocks ----------------------------------------------------------------------

    def _grow(self, seq: Sequence, n: int, work: list[tuple[Sequence, int]]) -> bool:
        """Blocks for ``seq``'s next ``n`` tokens, preempting newer sequences if needed."""
        while not self._reserve(seq, seq.num_computed + n):
            victim = next((s for s in reversed(self.running) if s.status is Status.RUNNING), None)
            assert victim is not None
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _reserve(self, seq: Sequence, tokens: int) -> bool:
        if self.blocks is None:
            return True
        need = self.blocks.blocks_for(tokens) - len(seq.block_table)
        if need <= 0:
            return True
        got = self.blocks.allocate(need)
        if got is None:
            return False
        seq.block_table.extend(got)
        return True

    def recompute(self, seq: Sequence) -> None:
        """Give a running sequence's blocks back and queue it first, to compute its
        tokens again from the start (its window slid: what is cached is of other
        positions). Not counted as a preemption."""
        self._preempt(seq)
        self.preemptions -= 1

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self.running.remove(seq)
        self._free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        if self.blocks is not None and seq.block_table:
            self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.registered = 0

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Start ``seq`` after the longest prefix of its tokens the cache holds."""
        bm = self.blocks
        if bm is None or not self.prefix_cache or seq.wants_all_rows:
            return
        hit = bm.match(self._reusable_hashes(seq, bm))
        bm.take(hit)
        seq.block_table = list(hit)
        seq.num_computed = len(hit) * bm.block_size
        if not seq.admitted_once:
            seq.cached_tokens = seq.num_computed
            bm.lookups += seq.num_prompt
            bm.hits += seq.num_computed

    @staticmethod
    def _reusable_hashes(seq: Sequence, bm: BlockManager) -> list[bytes]:
        """Hashes of the full blocks of ``seq`` a cache hit may cover: all but the last
        token, which is always fed (its logits are what gets sampled)."""
        full = (len(seq.tokens) - 1) // bm.block_size
        seq.block_hashes = block_hashes(
            seq.tokens, seq.types, bm.block_size, full, seq.block_hashes, seq.salt
        )
        return seq.block_hashes[:full]

    def _pending_hashes(self, work: list[tuple[Sequence, int]]) -> set[bytes]:
        """Prefix blocks being computed now (by sequences still prefilling)."""
        out: set[bytes] = set()
        if self.blocks is None:
            return out
        bs = self.blocks.block_size
        for seq, n in work:
            if seq.block_hashes and seq.num_computed + n < seq.num_prompt:
                out.update(seq.block_hashes[seq.num_computed // bs :])
        return out

    def _shares_pending_prefix(self, seq: Sequence, pending: set[bytes]) -> bool:
        """True when at least half of ``seq``'s prompt is being computed by another
        sequence right now: waiting one step lets it take those blocks from the cache."""
        bm = self.blocks
        if bm is None or not self.prefix_cache or not pending or seq.wants_all_rows:
            return False
        reusable = self._reusable_hashes(seq, bm)
        if not reusable:
            return False
        shared = 0
        for h in reusable:
            if h not in pending and h not in bm.cached:
                break
            shared += 1
        pending_part = sum(1 for h in seq.block_hashes[:shared] if h not in bm.cached)
        return pending_part > 0 and shared * bm.block_size * 2 >= seq.num_prompt
