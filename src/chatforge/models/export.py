"""Export a model for other runtimes: a GGUF file (llama.cpp) or a plain HF directory.

Any model reference works (alias, trained model directory, LoRA adapter directory,
HF directory, ``.gguf`` file): it is resolved and loaded with transformers in fp32,
a LoRA adapter merged into its base, so the export holds exactly the weights
chatforge runs with ``--quantize none``.

GGUF follows llama.cpp's ``convert_hf_to_gguf.py``: the same metadata keys, tensor
names (via ``gguf``'s tensor name map) and layouts (Llama Q/K rows permuted for
llama.cpp's RoPE; GPT-2 ``Conv1D`` weights transposed), and the same precision rules
(norms, biases and 1-D tensors in f32; a tensor whose rows are not whole quant
blocks stays f16). The tokenizer is written from *our* tokenizer (its vocabulary,
merges, special ids, chat template), so llama.cpp tokenises text as chatforge does.

Limitation: llama.cpp has no token-type input, so a sep-format GPT-2 (which
chatforge feeds ``token_type_ids``) computes slightly different logits there; the
``<sep>`` token itself is kept as one control token and marked end-of-turn.

Both outputs are written beside the target under a temporary name and renamed
into place, so a failed export leaves no partial file and never damages an
existing one. The request (:class:`ExportConfig`), its checks and the atomic output
are in :mod:`chatforge.models.export_common`, shared with the GGUF writer
(:mod:`chatforge.models.export_gguf`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from chatforge.models.adapter_files import adapter_base
from chatforge.models.export_common import (
    DEFAULT_QUANTIZE,
    ExportConfig,
    ExportError,
    check_architecture,
    install,
    prompt_format,
    temp_path,
)
from chatforge.models.export_gguf import write_gguf
from chatforge.models.loading import load_transformers
from chatforge.models.meta import ModelMeta
from chatforge.models.recipes import resolve_named
from chatforge.models.resolve import resolve
from chatforge.noise import quiet_libraries, quiet_transformers

__all__ = ["DEFAULT_QUANTIZE", "ExportConfig", "ExportError", "export_model"]

log = logging.getLogger(__name__)


def export_model(
    ref: str,
    out: str | os.PathLike[str],
    format: str = "gguf",
    quantize: str | None = None,
    force: bool = False,
) -> Path:
    """Export the model ``ref`` (or a named model: its base, adapter merged) to ``out``
    and return the path written.

    ``format="gguf"`` writes one llama.cpp file with the weights in ``quantize``
    (``f16`` when None, ``q8_0`` or ``q4_0``; norms and biases stay f32) and the
    tokenizer, chat template and special tokens; ``format="hf"`` writes a
    transformers directory (safetensors, tokenizer, chat template) that vLLM or TGI
    load unchanged (``quantize`` must then be None). A LoRA adapter directory is
    exported merged into its base. An existing ``out`` is an error unless ``force``;
    the output appears only once complete.

    >>> export_model("smollm2", "smollm2-q8.gguf", quantize="q8_0")  # doctest: +SKIP
    PosixPath('smollm2-q8.gguf')
    """
    cfg = ExportConfig(ref, Path(out), format, quantize, force)
    _check_target(cfg)
    quiet_libraries()
    t0 = time.perf_counter()
    recipe = resolve_named(str(ref))  # a named model: its base with its adapter merged
    base = recipe.base if recipe is not None and recipe.adapter else None
    source = (recipe.adapter or recipe.base) if recipe is not None else str(ref)
    directory, _, display = resolve(source)
    if recipe is not None:
        display = recipe.name
    model_type = _config_model_type(directory)
    if cfg.format == "gguf" and model_type is not None:  # before loading the weights
        check_architecture(model_type)
    with quiet_transformers():
        tokenizer = _load_tokenizer(directory)
    model = load_transformers(directory, "fp32", base=base)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.format == "gguf":
        write_gguf(cfg, model, tokenizer, directory, display)
    else:
        _write_hf(cfg, model, tokenizer, directory, display)
    log.info("exported %s to %s in %.1fs", ref, cfg.out, time.perf_counter() - t0)
    return cfg.out


# -- checks -------------------------------------------------------------------


def _check_target(cfg: ExportConfig) -> None:
    out = cfg.out
    if not (out.exists() or out.is_symlink()):
        return
    if not cfg.force:
        raise ExportError(f"{out} already exists; pass --force (force=True) to replace it")
    if cfg.format == "gguf" and out.is_dir() and not out.is_symlink():
        raise ExportError(f"{out} is a directory; a GGUF export writes a file: choose a file name")


def _config_model_type(directory: Path) -> str | None:
    """The model_type in config.json (None where there is none, e.g. a bare adapter)."""
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        base = _base_dir(directory)
        return _config_model_type(base) if base is not None else None
    return data.get("model_type") if isinstance(data, dict) else None


def _base_dir(directory: Path) -> Path | None:
    """A LoRA adapter directory's base model directory (None for other directories)."""
    if not (directory / "adapter_config.json").exists():
        return None
    base = adapter_base(directory)
    return resolve(str(base))[0] if base else None


def _load_tokenizer(directory: Path) -> Any:
    """The model's tokenizer; a LoRA adapter directory without one uses its base's
    (transformers would otherwise build an empty tokenizer from the config alone)."""
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    source = directory
    if not any((directory / f).exists() for f in files):
        source = _base_dir(directory) or directory
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise ExportError(f"could not load the tokenizer in {source}: {e}") from e


# -- hf -------------------------------------------------------------------------


def _write_hf(cfg: ExportConfig, model: Any, tokenizer: Any, directory: Path, name: str) -> None:
    tmp = temp_path(cfg.out)
    try:
        tmp.mkdir()
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _template_in_config(tmp, tokenizer)
        meta = ModelMeta.read(directory)
        ModelMeta(
            prompt_format=prompt_format(tokenizer, directory),
            name=(meta.name if meta and meta.name else name),
            source=cfg.ref,
        ).write(tmp)
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        install(tmp, cfg.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _template_in_config(directory: Path, tokenizer: Any) -> None:
    """Also put the chat template in tokenizer_config.json: transformers < 4.45 (what
    older vLLM / TGI images run) reads it only there, not from chat_template.jinja."""
    template = getattr(tokenizer, "chat_template", None)
    path = directory / "tokenizer_config.json"
    if not isinstance(template, str) or not path.exists():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if "chat_template" not in data:
        data["chat_template"] = template
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
