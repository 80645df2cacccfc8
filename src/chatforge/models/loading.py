"""Load a model reference into a model and tokenizer ready for the engine.

The reference (alias, ``.gguf`` file, model directory, hub id) becomes a local
directory in :mod:`chatforge.models.resolve`; this loads it: the tokenizer, the
fast decoder (a GGUF model's saved one, or built from transformers' model) or
transformers' model where there is no fast path, and a LoRA adapter directory on
its base (applied per row on the fast path, else merged by peft).

The fast path's modules (``chatforge.models.fast``) and ``gguf_model`` import torch,
so they are imported where a model is loaded, not at the top: ``chatforge --help``
and ``models list`` import this module and must not pay for torch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.conversation import detect_format, get_format
from chatforge.errors import ModelLoadError
from chatforge.models.adapter_files import check_adapter_files
from chatforge.models.gguf import weights_source
from chatforge.models.gguf_file import source_gguf
from chatforge.models.meta import ModelMeta, context_length_of
from chatforge.models.registry import DEFAULT_MODEL
from chatforge.models.resolve import adapter_base_dir, resolve
from chatforge.noise import quiet_libraries, quiet_transformers

log = logging.getLogger(__name__)

DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class ModelInfo:
    """What a user sees about a loaded model (``chatforge models list`` shows the same)."""

    ref: str  # the reference the user gave
    name: str  # display name
    path: Path  # the local directory the weights were read from
    architecture: str  # e.g. "LlamaForCausalLM"
    n_params: int
    context_length: int
    prompt_format: str  # "chat_template" | "sep" | "eos" | "text"
    dtype: str  # "fp32" | "bf16" | "fp16"
    quantize: str = "none"  # weight-only quantisation of the fast path: none | int8 | int4
    engine: str = "transformers"  # "fast" (our decoder code) | "transformers" (HF modules)
    load_seconds: float = 0.0
    converted: bool = False  # True when this load converted a GGUF (cold)
    adapter_base: str | None = None  # a LoRA adapter's base, when not the one it records
    device: str = "cpu"  # where the weights are: "cpu", "cuda:0", "mps" (``--device``)


@dataclass
class LoadedModel:
    """A model, its tokenizer and its prompt format, ready for the engine.

    Where the fast path runs, transformers' copy of the weights is released once
    the fast decoder is built (holding both took 1.7x the memory on SmolLM2). ``model``
    loads it again, once, the first time something asks for it (training, a
    comparison with transformers, ``Engine.from_loaded(lm, fast=False)``).
    """

    tokenizer: Any
    info: ModelInfo
    format: Any = field(default=None)  # chatforge.conversation.PromptFormat
    fast: Any = field(default=None)  # chatforge.models.fast.FastDecoder, when supported
    fast_reason: str | None = None  # why there is no fast path (None when there is)
    eos_token_id: Any = None  # the model's generation EOS (an id or a list of ids)
    # The model's shared Engine (chatforge.generation.Engine.shared makes it on first use;
    # a server installs its own): chat, batch, eval and serve share its prefix cache.
    engine: Any = field(default=None, repr=False, compare=False)
    # transformers' model while held (None after the fast path's build released it).
    _hf: Any = field(default=None, repr=False, compare=False)
    _hf_lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def model(self) -> Any:
        """transformers' model in eval mode, loaded again from ``info.path`` (same dtype,
        LoRA adapters merged) the first time it is needed after a release, then kept."""
        hf = self._hf
        if hf is None:
            with self._hf_lock:  # two threads asking at once load it once
                if self._hf is None:
                    log.info("loading transformers' copy of %s again", self.info.path)
                    hf = load_transformers(
                        self.info.path, self.info.dtype, base=self.info.adapter_base
                    )
                    self._hf = hf if self.info.device == "cpu" else hf.to(self.info.device)
                hf = self._hf
        return hf

    @model.setter
    def model(self, value: Any) -> None:
        self._hf = value

    @property
    def holds_transformers(self) -> bool:
        """Whether transformers' copy is in memory now (reading ``model`` would load it)."""
        return self._hf is not None

    def release_transformers(self) -> None:
        """Drop transformers' copy; ``model`` loads it again when asked. Only where the
        fast path runs: without one, transformers' model is the one that generates."""
        if self.fast is not None:
            self._hf = None

    @property
    def context_length(self) -> int:
        return self.info.context_length


def parse_dtype(dtype: str | None) -> str:
    """Map a user's ``--dtype`` to our short name (``fp32`` / ``bf16`` / ``fp16`` / ``auto``)."""
    if dtype is None:
        return "fp32"
    key = str(dtype).lower()
    if key == "auto":
        return "auto"
    if key not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use fp32, bf16, fp16 (a GPU) or auto")
    return _SHORT[DTYPES[key]]


def device_settings(dev: Any, short: str, quant: str) -> tuple[str, str]:
    """The dtype and quantisation for a model on ``dev`` (a ``torch.device``), ``auto``
    resolved where the device decides it; a one-line error for a setting it cannot run.

    On a GPU the weights are dense in the GPU's dtype (bf16, else fp16): our int8/int4
    kernels and a GGUF file's blocks are CPU code. On the CPU nothing changes (fp16
    has no fast CPU kernels: refused)."""
    from chatforge.device import default_dtype

    if dev.type == "cpu":
        if short == "fp16":
            raise ModelLoadError("--dtype fp16 is for a GPU; on the CPU use fp32, bf16 or auto")
        return short, quant
    if short == "auto":
        short = default_dtype(dev)
    if quant == "auto":
        quant = "none"
    elif quant != "none":
        raise ModelLoadError(
            f"--quantize {quant} runs on the CPU only (chatforge's kernels); on {dev} the "
            f"weights are dense {short}: use --quantize none or auto, or --device cpu"
        )
    return short, quant


def _load_adapter(directory: Path, torch_dtype: Any, base: str | None = None) -> Any:
    """A LoRA adapter directory merged into transformers' model of its base (``base``,
    else the one the directory records). Its files are checked first (no weights read)."""
    files = check_adapter_files(directory, need_base=base is None)
    base = base or files.base
    base_dir, _ = adapter_base_dir(directory, str(base))
    return _merge(_weights(base_dir, torch_dtype), directory, str(base))


def _merge(model: Any, directory: Path, base: str) -> Any:
    """peft's merge of the adapter in ``directory`` into transformers' ``model``."""
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ModelLoadError(f"{directory} holds a LoRA adapter; pip install peft") from e
    try:  # (a str: peft takes a Path for a hub id)
        return PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    except Exception as e:  # e.g. shapes that differ: an adapter trained on another model
        raise ModelLoadError(
            f"the LoRA adapter in {directory} does not fit the base model {base}: {e}"
        ) from e


# What "auto" picks where a model has a fast path: the fastest setting whose
# perplexity check passes in `chatforge bench` (see README's benchmark table):
# (activation/dense dtype, weight quantisation). Without a fast path: fp32, none.
AUTO_SETTING = ("fp32", "int8")


def parse_quantize(quantize: str | None) -> str:
    """Map ``--quantize`` to none | int8 | int4 | gguf | auto."""
    from chatforge.models.fast import QUANT_MODES

    q = "none" if quantize in (None, "", "none", "off", "no") else str(quantize).lower()
    if q not in (*QUANT_MODES, "gguf", "auto"):
        raise ModelLoadError(
            f"unknown quantization {quantize!r}; use none, int8, int4, gguf or auto"
        )
    return q


def load_transformers(
    directory: Path, dtype: str = "fp32", base: str | None = None, gguf: Any = None
) -> Any:
    """transformers' model in ``directory`` (``fp32`` or ``bf16``), in eval mode.

    A LoRA adapter directory loads its base model (``base``, else the one it
    records) and merges the adapter. A GGUF conversion's weights are read from its
    file (``gguf``: that file already open as ``GGUFWeights``, to parse it once).
    """

    torch_dtype = _torch_dtype(dtype)
    try:
        with quiet_transformers():
            if (directory / "adapter_config.json").exists():  # LoRA adapter + base reference
                model = _load_adapter(directory, torch_dtype, base)
            else:
                model = _weights(directory, torch_dtype, gguf)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"could not load the model in {directory}: {e}") from e
    model.eval()
    return model


def _weights(directory: Path, torch_dtype: Any, gguf: Any = None) -> Any:
    """transformers' model of a model directory: its safetensors, or for a GGUF
    conversion the file's tensors (the directory holds no copy of them)."""
    from transformers import AutoModelForCausalLM

    from chatforge.models.gguf_model import model_from_gguf

    source = weights_source(directory)
    if source is not None:
        return model_from_gguf(directory, source, torch_dtype, gguf)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)


def _fast_settings(
    meta: ModelMeta | None, model_type: str, short: str, quant: str
) -> tuple[str, str, Any]:
    """The fast path's dtype and quantisation for the requested ones (``auto``
    resolved), and the GGUF blocks it runs (``quant == "gguf"``, else None)."""
    short = AUTO_SETTING[0] if short == "auto" else short
    gguf = None
    if quant in ("auto", "gguf"):
        from chatforge.models.fast.gguf_weights import source_gguf_weights

        gguf = source_gguf_weights(meta, model_type)
    if quant == "auto":
        # A model converted from a GGUF with Q4/Q8_0 blocks runs those very
        # weights (the model llama.cpp runs; no second rounding); others the
        # fastest setting that passes the checks.
        quant = "gguf" if gguf is not None else AUTO_SETTING[1]
    elif quant == "gguf" and gguf is None:
        raise ModelLoadError(
            "--quantize gguf runs a .gguf file's own quantised weights; this model "
            "was not converted from a (Llama-family) .gguf file with Q4_0/Q4_1/Q8_0 "
            "weights that is still there unchanged; use int8, int4 or none"
        )
    return short, quant, gguf if quant == "gguf" else None


def _torch_dtype(short: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(short, torch.float32)


@dataclass
class _Pack:
    """Where the fast decoder of a GGUF model's conversion is saved (packed.py), the
    settings it is built with, and the file's blocks when they had to be read."""

    path: Path
    short: str
    quant: str
    gguf: Any = None


def _pack_file(directory: Path, meta: ModelMeta | None, short: str, quant: str) -> _Pack | None:
    """The pack of this model for these settings; None for models that are not a GGUF
    file's conversion (a directory of the user's can change under the same name; a
    conversion is per file content) or settings that repack nothing."""
    from chatforge.models.fast.packed import pack_path

    if source_gguf(meta) is None or not (directory / "config.json").is_file():
        return None
    if quant in ("auto", "gguf"):
        # A pack of the file's blocks exists only where the file has them: "auto"
        # is settled without parsing the file again (seconds for a large vocabulary).
        s = AUTO_SETTING[0] if short == "auto" else short
        path = pack_path(directory, "gguf", _torch_dtype(s))
        if path.is_file():
            return _Pack(path, s, "gguf")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception:  # the full load below reports what is wrong
        return None
    short, quant, gguf = _fast_settings(meta, config.model_type, short, quant)
    if quant == "none":
        return None  # nothing repacked: transformers' weights are the decoder's
    return _Pack(pack_path(directory, quant, _torch_dtype(short)), short, quant, gguf)


def load_model(
    ref: str = DEFAULT_MODEL,
    dtype: str | None = "auto",
    quantize: str | None = "auto",
    fast: bool = True,
    base: str | None = None,
    format: str | None = None,
    device: str | None = "auto",
) -> LoadedModel:
    """Load a model by reference (alias, directory, .gguf file or hub id).

    ``fast`` builds chatforge's own decoder (fused projections, paged KV cache) for
    supported architectures (Llama family, GPT-2); ``quantize`` (int8 / int4)
    stores its weights in fewer bytes. Unsupported architectures run through
    transformers' modules (``info.engine`` says which).

    The defaults are the CLI's: ``auto`` is a GGUF model's own quantised blocks
    (``gguf``), else :data:`AUTO_SETTING` (fp32 activations, int8 weights) where
    the fast path runs, else fp32 without quantisation; pass ``dtype="fp32",
    quantize="none"`` for transformers' exact numbers. Once the fast decoder is
    built, transformers' copy of the weights is released (``LoadedModel.model``
    loads it again on first use); a GGUF model's decoder is saved beside its
    conversion and later loads read it back without transformers' weights.

    A LoRA adapter directory loads its base exactly as the base loads alone (a GGUF
    base: the file's blocks, the saved decoder) and applies the adapter to every
    request on the fast path, unmerged, as ``Engine.add_adapter`` on the base does:
    the same adapter gives the same greedy text whichever way it is loaded. Where
    that cannot be (no fast path, ``fast=False``, an adapter that changes more than
    linear layers) it is merged into transformers' model of the base. Its files are
    checked before anything loads (:mod:`chatforge.models.adapter_files`).
    ``base``, for a LoRA adapter directory only: put the adapter on this model
    instead of the base the directory records (same architecture and sizes).
    ``format``: the prompt format (``chat_template``, ``sep``, ``eos`` or ``text``)
    instead of the one the directory records or the tokenizer suggests.
    ``device``: ``auto`` (a CUDA GPU when there is one, else the CPU), ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps`` (:mod:`chatforge.device`). On a GPU the fast
    decoder holds dense weights there (``dtype`` auto: bf16 where supported, else
    fp16; ``quantize`` auto: none) and runs its torch forward, KV cache included.

    >>> lm = load_model("smollm2")           # doctest: +SKIP
    >>> lm.info.context_length               # doctest: +SKIP
    8192
    """
    from chatforge.device import resolve_device

    t0 = time.perf_counter()
    short = parse_dtype(dtype)
    dev = resolve_device(device)  # a device the machine lacks fails before anything loads
    if format is not None:
        detect_format(None, format)  # an unknown name fails before anything loads
    directory, converted, display = resolve(str(ref))
    is_adapter = (directory / "adapter_config.json").exists()
    if base is not None and not is_adapter:
        raise ModelLoadError(f"{ref} is not a LoRA adapter directory: it takes no base model")
    if is_adapter:  # its files first: before torch is imported or any weights are read
        files = check_adapter_files(directory, need_base=base is None)
    quiet_libraries()
    short, quant = device_settings(dev, short, parse_quantize(quantize))
    meta = ModelMeta.read(directory)
    built = None
    if is_adapter:
        base_dir, base_converted = adapter_base_dir(directory, str(base or files.base))
        converted = converted or base_converted
        tokenizer = _tokenizer(directory if _has_tokenizer(directory) else base_dir)
        if fast:
            built = _adapter_on_base(directory, files, base_dir, short, quant, tokenizer, dev)
    else:
        tokenizer = _tokenizer(directory)
    if built is None:  # a model, or an adapter merged into its base (whose meta, naming
        # the base's source, must not bring the base's pack or GGUF blocks along)
        built = _build(
            directory, None if is_adapter else meta, short, quant, fast, tokenizer, base, dev
        )
    if built.quant != "none" and built.fast is None:
        raise ModelLoadError(
            f"--quantize {built.quant} needs the fast path, which this model has not "
            f"({built.fast_reason})"
        )
    facts = built.facts
    fmt_name = detect_format(tokenizer, format or (meta.prompt_format if meta else None))
    info = ModelInfo(
        ref=str(ref),
        name=(meta.name if meta and meta.name else display),
        path=directory,
        architecture=facts["architecture"],
        n_params=facts["n_params"],
        context_length=facts["context_length"],
        prompt_format=fmt_name,
        dtype=built.short,
        quantize=built.quant,
        engine="fast" if built.fast is not None else "transformers",
        load_seconds=time.perf_counter() - t0,
        converted=converted,
        adapter_base=base,
        device=str(dev),
    )
    fmt = get_format(fmt_name, tokenizer)
    return LoadedModel(
        tokenizer=tokenizer,
        info=info,
        format=fmt,
        fast=built.fast,
        fast_reason=built.fast_reason,
        eos_token_id=facts["eos_token_id"],
        _hf=built.model,
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer in {directory}: {e}") from e


@dataclass
class _Built:
    """A model's weights as loaded: the fast decoder (None without one), transformers'
    model (None once released), the settings used and what ModelInfo needs."""

    fast: Any
    fast_reason: str | None
    model: Any
    facts: dict[str, Any]
    short: str
    quant: str


def _adapter_on_base(
    directory: Path,
    files: Any,
    base_dir: Path,
    short: str,
    quant: str,
    tokenizer: Any,
    dev: Any = None,
) -> _Built | None:
    """The adapter in ``directory`` on its base's fast decoder, applied per row; the
    base is loaded as it loads alone. None where per-row application cannot apply the
    adapter (the caller merges it); an adapter on a base without a fast path is merged
    into the base's transformers model loaded here."""
    from chatforge.models.fast.lora import AdapterNotApplicable, load_adapter, per_row_problem

    problem = per_row_problem(files.config, files.shapes)
    if problem is not None:
        log.info("merging the LoRA adapter in %s: %s", directory, problem)
        return None
    built = _build(base_dir, ModelMeta.read(base_dir), short, quant, True, tokenizer, dev=dev)
    if built.fast is None:  # no fast path for this architecture: merged into transformers'
        built.model = _merge(built.model, directory, str(files.base or base_dir))
        return built
    try:
        adapter = load_adapter(directory, built.fast, name=directory.name)
    except AdapterNotApplicable as e:  # (per_row_problem should have said so)
        log.info("merging the LoRA adapter in %s: %s", directory, e)
        return None
    built.fast.set_own_adapter(adapter)
    return built


def _build(
    directory: Path,
    meta: ModelMeta | None,
    short: str,
    quant: str,
    fast: bool,
    tokenizer: Any,
    base: str | None = None,
    dev: Any = None,
) -> _Built:
    """Load the weights of the model in ``directory`` (an adapter directory: merged into
    ``base``, else the base it records) and build its fast decoder where it has one;
    then move whichever runs (fast decoder, else transformers' model) to ``dev`` (None:
    the CPU). Both are built on the CPU first: one model's memory there at the peak."""
    from chatforge.models.fast.packed import load_pack, save_pack

    fast_model, fast_reason, model, facts = None, "disabled", None, None
    # A GGUF model's fast decoder, saved by an earlier load (packed.py): no
    # transformers weights to read, nothing to repack.
    pack = _pack_file(directory, meta, short, quant) if fast and base is None else None
    if pack is not None:
        loaded = load_pack(pack.path)
        if loaded is not None:
            fast_model, facts = loaded
            fast_reason, short, quant = None, pack.short, pack.quant
    if fast_model is None:
        # "auto" loads transformers' weights in fp32 and picks the fast path's dtype below.
        # (A GGUF conversion's weights come from its file, opened once for both.)
        opened = pack.gguf if pack is not None else None
        model = load_transformers(
            directory, short if short in ("bf16", "fp16") else "fp32", base=base, gguf=opened
        )
        # What the engine and ModelInfo need from transformers' model, taken before the
        # fast path's build empties it.
        facts = {
            "architecture": (model.config.architectures or [type(model).__name__])[0],
            "n_params": sum(p.numel() for p in model.parameters()),
            "context_length": context_length_of(model.config, tokenizer),
            "eos_token_id": model.generation_config.eos_token_id,
        }
    if fast and fast_model is None:
        from chatforge.models.fast import build_fast_model, unsupported_reason

        fast_reason = unsupported_reason(model)
        if fast_reason is None:
            if pack is not None and (pack.quant != "gguf" or pack.gguf is not None):
                short, quant, gguf = pack.short, pack.quant, pack.gguf
            else:  # (a pack found by name but unreadable: the blocks are read here)
                short, quant, gguf = _fast_settings(meta, model.config.model_type, short, quant)
            # release: each part of transformers' model is freed once converted, so
            # memory peaks near one model, not two; the model is dropped after it.
            fast_model = build_fast_model(
                model, _torch_dtype(short), quant, release=True, gguf=gguf
            )
            model = None
            if pack is not None:
                save_pack(fast_model, pack.path, facts)
    short = "fp32" if short == "auto" else short
    quant = "none" if quant == "auto" else quant
    if dev is not None and dev.type != "cpu":
        if fast_model is not None:
            fast_model.to(dev)
        elif model is not None:
            model.to(dev)
    return _Built(fast_model, fast_reason, model, facts, short, quant)
