"""Resolving and loading models (aliases, HF directories, GGUF files, hub ids)."""

from chatforge.models.loading import LoadedModel, ModelInfo, load_model, parse_dtype
from chatforge.models.registry import ALIASES, DEFAULT_MODEL, list_local_models

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelInfo",
    "list_local_models",
    "load_model",
    "parse_dtype",
]
