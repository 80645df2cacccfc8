"""Which KV blocks each sequence uses, and the prefix cache (after vLLM's block manager).

The runner's KV cache is a pool of blocks of ``block_size`` positions. This
module is its book-keeping, with no tensors: a sequence holds a *block table*
(its blocks in position order); a block is shared by every sequence whose
tokens up to the end of that block are the same. A full block is known by the
hash of all tokens up to its end, so a new request whose prompt starts like an
earlier one (the previous turns of a chat, a repeated system prompt, ``n``
samples of one prompt) takes those blocks instead of computing them again.

Blocks nobody uses go to a free queue in least-recently-used order and keep
their contents and hash until they are handed out again, so finished requests
stay reusable for as long as memory allows. The pool grows up to
``max_blocks`` (the memory budget) before any cached block is evicted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(
    tokens: Sequence[int],
    types: Sequence[int] | None,
    block_size: int,
    n_blocks: int,
    known: list[bytes] | None = None,
    salt: bytes = b"",
) -> list[bytes]:
    """Hashes of (at least) the first ``n_blocks`` full blocks: each covers every token up to
    its end.

    ``known``: hashes of the first blocks already computed (extended, not recomputed).
    ``salt``: what else the KV depends on (a LoRA adapter's key): only sequences with
    the same salt share blocks.
    """
    out: list[bytes] = list(known or [])
    if len(out) >= n_blocks:
        return out
    parent = out[-1] if out else salt
    for b in range(len(out), n_blocks):
        lo, hi = b * block_size, (b + 1) * block_size
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b",".join(str(t).encode() for t in tokens[lo:hi]))
        if types is not None:  # the sep format's token types change the embeddings
            h.update(b"|" + b",".join(str(t).encode() for t in types[lo:hi]))
        parent = h.digest()
        out.append(parent)
    return out


class BlockManager:
    """Allocation, sharing and LRU reuse of KV blocks; see the module docstring."""

    def __init__(self, block_size: int, max_blocks: int) -> None:
        if block_size < 1 or max_blocks < 1:
            raise ValueError("block_size and max_blocks must be >= 1")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.n_blocks = 0  # block ids handed out so far (the pool's high-water mark)
        self.ref: list[int] = []  # per block: sequences using it
        self.hash_of: list[bytes | None] = []  # per block: its prefix hash once full
        self.cached: dict[bytes, int] = {}  # prefix hash -> block holding it
        # Blocks with no user, least recently freed first; they keep their contents
        # (and hash) until handed out again.
        self.free: OrderedDict[int, None] = OrderedDict()
        self.hits = 0  # tokens served from the cache (for metrics)
        self.lookups = 0  # prompt tokens looked up

    # -- capacity -------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free ones, and room to grow)."""
        return len(self.free) + self.max_blocks - self.n_blocks

    @property
    def used(self) -> int:
        """Blocks held by sequences."""
        return self.n_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return (tokens + self.block_size - 1) // self.block_size

    # -- the prefix cache -------------------------------------------------------------

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes`` (not yet taken)."""
        out = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def take(self, blocks: Sequence[int]) -> None:
        """Start using cached ``blocks`` (a matched prefix)."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def register(self, block: int, h: bytes) -> None:
        """``block`` is now full and holds the prefix with hash ``h``."""
        if self.hash_of[block] is not None or h in self.cached:
            return  # already known (another sequence computed the same prefix)
        self.hash_of[block] = h
        self.cached[h] = block

    # -- allocation -------------------------------------------------------------------

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks, or None (nothing is taken) when fewer are available."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self.n_blocks < self.max_blocks:  # grow before evicting anything cached
                b = self.n_blocks
                self.n_blocks += 1
                self.ref.append(0)
                self.hash_of.append(None)
            else:
                b, _ = self.free.popitem(last=False)  # least recently used
                h = self.hash_of[b]
                if h is not None:  # evicted from the prefix cache
                    self.hash_of[b] = None
                    if self.cached.get(h) == b:
                        del self.cached[h]
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """A sequence stops using ``blocks`` (its table, in position order).

        Unhashed blocks (a partial last block) are reused first; full blocks stay
        cached, the end of a sequence evicted before its start (a later request is
        more likely to share the start).
        """
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if self.hash_of[b] is None:
                    self.free.move_to_end(b, last=False)
