"""transformers' model of a GGUF conversion, built in memory from the file's tensors.

A GGUF model's conversion directory holds its config and tokenizer, not its weights
(:mod:`chatforge.models.gguf`): they stay in the file. Where transformers' model is
needed (``--quantize none``, fine-tuning, export, a comparison), it is made here.

transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``) takes ~12 s
on SmolLM2-135M, 8.8 s of which parse every metadata field value by value (the 49k
tokens and merges of the vocabulary) to rebuild a config we already have. This reads
only the tensors: gguf's reader (memory-mapped, ~2 s with its field table), gguf's
dequantisation (~0.7 s), and transformers' own name map and per-architecture fix-ups
(a Llama's Q/K rows back in transformers' order, GPT-2's transposes), so the model is
the one ``from_pretrained(gguf_file=...)`` makes, tensor for tensor (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.errors import ModelLoadError
from chatforge.models.fast.gguf_weights import GGUFWeights


def model_from_gguf(
    directory: Path, gguf_path: Path, dtype: torch.dtype = torch.float32, weights: Any = None
) -> Any:
    """transformers' model for the config in ``directory`` with the weights of the GGUF
    file ``gguf_path`` (dequantised, in ``dtype``), in eval mode.

    ``weights``: the file already open as a :class:`~chatforge.models.fast.gguf_weights.
    GGUFWeights` (opening it again costs ~2 s).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    config = AutoConfig.from_pretrained(directory)
    with no_init_weights():  # every weight is assigned below: no random init to pay for
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    w = weights if weights is not None else GGUFWeights(gguf_path)
    settings = config.to_dict()
    # What transformers' loader does per tensor, minus the metadata parse: the processor
    # of the file's architecture (keyed by llama.cpp's name, as transformers does).
    processor = TENSOR_PROCESSORS.get(w.arch, TensorProcessor)(config=settings)
    names = _name_map(model, w.arch)  # llama.cpp name -> transformers name
    missing = _assign(model, w, processor, names, dtype)
    if missing:  # transformers' full (slow) search may know names ours does not
        missing = _assign(model, w, processor, get_gguf_hf_weights_map(model, processor), dtype)
    if missing:
        raise ModelLoadError(
            f"{gguf_path} lacks weights its model needs ({', '.join(missing[:3])}); "
            "it may be a different model than its settings say, or incomplete"
        )
    return model.eval()


def _assign(
    model: Any, w: Any, processor: Any, names: dict[str, str], dtype: torch.dtype
) -> list[str]:
    """Put the file's tensors, dequantised, into ``model`` as its weights; returns the
    names of the weights the file did not provide."""
    from gguf import dequantize

    parsed: dict[str, Any] = {"tensors": {}, "config": processor.config}
    for t in w.tensors.values():
        values = dequantize(t.data, t.tensor_type)  # numpy: float32 (F16 stays float16)
        out = processor.process(
            weights=values, name=t.name, tensor_key_mapping=names, parsed_parameters=parsed
        )
        if out.name in names:  # (a processor may have stored it itself: GPT-2's head)
            tensor = torch.from_numpy(np.copy(out.weights)).to(dtype)  # one copy kept
            parsed["tensors"][names[out.name]] = tensor
    state = {k: v.to(dtype) for k, v in parsed["tensors"].items()}  # (those, as well)
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    model.tie_weights()  # a tied head: the embeddings' tensor, not a file tensor
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    return [k for k in missing if k not in params or id(params[k]) not in loaded]


def _name_map(model: Any, arch: str | None) -> dict[str, str]:
    """llama.cpp tensor name -> transformers' name, for each of ``model``'s tensors that
    gguf's table of the file's architecture knows; empty when it knows none.

    transformers' ``get_gguf_hf_weights_map`` does this too, but rebuilds gguf's table
    once per submodule it recurses into (397 times, 6 s, on SmolLM2); a causal LM's
    top-level names are the ones the table lists, so one table and one pass do.
    """
    import gguf

    kind = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if kind is None:
        return {}
    table = gguf.get_tensor_name_map(kind, model.config.num_hidden_layers)
    out: dict[str, str] = {}
    for name in model.state_dict():
        stem, _, suffix = name.rpartition(".")
        found = table.get_name(stem)
        if found is not None:
            out.setdefault(f"{found}.{suffix}", name)
    return out
