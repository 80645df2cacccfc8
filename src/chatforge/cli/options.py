"""Options shared by commands (model and generation flags) and their translation
into library objects. Values are validated by the library's dataclasses, which
raise :class:`~chatforge.errors.ParamError` naming the field; :func:`user_message`
names its flag instead."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from chatforge.device import DEVICE_HELP
from chatforge.errors import ChatforgeError, ParamError
from chatforge.generation.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PRESET, PRESETS
from chatforge.models.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from chatforge.generation.config import GenerationConfig
    from chatforge.models.recipes import Recipe


def hide_flag_types() -> None:
    """Show no ``<bool>`` type beside on/off flags (``--lora``, ``--progress/--no-progress``,
    ``--help``) in ``--help``: they take no value. Typer (>= 0.24) shows each option's
    type there, flags included; this changes that for every command."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - other typer layouts show no types
        return
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "hides_flags", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        return shown(self, ctx)

    display_type_rich.hides_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


hide_flag_types()

"""The preset ``chat`` and ``generate`` start from when no --preset is given."""


def _preset_default(help: str, param: str) -> str:
    """``help`` plus the value ``param`` takes when no flag sets it (from the default
    preset, else GenerationConfig's own default), e.g. ``[default: 0.2 (preset balanced)]``
    (the ``[`` escaped: help text is rich markup)."""
    from chatforge.generation.config import GenerationConfig

    if param in PRESETS[DEFAULT_PRESET]:
        return f"{help} \\[default: {PRESETS[DEFAULT_PRESET][param]} (preset {DEFAULT_PRESET})]"
    return f"{help} \\[default: {GenerationConfig.__dataclass_fields__[param].default}]"


ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="The endpoint's API key (other users can see it in the process list; "
        "CHATFORGE_API_KEY cannot be seen). Default: --api-key-env, else "
        "CHATFORGE_API_KEY, else OPENAI_API_KEY.",
    ),
]
ApiKeyEnvOpt = Annotated[
    str | None,
    typer.Option("--api-key-env", help="Variable holding the endpoint's API key."),
]

MaxConcurrencyOpt = Annotated[
    int | None,
    typer.Option(
        "--max-concurrency",
        help="Requests in flight at once, with --api-base. \\[default: 4]",
        show_default=False,
    ),
]
"""``generate``/``compare --api-base``: requests sent at once."""

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model: smollm2, a named model (`chatforge models create`), a model directory, "
        "a .gguf file or a hub id.",
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="fp32, bf16, fp16 (a GPU), or auto (on the CPU the fastest setting that passes "
        "the quality check; on a GPU bf16, else fp16).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help=DEVICE_HELP),
]
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        "-q",
        help="Weight-only quantisation of the fast path: none, int8, int4, gguf (a .gguf "
        "model's own quantised weights) or auto (default: gguf for a .gguf model with "
        "Q4_0/Q4_1/Q8_0 weights, else int8).",
    ),
]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help=f"Generation preset: precise, balanced or creative. \\[default: {DEFAULT_PRESET}]",
    ),
]
TemperatureOpt = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        "-t",
        help=_preset_default("Sampling temperature; 0 = greedy.", "temperature"),
    ),
]
TopKOpt = Annotated[
    int | None,
    typer.Option(
        "--top-k", help=_preset_default("Keep the k most likely tokens (0 = off).", "top_k")
    ),
]
TopPOpt = Annotated[
    float | None,
    typer.Option("--top-p", help=_preset_default("Nucleus sampling mass in (0, 1].", "top_p")),
]
MinPOpt = Annotated[
    float | None,
    typer.Option(
        "--min-p", help=_preset_default("Drop tokens below min_p x the top probability.", "min_p")
    ),
]
RepPenOpt = Annotated[
    float | None,
    typer.Option(
        "--repetition-penalty",
        help=_preset_default("> 1 discourages repeats (1 = off).", "repetition_penalty"),
    ),
]
PresenceOpt = Annotated[
    float | None,
    typer.Option(
        "--presence-penalty", help="OpenAI's: penalise tokens already in the reply (-2..2)."
    ),
]
FrequencyOpt = Annotated[
    float | None,
    typer.Option(
        "--frequency-penalty", help="OpenAI's: penalise tokens by their count in the reply (-2..2)."
    ),
]
LogitBiasOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--logit-bias", help="ID:BIAS, added to that token's logit (-100 bans it; repeatable)."
    ),
]
JsonSchemaOpt = Annotated[
    Path | None,
    typer.Option(
        "--json-schema",
        help="A JSON Schema file: every reply is JSON that follows it.",
        show_default=False,
    ),
]
NoRepeatOpt = Annotated[
    int | None, typer.Option("--no-repeat-ngram-size", help="Never repeat an n-gram of this size.")
]
MaxNewOpt = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens",
        help=f"Reply length limit. \\[default: {DEFAULT_MAX_NEW_TOKENS} (none with --max-length)]",
    ),
]
MaxLenOpt = Annotated[
    int | None, typer.Option("--max-length", help="Prompt + reply length limit, in tokens.")
]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")]
SlideOpt = Annotated[
    bool | None,
    typer.Option(
        "--slide",
        help="Keep generating past the model's context: drop the oldest tokens after the "
        "system prompt (or --keep N tokens) and compute the window again.",
        show_default=False,
    ),
]
KeepOpt = Annotated[
    int | None,
    typer.Option(
        "--keep",
        help="With --slide: tokens at the start never dropped. \\[default: the system prompt]",
        show_default=False,
    ),
]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Random seed for reproducible sampling.")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads for the model (default: auto, the cores other processes leave free).",
        show_default=False,
    ),
]

PromptFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="Prompt format instead of the model's own: text (continue the prompt as plain "
        "text: no template, stops at EOS or a blank line), chat_template, sep or eos.",
        show_default=False,
    ),
]


def check_format(name: str | None) -> None:
    """``--format`` must name a prompt format (checked before the slow model load)."""
    from chatforge.conversation.formats import FORMATS

    if name is not None and name not in FORMATS:
        raise ChatforgeError(f"--format must be one of {', '.join(FORMATS)} (got {name!r})")


def check_device(device: str) -> str:
    """``--device`` must name a device this machine has (checked before the slow model
    load; one line otherwise); returns it normalised (``auto`` kept)."""
    from chatforge.device import check_device_spec, resolve_device

    spec = check_device_spec(device)
    resolve_device(spec)
    return spec


def check_threads(threads: int | None) -> None:
    """``--threads`` must be >= 1 when given (checked before the slow model load)."""
    if threads is not None and threads < 1:
        raise ChatforgeError(f"--threads must be >= 1 (got {threads})")


def use_threads(loaded: Any, threads: int | None) -> None:
    """Make ``loaded``'s shared engine (which chat, generate, eval and serve use) run
    with ``threads``; None keeps the default (auto). Call before anything makes it."""
    if threads is None:
        return
    from chatforge.generation.engine import Engine, EngineConfig

    Engine.shared(loaded, EngineConfig(threads=threads))


# Settings whose flag is not "--" + the name with dashes (TrainConfig's negated booleans).
_FLAGS = {"packing": "--no-packing", "progress": "--quiet"}


def flag_for(param: str) -> str:
    """The flag that sets the config field ``param``: ``top_p`` -> ``--top-p``."""
    return _FLAGS.get(param) or "--" + param.replace("_", "-")


def user_message(error: ChatforgeError) -> str:
    """``error``'s message for a CLI user: a :class:`ParamError` names its flag."""
    if isinstance(error, ParamError):
        return error.render(flag_for(error.param))
    return str(error)


@dataclass(frozen=True)
class GenerationFlags:
    """The generation flags ``chat`` and ``generate`` share; None = not given.

    Each field is the flag of the same name (``top_k`` is ``--top-k``).
    A command declares each flag as a parameter (typer reads flags from the
    signature, typed with the ``*Opt`` aliases above) and collects them here with
    ``GenerationFlags.from_params(locals())``.
    """

    preset: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: list[str] | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    json_schema: Path | None = None
    slide: bool | None = None
    keep: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> GenerationFlags:
        """The flags out of a command's parameters (its ``locals()``; other names are ignored)."""
        return cls(**{f.name: params[f.name] for f in fields(cls)})

    def config(
        self, default_preset: str | None = None, under: Mapping[str, Any] | None = None
    ) -> GenerationConfig:
        """A validated GenerationConfig: the preset (or ``default_preset``), then the
        settings ``under`` the flags (a named model's parameters), then the given flags."""
        from chatforge.generation.config import GenerationConfig

        overrides = {**(under or {}), **self.given()}
        preset = self.preset or default_preset
        if preset:
            return GenerationConfig.from_preset(preset, **overrides)
        return GenerationConfig(**overrides)

    def given(self) -> dict[str, Any]:
        """The flags the user gave (``--preset`` aside), as GenerationConfig values."""
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "preset"}
        given["stop"] = tuple(self.stop) if self.stop else None
        given["logit_bias"] = _parse_logit_bias(self.logit_bias) if self.logit_bias else None
        if self.json_schema is not None:
            from chatforge.generation.config import load_json_schema

            given["json_schema"] = load_json_schema(str(self.json_schema))
        return {k: v for k, v in given.items() if v is not None}


def _parse_logit_bias(items: list[str]) -> dict[int, float]:
    """``["42:-100", "7:5"]`` -> ``{42: -100.0, 7: 5.0}``; a clear error otherwise."""
    out: dict[int, float] = {}
    for item in items:
        tok, sep, val = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out[int(tok)] = float(val)
        except ValueError:
            raise ParamError("logit_bias", f"takes ID:BIAS, e.g. 42:-100 (got {item!r})") from None
    return out


# -- named models (`chatforge models create`) ---------------------------------------


def model_ref(name: str | None, model: str) -> str:
    """The model a command runs: its MODEL argument or ``--model`` (not both)."""
    if name is None:
        return model
    if model != DEFAULT_MODEL and model != name:
        raise ChatforgeError(f"give the model once: {name!r} as MODEL or --model {model!r}")
    return name


def named_model(ref: str) -> Recipe | None:
    """The named model ``ref`` names, or None (any other model reference)."""
    from chatforge.models.recipes import resolve_named

    return resolve_named(ref)


def recipe_settings(
    recipe: Recipe | None, flags: GenerationFlags, system: str | None
) -> tuple[GenerationConfig, str | None, str]:
    """(generation config, system prompt, preset name) for a command: the named model's
    settings (when ``recipe``) under the flags the user gave; a flag not given never
    overrides the recipe. ``--system ""`` drops the recipe's system prompt."""
    preset = flags.preset or (recipe.preset if recipe else None) or DEFAULT_PRESET
    if recipe is None:
        return flags.config(default_preset=DEFAULT_PRESET), system, preset.strip().lower()
    config = flags.config(default_preset=recipe.preset or DEFAULT_PRESET, under=recipe.params)
    system = recipe.system if system is None else (system or None)
    return config, system, preset.strip().lower()
