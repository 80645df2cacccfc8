"""How much memory a training run will take, checked before it starts.

The estimate (bytes, host memory, fp32) adds up:

* the weights, and for each trainable weight its gradient and AdamW's two moments;
* the activations kept for backward: per token and layer about
  ``16 * hidden + 6 * intermediate`` floats (residual stream, norms, attention
  projections, MLP, LoRA dropout copies); with gradient checkpointing only each
  layer's input is kept and one layer is recomputed at a time;
* the attention scores, (B, heads, T, T) fp32, where attention is computed the plain
  way: eager attention, or sdpa with attention dropout in training (GPT-2's
  ``attn_pdrop``: torch's CPU flash kernel takes no dropout, so sdpa falls back to
  the math path, as ``training.packed_attention`` does with its faster dropout).
  Measured on GPT-2: three such copies kept per layer (scores,
  softmax, dropout), two more in flight in backward; with gradient checkpointing,
  about three for the one layer being recomputed. Without dropout sdpa runs the
  flash kernel, which keeps none;
* the packed batch's attention mask, (B, 1, T, T) fp32 (``examples.collate``), and the
  boolean temporaries that build it: 6 bytes per (B, T, T) element. Quadratic in the
  context: at ``--context 100000``, batch 8, that alone is 480 GB (the estimate
  said 5.3 GB and the run grew to 15 GB before anything stopped it). None on a model
  switched to ``training.packed_attention`` without attention dropout (attention example
  by example, no mask);
* the loss: one chunk of logits (``training.loss``), or with full logits about
  six (tokens x vocab) fp32 copies;

times 1.25 for allocator slack (with :func:`limit_heap_growth`, which the trainer turns
on where the estimate passes half the available memory or checkpointing is on; without
it, glibc's heap can keep several GB more), plus a fixed 0.5 GB for the interpreter and
libraries. Calibrated on SmolLM2-135M with LoRA (``bench/bench_train_memory.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatforge.training.loss import CHUNK

GB = 2**30
BASE = 0.5 * GB  # interpreter, torch, tokenizer, data
SLACK = 1.25  # allocator fragmentation and short-lived copies
CHECKPOINT_ABOVE = 1 * GB  # auto gradient checkpointing when it saves more than this


@dataclass
class Estimate:
    """Estimated peak bytes of a run, and its parts."""

    weights: int  # parameters, gradients, optimizer states
    activations: int  # kept for backward (with the run's checkpointing setting)
    activations_full: int  # ... without gradient checkpointing
    loss: int  # logits and cross-entropy buffers
    checkpointing: bool
    mask: int = 0  # the batch's (B, 1, T, T) attention mask and its temporaries
    scores: int = 0  # attention scores kept for backward (math-path attention only)

    @property
    def total(self) -> int:
        parts = self.weights + self.activations + self.loss + self.mask + self.scores
        return int(BASE + SLACK * parts)


def available_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo, or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def limit_heap_growth(threshold: int = 1 << 20) -> bool:
    """Serve allocations above ``threshold`` bytes with mmap, so freed activations go back.

    glibc raises its mmap threshold each time a large block is freed, after which
    activation-sized tensors (a few MB) come from the heap, and a heap fragmented
    by forward/backward keeps its peak: with gradient checkpointing, SmolLM2 at
    batch 4 x context 1024 stayed at 8.7 GB resident for 1.1 GB of live tensors.
    Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also stops the
    adjustment) costs a few percent of step time. Process-wide; False where the C
    library has no ``mallopt`` (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _shape(model: Any) -> tuple[int, int, int, int, int, str, float]:
    from chatforge.training.model import unwrap

    cfg = unwrap(model).config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()

    def get(*names: str, default: int = 0) -> int:
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and v > 0:
                return v
        return default

    hidden = get("hidden_size", "n_embd", "d_model", default=768)
    layers = get("num_hidden_layers", "n_layer", default=12)
    heads = get("num_attention_heads", "n_head", default=12)
    inter = get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    vocab = get("vocab_size", default=50_000)
    attn = str(getattr(cfg, "_attn_implementation", "") or "")
    return hidden, layers, heads, inter, vocab, attn, attention_dropout(model)


def attention_dropout(model: Any) -> float:
    """The dropout rate on the attention probabilities in training (0.0 when none)."""
    from chatforge.training.model import unwrap

    cfg = unwrap(model).config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    for name in ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob"):
        v = getattr(cfg, name, None)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return 0.0


def estimate(
    model: Any, batch_size: int, context: int, checkpointing: bool, chunked_loss: bool = True
) -> Estimate:
    """The estimated peak memory of training ``model`` on (batch_size, context) rows."""
    hidden, layers, heads, inter, vocab, attn, dropout = _shape(model)
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    weights = 4 * n_all + 12 * n_train
    tokens = batch_size * context
    per_layer = 16 * hidden + 6 * inter
    full = 4 * tokens * layers * per_layer
    kept = 4 * tokens * (layers * hidden + per_layer) if checkpointing else full
    loss = 3 * 4 * min(CHUNK, tokens) * vocab if chunked_loss else 6 * 4 * tokens * vocab
    head = model.get_output_embeddings()
    if chunked_loss and head is not None and head.weight.requires_grad:
        loss += 4 * head.weight.numel()  # the head's gradient, summed over chunks in forward
    square = batch_size * context * context  # elements of one (B, T, T) tensor
    mask = 6 * square + context * context  # fp32 mask + bool temporaries; causal (T, T)
    from chatforge.training.packed_attention import NAME as PACKED

    if attn == PACKED and dropout == 0:  # attention example by example: no mask, flash
        mask = 0
    scores = 0  # with attention dropout both sdpa and PACKED run the math path over the mask
    if attn == "eager" or (attn in ("sdpa", "", PACKED) and dropout > 0):
        one_layer = 4 * heads * square  # (B, H, T, T) fp32
        scores = one_layer * (3 if checkpointing else 3 * layers + 2)
    return Estimate(weights, kept, full, loss, checkpointing, mask, scores)


def refusal(est: Estimate, available: int, batch_size: int, context: int) -> str:
    """The one-line message for a run that would not fit."""
    square = SLACK * (est.mask + est.scores)
    why = (
        f", {square / GB:.1f} GB of it growing with the square of the context"
        if square > est.total / 4
        else ""
    )
    return (
        f"training needs about {est.total / GB:.1f} GB but only {available / GB:.1f} GB "
        f"is available (batch {batch_size} x context {context}{why}); lower --batch-size "
        "(raise --grad-accum to keep the effective batch) or --context, "
        "or pass --force to try anyway"
    )


def device_available_bytes(device: Any) -> int | None:
    """Bytes a run on ``device`` may use: free GPU memory on CUDA (``mem_get_info``),
    :func:`available_bytes` on the CPU; None where it cannot be known (mps)."""
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    return available_bytes() if kind == "cpu" else None
