"""Options shared by commands (model and generation flags) and their translation
into library objects. Values are validated by the library's dataclasses; the
messages there name the parameter, which we map back to its flag here."""

from __future__ import annotations

import re
from typing import Annotated

import typer

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Model: smollm2, a model directory, a .gguf file or a hub id."
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype", help="fp32, bf16, or auto (the fastest setting that passes the quality check)."
    ),
]
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        "-q",
        help="Weight-only quantisation of the fast path: none, int8, int4 or auto (default: "
        "the fastest setting that passes the quality check).",
    ),
]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", help="Generation preset: precise, balanced or creative."),
]
TemperatureOpt = Annotated[
    float | None, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy.")
]
TopKOpt = Annotated[
    int | None, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")
]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass in (0, 1].")]
MinPOpt = Annotated[
    float | None, typer.Option("--min-p", help="Drop tokens below min_p x the top probability.")
]
RepPenOpt = Annotated[
    float | None, typer.Option("--repetition-penalty", help="> 1 discourages repeats (1 = off).")
]
NoRepeatOpt = Annotated[
    int | None, typer.Option("--no-repeat-ngram-size", help="Never repeat an n-gram of this size.")
]
MaxNewOpt = Annotated[int | None, typer.Option("--max-new-tokens", help="Reply length limit.")]
MaxLenOpt = Annotated[
    int | None, typer.Option("--max-length", help="Prompt + reply length limit, in tokens.")
]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Random seed for reproducible sampling.")
]


def flag_for(param: str) -> str:
    return "--" + param.replace("_", "-")


def flagify(message: str) -> str:
    """Rewrite parameter names in a validation message as the flags a CLI user typed."""
    names = (
        "temperature|top_k|top_p|min_p|repetition_penalty|no_repeat_ngram_size|"
        "max_new_tokens|max_length|stop|seed|do_sample"
    )
    return re.sub(rf"^({names})\b(?= must)", lambda m: flag_for(m.group(1)), message)


def build_config(
    preset: str | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    stop: list[str] | None = None,
    seed: int | None = None,
):
    """A validated GenerationConfig from a preset plus explicit flags."""
    from chatforge.generation.config import GenerationConfig

    overrides = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        stop=tuple(stop) if stop else None,
        seed=seed,
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if preset:
        return GenerationConfig.from_preset(preset, **overrides)
    return GenerationConfig(**overrides)
