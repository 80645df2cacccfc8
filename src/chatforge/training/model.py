"""The model a run trains, and the model directory it writes.

Fine-tuning loads any model chatforge can load (``load_model``); from scratch
builds a GPT-2 around a tokenizer directory (sep format by default). LoRA wraps
the model with ``peft``. The output directory is a model: safetensors weights
(merged with ``merge``, or LoRA adapter + a reference to the base model),
tokenizer, config and ``chatforge.json`` with the prompt format. A model trained
on a text corpus (no ``--format``) records the ``text`` format: chat, generate,
eval and the server then continue prompts as plain text, as it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge.conversation.formats import ensure_sep_token, get_format
from chatforge.errors import ChatforgeError, ParamError
from chatforge.models.meta import ModelMeta
from chatforge.training.config import TrainConfig

DEFAULT_SCRATCH_CONTEXT = 256
MAX_DEFAULT_CONTEXT = 1024


@dataclass
class Built:
    """A model ready to train."""

    model: Any  # transformers PreTrainedModel (peft-wrapped with LoRA), train mode
    tokenizer: Any
    format_name: str  # "chat_template" | "sep" | "eos" | "text"
    context: int  # row length used for training
    base: str | None  # the base model reference (fine-tuning), None from scratch
    base_dir: Path | None  # its local directory


def build_model(cfg: TrainConfig, data_kind: str | None = None) -> Built:
    """Load (or create) the model and tokenizer; set up the prompt format and LoRA.

    The format is ``cfg.format``, else ``text`` for a text corpus (``data_kind``), else
    the model's own (``sep`` for a new GPT-2)."""
    fmt = cfg.format or ("text" if data_kind == "text" else None)
    if cfg.init == "gpt2":
        built = _scratch_gpt2(cfg, fmt)
    else:
        built = _pretrained(cfg, fmt)
    if cfg.lora:
        built.model = apply_lora(built.model, cfg)
    built.model.train()
    return built


def _pretrained(cfg: TrainConfig, fmt: str | None) -> Built:
    from chatforge.models import load_model

    # fp32 trainable weights, no fast decoder: training runs transformers' modules.
    lm = load_model(str(cfg.model), "fp32", "none", fast=False)
    model, tok = lm.model, lm.tokenizer
    fmt = fmt or lm.info.prompt_format
    n_vocab = model.get_input_embeddings().num_embeddings
    if fmt == "sep":
        ensure_sep_token(tok, model)
        if cfg.lora and model.get_input_embeddings().num_embeddings != n_vocab:
            raise ChatforgeError(
                "the sep format adds a <sep> token this model has never seen, and LoRA cannot "
                "learn a new token; use full fine-tuning (no --lora) or --format eos"
            )
    get_format(fmt, tok)  # fails early with a clear message if the format cannot work
    limit = lm.info.context_length
    context = cfg.context or min(limit, MAX_DEFAULT_CONTEXT)
    if context > limit:
        raise ParamError(
            "context", f"must be <= the model's context length ({limit}), got {context}"
        )
    base_dir = Path(lm.info.path)
    # Record a local base by absolute path, so the adapter loads from anywhere.
    local = Path(str(cfg.model)).expanduser()
    base = str(local.resolve()) if local.exists() else str(cfg.model)
    return Built(model, tok, fmt, context, base, base_dir)


def _scratch_gpt2(cfg: TrainConfig, fmt: str | None) -> Built:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = Path(str(cfg.tokenizer)).expanduser()
    if not path.is_dir():
        raise ChatforgeError(
            f"tokenizer directory {cfg.tokenizer} does not exist; "
            "make one with `chatforge tokenizer train`"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ChatforgeError(f"could not load the tokenizer in {path}: {e}") from e
    fmt = fmt or "sep"
    if fmt == "sep":
        ensure_sep_token(tok)
    if tok.eos_token_id is None:
        raise ChatforgeError(f"the tokenizer in {path} has no EOS token; GPT-2 needs one")
    context = cfg.context or DEFAULT_SCRATCH_CONTEXT
    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=context,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    get_format(fmt, tok)
    return Built(model, tok, fmt, context, None, None)


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    """Wrap ``model`` with LoRA adapters on every linear layer (the LM head excluded)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def unwrap(model: Any) -> Any:
    """The model under a DDP / torch.compile wrapper."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module
    return model


def save_model_dir(
    model: Any, built: Built, cfg: TrainConfig, out: Path, facts: dict | None = None
) -> None:
    """Write the output model directory; ``chatforge.json`` (complete) is written last."""
    model = unwrap(model)
    out.mkdir(parents=True, exist_ok=True)
    ModelMeta(prompt_format=built.format_name, complete=False).write(out)
    extra = {"training": dict(facts or {}), "train_config": cfg.to_dict()}
    if cfg.lora and not cfg.merge:
        # Adapter + base reference: load_model merges them at load time.
        model.save_pretrained(out, safe_serialization=True)
        unwrap_base = model.get_base_model()
        unwrap_base.config.save_pretrained(out)
        extra["base_model"] = built.base
        extra["base_dir"] = str(built.base_dir) if built.base_dir else None
    else:
        if cfg.lora:
            model = model.merge_and_unload()
        model.save_pretrained(out, safe_serialization=True)
    if getattr(model, "generation_config", None) is not None and not cfg.lora:
        model.generation_config.save_pretrained(out)
    built.tokenizer.save_pretrained(out)
    source = built.base or f"gpt2 from scratch ({cfg.n_layer}x{cfg.n_embd})"
    ModelMeta(
        prompt_format=built.format_name,
        name=out.resolve().name,
        source=source,
        complete=True,
        extra=extra,
    ).write(out)
