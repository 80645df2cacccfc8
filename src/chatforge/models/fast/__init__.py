"""The fast path: compact decoder code with a paged KV cache and quantised weights."""

from chatforge.models.fast.convert import build_fast_model, unsupported_reason
from chatforge.models.fast.linear import QUANT_MODES
from chatforge.models.fast.model import FastConfig, FastDecoder, PagedKV

__all__ = [
    "QUANT_MODES",
    "FastConfig",
    "FastDecoder",
    "PagedKV",
    "build_fast_model",
    "unsupported_reason",
]
