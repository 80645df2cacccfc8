"""``TrainConfig``: everything one training run needs, validated up front.

Every check raises a :class:`~chatforge.errors.ParamError` naming the field, so
the CLI can show it as the flag the user typed (``--lr must be > 0``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from chatforge.conversation.formats import FORMATS
from chatforge.errors import ParamError
from chatforge.training.data import KINDS
from chatforge.training.examples import TRAIN_ON

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """One training run: fine-tune ``model``, or train a new GPT-2 (``init="gpt2"``)."""

    data: list[str]  # training sources: .txt file/folder, conversation JSONL, or "chitchat"
    output: str  # output directory: becomes a model directory (plus checkpoints, metrics)
    model: str | None = None  # model to fine-tune: alias (smollm2), directory, .gguf, hub id
    init: str | None = None  # "gpt2": a new model from scratch (needs `tokenizer`)
    tokenizer: str | None = None  # tokenizer directory for a from-scratch model
    n_layer: int = 4  # from scratch: transformer layers
    n_embd: int = 256  # from scratch: hidden size
    n_head: int = 4  # from scratch: attention heads (must divide n_embd)
    valid: str | None = None  # validation source (same kinds as `data`)
    valid_split: float | None = None  # else hold out this fraction of `data` (its tail)
    format: str | None = None  # prompt format override: chat_template | sep | eos
    data_format: str | None = None  # data kind override: text|convmodel|openai|sharegpt|chitchat
    on_error: str = "skip"  # malformed data lines: "skip" (count, report) or "fail"
    train_on: str = "assistant"  # loss on "assistant" turns, "all" tokens, or the "last" reply
    max_steps: int | None = None  # stop after this many optimizer steps
    max_time: float | None = None  # stop after this many minutes (a checkpoint is written)
    epochs: float | None = None  # passes over the data; None: 1, or unlimited under max_time
    batch_size: int = 8  # rows (of `context` tokens) per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate; None: 6e-4 scratch, 3e-4 LoRA, 5e-5 full
    warmup: float = 0.05  # warm-up: < 1 a fraction of the steps, >= 1 a number of steps
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW weight decay
    clip: float = 1.0  # gradient-norm clipping (0 = off)
    context: int | None = None  # row length in tokens; None: min(model context, 1024), 256 new
    eval_every: int = 100  # validate every N steps (0 = only at the end)
    save_every: int = 200  # checkpoint every N steps (0 = only at the end / on Ctrl-C)
    log_every: int | None = None  # metrics row every N steps; None: ~50 points, at most 10 apart
    keep_checkpoints: int = 2  # newest step checkpoints kept (the best one is kept apart)
    valid_rows: int = 64  # validation uses at most this many packed rows
    lora: bool = False  # train LoRA adapters (peft) instead of all weights
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA path
    merge: bool = False  # with lora: write merged weights instead of adapter + base reference
    final: str = "best"  # weights written to `output`: "best" validation loss, or "last"
    packing: bool = True  # pack several examples per row (isolated); False: one per row
    grad_checkpointing: bool | None = None  # recompute layers in backward; None: if it saves 1 GB
    force: bool = False  # train even when the memory estimate exceeds the available memory
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto" (bf16 where it is faster)
    resume: bool = False  # continue from the newest complete checkpoint in `output`
    overwrite: bool = False  # allow a non-empty `output` without resume (its files are replaced)
    seed: int = 0  # seeds weights (from scratch), data order, dropout
    progress: bool = True  # show a rich progress bar (main process only)
    threads: int | None = None  # CPU threads; None: the cores other processes leave free
    dpo: bool = False  # preference tuning (DPO) on chosen/rejected pairs; a LoRA adapter
    beta: float = 0.1  # DPO: how far the tuned model may move from the reference (TRL's default)
    extra: dict = field(default_factory=dict)  # recorded in chatforge.json, not interpreted

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ParamError("data", "must name at least one training source")
        if self.dpo and self.init:
            raise ParamError("dpo", "tunes an existing model: give --model, not --init")
        if (self.model is None) == (self.init is None):
            raise ParamError(
                "model",
                ": give either a model to fine-tune (--model) or --init gpt2, not both"
                if self.model
                else ": give a model to fine-tune (--model) or --init gpt2 to start fresh",
            )
        if self.init is not None:
            if self.init != "gpt2":
                raise ParamError("init", f"must be 'gpt2', got {self.init!r}")
            if not self.tokenizer:
                raise ParamError(
                    "tokenizer",
                    ": a new model needs --tokenizer DIR "
                    "(make one with `chatforge tokenizer train`)",
                )
            for name in ("n_layer", "n_embd", "n_head"):
                _positive(self, name)
            if self.n_embd % self.n_head:
                raise ParamError(
                    "n_embd", f"({self.n_embd}) must be a multiple of n_head ({self.n_head})"
                )
        if self.valid and self.valid_split is not None:
            raise ParamError("valid_split", ": give --valid FILE or --valid-split F, not both")
        if self.valid_split is not None and not 0 < self.valid_split < 1:
            raise ParamError("valid_split", f"must be in (0, 1), got {self.valid_split}")
        if self.format is not None and self.format not in FORMATS:
            raise ParamError("format", f"must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.data_format is not None and self.data_format not in KINDS:
            raise ParamError(
                "data_format", f"must be one of {', '.join(KINDS)}, got {self.data_format!r}"
            )
        _choice(self, "on_error", ("skip", "fail"))
        _choice(self, "train_on", TRAIN_ON)
        _choice(self, "precision", PRECISIONS)
        _choice(self, "final", ("best", "last"))
        for name in ("batch_size", "grad_accum", "valid_rows", "lora_r"):
            _positive(self, name)
        for name in ("max_steps", "context", "log_every", "threads"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if self.context is not None and self.context < 8:
            raise ParamError("context", f"must be >= 8 tokens, got {self.context}")
        if self.max_time is not None and not self.max_time > 0:
            raise ParamError("max_time", f"must be > 0 minutes, got {self.max_time}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ParamError("epochs", f"must be > 0, got {self.epochs}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ParamError("lr", f"must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ParamError("warmup", f"must be >= 0, got {self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ParamError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "clip", "eval_every", "save_every", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ParamError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ParamError("keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        if self.lora_alpha <= 0:
            raise ParamError("lora_alpha", f"must be > 0, got {self.lora_alpha}")
        if self.dpo:
            # The reference model is the same weights with the adapter switched off: DPO
            # here always trains a LoRA adapter (no second copy of the model in memory).
            self.lora = True
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ParamError("beta", f"must be > 0, got {self.beta}")
        if self.merge and not self.lora:
            raise ParamError("merge", "only applies to LoRA training; add --lora")
        if self.resume and self.overwrite:
            raise ParamError("resume", ": --resume and --overwrite exclude each other")
        if self.lr is None:
            self.lr = default_lr(self)

    def warmup_steps(self, total: int) -> int:
        """Warm-up length in steps for a run of ``total`` steps."""
        return int(round(self.warmup * total)) if self.warmup < 1 else int(self.warmup)

    def log_interval(self, total: int | None) -> int:
        """Steps between metrics rows: ``log_every``, else about 50 rows over ``total``
        steps (every step on a run of 50 or fewer, so a short run still draws a curve),
        at most 10 apart."""
        if self.log_every is not None:
            return self.log_every
        if total is None:  # until the time is up
            return 10
        return max(1, min(10, total // 50))

    def to_dict(self) -> dict:
        return asdict(self)


def default_lr(cfg: TrainConfig) -> float:
    """The peak learning rate when ``--lr`` is not given: 6e-4 from scratch, 3e-4 LoRA,
    5e-5 full fine-tuning, 5e-5 DPO (a LoRA adapter, moved gently from the reference)."""
    if cfg.init:
        return 6e-4
    if cfg.dpo:
        return 5e-5
    return 3e-4 if cfg.lora else 5e-5


def _positive(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or value < 1:
        raise ParamError(name, f"must be >= 1, got {value}")


def _choice(cfg: TrainConfig, name: str, options: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in options:
        raise ParamError(name, f"must be one of {', '.join(options)}, got {getattr(cfg, name)!r}")
