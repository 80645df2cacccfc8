"""``chatforge train``: fine-tune a model or train a new GPT-2 on the user's data."""

from __future__ import annotations

from typing import Annotated

import typer

from chatforge.cli.options import check_threads

Opt = typer.Option


def train_command(
    data: Annotated[
        list[str],
        Opt("--data", "-d", help="Training data: .txt file/folder, JSONL, or chitchat (repeat)."),
    ],
    output: Annotated[str, Opt("--output", "-o", help="Output directory (becomes a model).")],
    model: Annotated[str | None, Opt("--model", "-m", help="Model to fine-tune.")] = None,
    init: Annotated[str | None, Opt("--init", help="'gpt2': a new model from scratch.")] = None,
    tokenizer: Annotated[
        str | None, Opt("--tokenizer", help="Tokenizer directory for --init gpt2.")
    ] = None,
    n_layer: Annotated[int, Opt("--n-layer", help="New model: layers.")] = 4,
    n_embd: Annotated[int, Opt("--n-embd", help="New model: hidden size.")] = 256,
    n_head: Annotated[int, Opt("--n-head", help="New model: attention heads.")] = 4,
    valid: Annotated[str | None, Opt("--valid", help="Validation data file.")] = None,
    valid_split: Annotated[
        float | None, Opt("--valid-split", help="Hold out this fraction (the data's tail).")
    ] = None,
    format: Annotated[
        str | None,
        Opt(
            "--format",
            help="Prompt format: chat_template, sep, eos or text (default: text for text data).",
        ),
    ] = None,
    data_format: Annotated[
        str | None,
        Opt("--data-format", help="Data kind: text, convmodel, openai, sharegpt, chitchat."),
    ] = None,
    on_error: Annotated[str, Opt("--on-error", help="Malformed lines: skip or fail.")] = "skip",
    train_on: Annotated[
        str, Opt("--train-on", help="Loss on: assistant turns, all tokens, last reply.")
    ] = "assistant",
    max_steps: Annotated[int | None, Opt("--max-steps", help="Stop after N steps.")] = None,
    max_time: Annotated[float | None, Opt("--max-time", help="Stop after N minutes.")] = None,
    epochs: Annotated[
        float | None,
        Opt(
            "--epochs", help="Passes over the data. \\[default: 1; no limit with --max-time alone]"
        ),
    ] = None,
    batch_size: Annotated[int, Opt("--batch-size", help="Rows per micro-batch.")] = 8,
    grad_accum: Annotated[int, Opt("--grad-accum", help="Micro-batches per step.")] = 1,
    lr: Annotated[
        float | None,
        Opt(
            "--lr",
            help="Peak learning rate. "
            "\\[default: 5e-5 fine-tuning, 3e-4 with --lora, 6e-4 with --init gpt2]",
        ),
    ] = None,
    warmup: Annotated[float, Opt("--warmup", help="Warm-up: fraction (<1) or steps.")] = 0.05,
    context: Annotated[
        int | None,
        Opt(
            "--context",
            help="Row length in tokens. "
            "\\[default: the model's context, at most 1024; 256 with --init gpt2]",
        ),
    ] = None,
    eval_every: Annotated[int, Opt("--eval-every", help="Validate every N steps.")] = 100,
    save_every: Annotated[int, Opt("--save-every", help="Checkpoint every N steps.")] = 200,
    log_every: Annotated[
        int | None,
        Opt(
            "--log-every",
            help="Metrics row every N steps. \\[default: every step on runs of <= 50 steps, "
            "about 50 rows on longer ones, at most 10 steps apart]",
            show_default=False,
        ),
    ] = None,
    lora: Annotated[bool, Opt("--lora", help="Train LoRA adapters (peft).")] = False,
    lora_r: Annotated[int, Opt("--lora-r", help="LoRA rank.")] = 8,
    lora_alpha: Annotated[float, Opt("--lora-alpha", help="LoRA alpha.")] = 16.0,
    merge: Annotated[bool, Opt("--merge", help="Write merged LoRA weights.")] = False,
    precision: Annotated[str, Opt("--precision", help="auto, fp32 or bf16.")] = "auto",
    grad_checkpointing: Annotated[
        bool | None,
        Opt(
            "--grad-checkpointing/--no-grad-checkpointing",
            help="Recompute layers in backward to save memory (default: when it saves > 1 GB).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, Opt("--force", help="Train even when the memory estimate exceeds free memory.")
    ] = False,
    no_packing: Annotated[bool, Opt("--no-packing", help="One example per row.")] = False,
    resume: Annotated[
        bool, Opt("--resume", help="Continue from the newest intact checkpoint (error if none).")
    ] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace a previous run.")] = False,
    seed: Annotated[int, Opt("--seed", help="Random seed.")] = 0,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress bar.")] = False,
    threads: Annotated[
        int | None,
        Opt(
            "--threads",
            help="CPU threads. \\[default: the cores other processes leave free, "
            "re-checked as it trains]",
            show_default=False,
        ),
    ] = None,
    dpo: Annotated[
        bool,
        Opt(
            "--dpo",
            help="Preference tuning (DPO) on chosen/rejected pairs (TRL's preference JSONL, "
            "Anthropic HH, `logs export --format preference`): a LoRA adapter, the reference "
            "being the model with it switched off.",
        ),
    ] = False,
    beta: Annotated[
        float, Opt("--beta", help="DPO: how far the tuned model may move from the reference.")
    ] = 0.1,
    serve_to: Annotated[
        str | None,
        Opt(
            "--serve-to",
            metavar="URL",
            help="When training ends, load the LoRA adapter into the chatforge server running "
            "at URL, as --as NAME (a model already served so stays callable as NAME:v1, ...).",
        ),
    ] = None,
    as_name: Annotated[
        str | None,
        Opt(
            "--as",
            metavar="NAME",
            help="The name --serve-to serves it under. \\[default: the output folder's name]",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        Opt(
            "--api-key",
            envvar="CHATFORGE_API_KEY",
            show_envvar=False,
            help="The --serve-to server's --api-key (env CHATFORGE_API_KEY).",
        ),
    ] = None,
) -> None:
    """Fine-tune a model (--model) or train a new GPT-2 (--init gpt2) on your data;
    --dpo tunes it on your preference pairs."""
    from chatforge.errors import ChatforgeError
    from chatforge.publish import PublishError, check_publish_target, publish_after_training
    from chatforge.training.config import TrainConfig
    from chatforge.training.trainer import TrainingDiverged, TrainingInterrupted, train

    check_threads(threads)
    cfg = TrainConfig(  # a ParamError names the field; the CLI shows its flag
        data=data,
        output=output,
        model=model,
        init=init,
        tokenizer=tokenizer,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        valid=valid,
        valid_split=valid_split,
        format=format,
        data_format=data_format,
        on_error=on_error,
        train_on=train_on,
        max_steps=max_steps,
        max_time=max_time,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        context=context,
        eval_every=eval_every,
        save_every=save_every,
        log_every=log_every,
        lora=lora,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        merge=merge,
        precision=precision,
        packing=not no_packing,
        grad_checkpointing=grad_checkpointing,
        force=force,
        resume=resume,
        overwrite=overwrite,
        seed=seed,
        progress=not quiet,
        threads=threads,
        dpo=dpo,
        beta=beta,
    )
    if serve_to is not None and (not cfg.lora or merge):
        raise ChatforgeError(
            "--serve-to: only a LoRA adapter can be loaded into a running server "
            "(add --lora, without --merge)"
        )
    # --as without --serve-to, a bad name, a server that does not answer: now, not after
    # a ten-minute run.
    check_publish_target(serve_to, as_name, output, api_key)
    try:
        train(cfg)
    except TrainingInterrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(130) from None
    except TrainingDiverged as e:  # not a bad flag value as such: exit 1, not 2
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if serve_to is not None:
        try:
            typer.echo(publish_after_training(cfg.output, serve_to, as_name, api_key), err=True)
        except PublishError as e:  # the model is saved; the message says so and how to load it
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
