"""``chatforge eval`` on preference pairs: which model prefers the replies you chose."""

from __future__ import annotations

import json
import time
from typing import Any

from chatforge.cli.options import use_threads


def metrics_table(title: str, results: list[Any], rows: list[tuple[str, str, str]]) -> Any:
    """A rich table of models side by side: one column per result (its ``model``), one
    row per ``(label, attribute, format spec)``; a missing value shows as ``-``."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for r in results:
        table.add_column(r.model)
    for label, key, spec in rows:
        values = (getattr(r, key) for r in results)
        table.add_row(label, *("-" if v is None else format(v, spec) for v in values))
    return table


def eval_preferences(
    models: list[str],
    data: list[str],
    *,
    limit: int,
    replies: int,
    max_new_tokens: int,
    seed: int | None,
    dtype: str,
    device: str,
    as_json: bool,
    threads: int | None,
    valid_split: float | None,
    err: Any,
) -> None:
    """Score held-out pairs with each model (rewards against the first) and show a few
    of each model's replies to the pairs' prompts side by side."""
    from rich.console import Console
    from rich.table import Table

    from chatforge.models import load_model
    from chatforge.training.evaluate import generate_replies
    from chatforge.training.pref_eval import encode_for, pair_logps, summarize
    from chatforge.training.preference import load_preferences

    bad: list[str] = []
    prefs = load_preferences(data, "skip", bad.append)
    if valid_split is not None:
        prefs = prefs.split_tail(valid_split)[1]
    if bad:
        err.print(f"[yellow]skipped {len(bad)} malformed line(s)[/] (first: {bad[0]})")
    pairs = prefs.pairs[:limit]
    prompts = [p.prompt for p in pairs[: min(replies, len(pairs))]]
    scores, samples, ref = [], [], None
    for name in models:
        t0 = time.perf_counter()
        loaded = load_model(name, dtype, device=device)
        use_threads(loaded, threads)
        if not as_json:
            err.print(f"scoring {name} on {len(pairs)} held-out pairs ...")
        logps = pair_logps(loaded, encode_for(loaded, pairs))  # (N, 2)
        scores.append(summarize(name, logps, ref, seconds=time.perf_counter() - t0))
        ref = logps if ref is None else ref
        done = generate_replies(loaded, prompts, max_new_tokens, seed) if prompts else []
        samples.append([c.text for c in done])
        del loaded
    if as_json:
        out = {
            "pairs": len(pairs),
            "models": [s.to_dict() for s in scores],
            "samples": [
                {
                    "prompt": prompts[i][-1].content,
                    **{m: samples[j][i] for j, m in enumerate(models)},
                }
                for i in range(len(prompts))
            ],
        }
        print(json.dumps(out, indent=2))
        return
    rows = [
        ("preference accuracy", "accuracy", ".3f"),
        ("log-lik margin (nats)", "margin", ".2f"),
        (f"reward accuracy vs {models[0]}", "reward_accuracy", ".3f"),
        (f"reward margin vs {models[0]}", "reward_margin", ".3f"),
    ]
    out = Console()
    out.print(metrics_table(f"{len(pairs)} held-out preference pairs", scores, rows))
    if prompts:
        side = Table(title="replies to held-out prompts", show_lines=True)
        side.add_column("prompt")
        for m in models:
            side.add_column(m)
        for i, p in enumerate(prompts[:8]):
            side.add_row(p[-1].content[:120], *(samples[j][i][:240] for j in range(len(models))))
        out.print(side)
