"""Named models: a base model plus a system prompt, generation settings and an
optional LoRA adapter, stored under a short name (as Ollama's Modelfile).

A recipe is a small JSON file in the data directory (``named-models/``); it holds
references, never weights. ``chatforge models create NAME --from MODEL ...`` writes
one, and ``chat``/``generate``/``serve`` accept the name wherever they take a model::

    recipe = create_recipe("pirate", "smollm2", system="You are a pirate.",
                           preset="creative", params={"max_new_tokens": 64})
    loaded = load_recipe_model(get_recipe("pirate"))
    chat = ChatSession(loaded, recipe.generation_config(), system=recipe.system)

Everything is checked when the recipe is made (the base resolves, the adapter is
one, the settings are valid), without loading any weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from chatforge.errors import ChatforgeError, InputError, ModelLoadError, ParamError
from chatforge.fsutil import atomic_write
from chatforge.generation.config import (
    DEFAULT_PRESET,
    GREEDY_DROPS,
    PRESETS,
    GenerationConfig,
)
from chatforge.models.adapter_files import check_adapter_files
from chatforge.models.gguf_file import check_gguf
from chatforge.models.loading import LoadedModel, load_model
from chatforge.models.registry import ALIASES, resolve_alias
from chatforge.models.resolve import HUB_ID, check_hf_dir
from chatforge.paths import data_dir

RECIPES_DIR = "named-models"
"""The folder of the data directory that holds one ``NAME.json`` per named model."""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
"""A recipe name: letters, digits and ``-_.:``, starting with a letter or digit, <= 64."""

# Fields of the model's config.json that must agree between a LoRA adapter's base and
# the base a recipe puts it on (the adapter's matrices are shaped by them).
_SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "n_embd",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "intermediate_size",
)


@dataclass
class Recipe:
    """A named model: what ``chatforge models create`` stores."""

    name: str
    """The name commands take (``chatforge chat NAME``); matched case-insensitively."""
    base: str
    """The base model: a bundled name (``smollm2``), an absolute directory or .gguf path,
    or a hub id."""
    system: str | None = None
    """The system prompt chat and generate start from (``--system`` replaces it)."""
    preset: str | None = None
    """A generation preset (see :data:`~chatforge.generation.config.PRESETS`); None
    means the default one (:data:`~chatforge.generation.config.DEFAULT_PRESET`)."""
    params: dict[str, Any] = field(default_factory=dict)
    """GenerationConfig fields set on top of the preset, as JSON values."""
    adapter: str | None = None
    """An absolute LoRA adapter directory (``chatforge train --lora``) merged into the base."""
    created: str = ""
    """When the recipe was written (ISO 8601, UTC)."""

    def generation_config(self, base: GenerationConfig | None = None) -> GenerationConfig:
        """The recipe's generation settings: its preset, then its params over it.

        Without ``base`` the starting point is the CLI's (the preset, else
        :data:`DEFAULT_PRESET`); with one (a server's defaults) the preset's values
        and the params are applied over ``base``. As on the command line, an explicit
        ``temperature`` of 0 drops the preset's penalties unless the params set them.
        """
        params = dict(self.params)
        if base is None:
            return GenerationConfig.from_preset(self.preset or DEFAULT_PRESET, **params)
        preset: dict[str, Any] = {}
        if self.preset:
            key = self.preset.strip().lower()
            if key not in PRESETS:
                raise InputError(
                    f"named model {self.name!r} has an unknown preset {self.preset!r}; "
                    f"choose one of: {', '.join(PRESETS)}"
                )
            preset = dict(PRESETS[key])
        if params.get("temperature") == 0:
            for name in GREEDY_DROPS:
                preset.pop(name, None)
        return base.replace(**{**preset, **params})

    def to_dict(self) -> dict[str, Any]:
        """The recipe as stored (JSON-able)."""
        return asdict(self)


# -- names and files ---------------------------------------------------------------


def recipes_dir() -> Path:
    """The folder holding the recipes (created on the first write)."""
    return data_dir() / RECIPES_DIR


def _path(name: str) -> Path:
    # Names are case-insensitive (so they mean one file on every file system); ':'
    # is percent-encoded, as Windows file names cannot hold it.
    return recipes_dir() / (quote(name.lower(), safe="-_.") + ".json")


def check_name(name: str) -> str:
    """``name`` if it can name a recipe, else a :class:`ChatforgeError` saying why."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InputError(
            f"model name {name!r} is not a simple name: use letters, digits and - _ . : "
            "(starting with a letter or digit, at most 64 characters)"
        )
    if name.lower() in ALIASES:
        raise InputError(f"{name!r} is a bundled model's name; pick another name")
    return name


def _read(path: Path) -> Recipe:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {k: data[k] for k in Recipe.__dataclass_fields__ if k in data}
        recipe = Recipe(**known)
        if not isinstance(recipe.name, str) or not isinstance(recipe.base, str):
            raise ValueError("no name or base")
        if not isinstance(recipe.params, dict):
            raise ValueError("params is not an object")
    except (OSError, ValueError, TypeError) as e:
        raise ChatforgeError(
            f"the named model file {path} is unreadable ({e}); remove it with "
            f"`chatforge models rm {unquote(path.stem)}` or create it again with --force"
        ) from None
    return recipe


def get_recipe(name: str) -> Recipe | None:
    """The recipe called ``name`` (any case), or None when there is none."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        return None
    path = _path(name)
    if not path.is_file():
        return None
    return _read(path)


def resolve_named(ref: str | None) -> Recipe | None:
    """The recipe a model reference names, or None for any other reference (a path,
    a bundled name, a hub id). Commands call this before :func:`load_model`, so a
    named model wins over a directory of the same name in the current folder."""
    if not ref:
        return None
    if ref.lower() in ALIASES:
        return None
    return get_recipe(ref)


def list_recipes() -> list[Recipe]:
    """Every readable recipe, by name (unreadable files are left out)."""
    root = recipes_dir()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.glob("*.json")):
        try:
            out.append(_read(path))
        except ChatforgeError:
            continue
    return sorted(out, key=lambda r: r.name.lower())


def remove_recipe(name: str) -> bool:
    """Delete the recipe ``name`` (never its base or adapter); False when there is none."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        return False
    try:
        _path(name).unlink()
    except FileNotFoundError:
        return False
    return True


# -- creating ----------------------------------------------------------------------


def parse_settings(items: Iterable[str]) -> dict[str, Any]:
    """``["temperature=0.3", "stop=User:|Bot:"]`` -> typed, JSON-able values, parsed as
    the chat's ``/set NAME VALUE`` parses them (``none``/``off`` turn a setting off)."""
    config = GenerationConfig()
    names: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not key:
            raise InputError(f"--set takes NAME=VALUE, e.g. temperature=0.3 (got {item!r})")
        if key == "preset":
            raise InputError("use --preset NAME rather than --set preset=NAME")
        try:
            config = config.set_param(key, value)
        except ParamError as e:
            raise InputError(e.render(f"--set {key}")) from None
        if key not in names:
            names.append(key)
    return {k: _jsonable(k, getattr(config, k)) for k in names}


def _jsonable(key: str, value: Any) -> Any:
    if key == "stop":
        return list(value)
    if key == "logit_bias" and value is not None:
        return {str(k): v for k, v in value.items()}
    return value


def create_recipe(
    name: str,
    base: str,
    system: str | None = None,
    preset: str | None = None,
    params: Mapping[str, Any] | None = None,
    adapter: str | Path | None = None,
    force: bool = False,
) -> Recipe:
    """Check and store a named model; returns the stored :class:`Recipe`.

    ``base`` and ``adapter`` paths are stored absolute. Raises a
    :class:`~chatforge.errors.ChatforgeError` naming the problem when the name is
    taken (unless ``force``) or not a simple name, the base does not resolve, the
    adapter directory holds no ``adapter_config.json`` or does not fit the base, or
    a setting is not a valid :class:`GenerationConfig` value. No weights are loaded.
    """
    check_name(name)
    if not force and get_recipe_quiet(name) is not None:
        raise InputError(
            f"a named model {name!r} already exists; pass --force to replace it "
            f"(see `chatforge models show {name}`)"
        )
    stored_base = check_base(base)
    preset_key = None
    if preset is not None:
        preset_key = preset.strip().lower()
        if preset_key not in PRESETS:
            raise ParamError("preset", f"must be one of {', '.join(PRESETS)} (got {preset!r})")
    values = {k: _jsonable(k, v) for k, v in dict(params or {}).items()}
    stored_adapter = check_adapter(adapter, stored_base) if adapter is not None else None
    if system is not None and not system.strip():
        system = None
    recipe = Recipe(
        name=name,
        base=stored_base,
        system=system,
        preset=preset_key,
        params=values,
        adapter=stored_adapter,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    recipe.generation_config()  # every value valid, and valid together
    recipe.generation_config(GenerationConfig())
    path = _path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(recipe.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return recipe


def get_recipe_quiet(name: str) -> Recipe | Path | None:
    """The recipe ``name`` as :func:`get_recipe` returns it, but an unreadable file
    is returned as its path rather than raised (it still takes the name)."""
    try:
        return get_recipe(name)
    except ChatforgeError:
        return _path(name)


def check_base(ref: str) -> str:
    """How a recipe stores the base model ``ref`` (bundled names lower-cased, paths
    absolute), after checking it resolves: cheaply, converting and loading nothing."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelLoadError("--from needs a model: smollm2, a model directory, a .gguf file")
    if ref.lower() in ALIASES:
        resolve_alias(ref)  # installed?
        return ref.lower()
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf":
        check_gguf(path, parse=False)
        return str(path.resolve())
    if path.exists():
        directory = check_hf_dir(path)
        return str(directory.resolve())
    if get_recipe_quiet(ref) is not None:
        raise ModelLoadError(
            f"{ref!r} is a named model; a named model's base must be a model "
            f"(see `chatforge models show {ref}` for its base)"
        )
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        if _hub_cached(ref):
            return ref
        raise ModelLoadError(
            f"{ref!r} is not in the local Hugging Face cache; download it first "
            "(huggingface-cli download) or pass a model directory or .gguf file"
        )
    known = ", ".join(sorted(ALIASES))
    raise ModelLoadError(
        f"model {ref!r} not found: no such directory or file, and it is not a known name "
        f"({known}) or a hub id (owner/name); see `chatforge models list`"
    )


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, allow_patterns=["*.json"], local_files_only=True)
    except Exception:
        return False
    return True


def check_adapter(adapter: str | Path, base: str) -> str:
    """The absolute path of a LoRA adapter directory, after checking it is one, that its
    files are sound (:func:`~chatforge.models.adapter_files.check_adapter_files`) and,
    where both configs can be read, that its base has the shapes of ``base``."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"adapter directory {adapter} does not exist")
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{path.resolve()} holds no adapter_config.json: it is not a LoRA adapter directory "
            "(one written by `chatforge train --lora` without --merge)"
        )
    # Its files (config fields, the weights' header and names), in milliseconds: a
    # corrupt adapter is refused here, not when the named model is first loaded.
    check_adapter_files(path, need_base=False)
    base_path = Path(base)
    if base_path.is_dir():
        if (base_path / "adapter_config.json").exists():
            raise ModelLoadError(
                f"the base {base} is itself a LoRA adapter; use it alone, or give its "
                "base model with --from"
            )
        mine, theirs = _config(path), _config(base_path)
        if mine and theirs:
            differ = [k for k in _SHAPE_KEYS if k in mine and k in theirs and mine[k] != theirs[k]]
            if differ:
                what = ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in differ)
                raise ModelLoadError(
                    f"the LoRA adapter in {adapter} was trained on another kind of model "
                    f"than {base} ({what}); give the base it was trained on"
                )
    return str(path.resolve())


def _config(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- loading -----------------------------------------------------------------------


def load_recipe_model(
    recipe: Recipe,
    dtype: str | None = "auto",
    quantize: str | None = "auto",
    format: str | None = None,
    device: str | None = "auto",
) -> LoadedModel:
    """Load a recipe's model: its base, with its LoRA adapter when it has one.

    With an adapter, the adapter directory's tokenizer and prompt format are used
    (as when loading that directory) and the adapter is put on the recipe's base
    (applied per request on the fast path, as ``load_model`` does for an adapter
    directory), which may differ from the base the adapter records (it must have the
    same shapes). ``info.name`` and ``info.ref`` are the recipe's name. ``format``: a
    prompt format instead of the model's own, ``device`` where it runs (as ``load_model``
    takes them).
    """
    if recipe.adapter:
        adapter = Path(recipe.adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"the named model {recipe.name!r} uses the LoRA adapter {adapter}, which is "
                "gone; create it again with another --adapter"
            )
        loaded = load_model(
            str(adapter),
            dtype=dtype,
            quantize=quantize,
            base=recipe.base,
            format=format,
            device=device,
        )
    else:
        loaded = load_model(
            recipe.base, dtype=dtype, quantize=quantize, format=format, device=device
        )
    loaded.info.name = recipe.name
    loaded.info.ref = recipe.name
    return loaded
