"""``chatforge eval``: held-out perplexity and reply statistics, models side by side."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from chatforge.cli.eval_prefs import eval_preferences, metrics_table
from chatforge.cli.options import DeviceOpt, ThreadsOpt, check_device, check_threads, use_threads
from chatforge.errors import ChatforgeError


def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to evaluate.")],
    data: Annotated[list[str], typer.Option("--data", "-d", help="Held-out data (repeatable).")],
    compare: Annotated[
        list[str] | None, typer.Option("--compare", help="More models, side by side.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", help="Conversations (a text corpus: texts) to score.")
    ] = 200,
    replies: Annotated[int, typer.Option("--replies", help="Replies to generate (0: none).")] = 32,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Reply length limit.")
    ] = 48,
    valid_split: Annotated[
        float | None,
        typer.Option("--valid-split", help="Score only the tail train --valid-split held out."),
    ] = None,
    data_format: Annotated[
        str | None, typer.Option("--data-format", help="Data kind override.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Sample replies with this seed (else greedy).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 or bf16.")] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Perplexity on held-out assistant turns (a .txt corpus: on all its tokens),
    distinct-1/2, repetition, reply length; on preference pairs (chosen/rejected JSONL),
    how often each model prefers the chosen reply, and DPO rewards against the first."""
    from rich.console import Console

    from chatforge.models import load_model
    from chatforge.training.data import load_data
    from chatforge.training.evaluate import evaluate, evaluate_text
    from chatforge.training.preference import is_preference_file

    if limit < 1:
        raise ChatforgeError("--limit must be >= 1")
    if replies < 0:
        raise ChatforgeError("--replies must be >= 0")
    if max_new_tokens < 1:
        raise ChatforgeError("--max-new-tokens must be >= 1")
    check_threads(threads)
    device = check_device(device)  # a GPU the machine lacks: one line, before loading
    if threads is not None:  # perplexity runs the model outside the engine
        import torch

        torch.set_num_threads(threads)
    err = Console(stderr=True)
    if data_format is None and all(is_preference_file(d) for d in data):
        eval_preferences(
            [model, *(compare or [])],
            data,
            limit=limit,
            replies=replies,
            max_new_tokens=max_new_tokens,
            seed=seed,
            dtype=dtype,
            device=device,
            as_json=as_json,
            threads=threads,
            valid_split=valid_split,
            err=err,
        )
        return
    bad: list[str] = []
    ds = load_data(data, data_format, "skip", bad.append)
    text = ds.kind == "text"  # a corpus: every token is scored, replies continue its lines
    if valid_split is not None:
        ds = ds.split_tail(valid_split)[1]
    if bad:
        err.print(f"[yellow]skipped {len(bad)} malformed line(s)[/] (first: {bad[0]})")
    items = ds.texts[:limit] if text else ds.conversations[:limit]
    what = "texts" if text else "conversations"
    results = []
    for ref in [model, *(compare or [])]:
        loaded = load_model(ref, dtype, device=device)
        use_threads(loaded, threads)  # before evaluate makes the model's engine
        if not as_json:
            err.print(f"evaluating {ref} on {len(items)} {what} ...")
        run = evaluate_text if text else evaluate
        results.append(run(loaded, items, ref, replies, max_new_tokens, seed))
        del loaded
    if as_json:
        print(json.dumps({"models": [r.to_dict() for r in results]}, indent=2))
        return
    rows = [
        ("perplexity", "perplexity", ".2f"),
        ("loss (nats/token)", "loss", ".4f"),
        ("tokens scored" if text else "assistant tokens", "eval_tokens", ","),
        ("distinct-1", "distinct_1", ".3f"),
        ("distinct-2", "distinct_2", ".3f"),
        ("repeated 3-gram rate", "repeated_ngram_rate", ".3f"),
        ("mean reply tokens", "mean_reply_tokens", ".1f"),
        ("replies", "replies", "d"),
    ]
    out = Console()
    out.print(metrics_table(f"{len(items)} held-out {what}", results, rows))
    for r in results:
        for s in r.samples[:2]:
            out.print(f"[bold]{r.model}[/] > {s['prompt'][:80]!r}\n  {s['reply'][:160]!r}")
