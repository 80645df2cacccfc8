"""Making LoRA adapters of the tiny test models."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def make_adapter(
    base: Path,
    out: Path,
    seed: int,
    targets="all-linear",
    rank: int = 4,
    tokenizer: bool = True,
) -> Path:
    """A peft LoRA adapter of ``base`` with random (non-zero) A and B, saved to ``out``
    with the base's config (and tokenizer, unless ``tokenizer=False``) beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:  # peft starts B at zero: a no-op adapter proves nothing
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft.save_pretrained(out)
    # what `chatforge train --lora` writes beside it: the base's config and tokenizer
    from transformers import AutoTokenizer

    model.config.save_pretrained(out)
    if tokenizer:
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    meta = json.loads((out / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(meta))
    return out


def fp16_rounded(adapter: Path, out: Path) -> Path:
    """A copy of ``adapter`` with each rank's A row and B column rounded as the fast
    path stores them (fp16 times a power of two per rank): the adapter it applies."""
    import shutil

    from safetensors.torch import load_file, save_file

    from chatforge.models.fast.lora import fp16_exact

    shutil.copytree(adapter, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    for key, t in tensors.items():
        if ".lora_A." in key:  # (r, K): a rank per row
            tensors[key] = fp16_exact(t.float(), 1)
        elif ".lora_B." in key:  # (N, r): a rank per column
            tensors[key] = fp16_exact(t.float(), 0)
    save_file(tensors, str(weights))
    return out
