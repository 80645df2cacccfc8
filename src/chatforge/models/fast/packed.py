"""A built fast decoder saved beside its model and loaded again without transformers.

Building the fast path of a GGUF model reads transformers' fp32 copy of the
weights (538 MB for SmolLM2) and the file's blocks, and repacks the blocks into
our kernels' layouts: seconds at each load. What it makes is a few tensors in
those layouts (~130 MB for SmolLM2), so it is saved once (safetensors, written
atomically) in the model's converted directory, which is per GGUF content; a
later load reads it back in a fraction of a second and never touches
transformers' weights (``LoadedModel.model`` loads them only where asked).

A pack is named by all its bytes depend on: the quantisation, the dtype and the
kernels' source hash (a layout changes only with the kernels), so a stale pack
is never read, and it is removed when its replacement is written. One that
cannot be read is removed (and rebuilt by the caller).
Only decoders whose quantised layers all run on our kernels are packed: torch's
fallback layouts belong to the torch version.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from chatforge.fsutil import atomic_path
from chatforge.models.fast import kernel_variants, native
from chatforge.models.fast.gguf_weights import BlockEmbedding
from chatforge.models.fast.layout import LINEARS
from chatforge.models.fast.linear import DenseLinear, Int4Linear, Int8Linear, QuantLinear
from chatforge.models.fast.model import FastConfig, FastDecoder, Layer, Norm
from chatforge.models.fast.native_decode import NativeDecode
from chatforge.models.meta import PACK_PREFIX

log = logging.getLogger(__name__)

PACK_VERSION = 2  # of this file's format (the tensor names and the metadata)
_CLASSES: dict[str, type] = {"dense": DenseLinear, "int8": Int8Linear, "int4": Int4Linear}


def pack_path(directory: Path, quantize: str, dtype: torch.dtype) -> Path:
    """Where the pack of ``directory``'s model built with these settings lives."""
    here = Path(kernel_variants.__file__).parent
    short = "fp32" if dtype == torch.float32 else "bf16"
    name = f"{PACK_PREFIX}{quantize}-{short}-{kernel_variants.source_hash(here)}.safetensors"
    return directory / name


def packable(dec: FastDecoder) -> bool:
    """True when every quantised layer of ``dec`` is in our kernels' layout."""
    lins = [dec.head, *(getattr(layer, n) for layer in dec.layers for n in LINEARS)]
    return all(not isinstance(lin, QuantLinear) or lin.native for lin in lins)


def save_pack(dec: FastDecoder, path: Path, info: dict[str, Any]) -> bool:
    """Write ``dec`` (and ``info``, JSON-able facts the loader needs) to ``path``.
    False, having logged why, when it is not packable or cannot be written (a pack is
    a cache: the model works without one)."""
    from safetensors.torch import save_file

    if not packable(dec):
        return False
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"version": PACK_VERSION, "info": info}
    cfg = asdict(dec.cfg)
    cfg["dtype"] = str(dec.cfg.dtype).removeprefix("torch.")
    meta["cfg"] = cfg
    meta["embed"] = _put_embed(tensors, dec.embed)
    meta["linears"] = {"head": _put_linear(tensors, "head", dec.head)}
    _put_norm(tensors, "norm", dec.norm)
    for i, layer in enumerate(dec.layers):
        for n in LINEARS:
            meta["linears"][f"layers.{i}.{n}"] = _put_linear(
                tensors, f"layers.{i}.{n}", getattr(layer, n)
            )
        _put_norm(tensors, f"layers.{i}.norm1", layer.norm1)
        _put_norm(tensors, f"layers.{i}.norm2", layer.norm2)
    if dec.pos_embed is not None:
        tensors["pos_embed"] = dec.pos_embed
    if dec.rope is not None:
        tensors["rope"] = torch.view_as_real(dec.rope)  # safetensors has no complex dtype
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    try:  # (straight to the file: no second copy of the tensors in memory)
        with atomic_path(path) as tmp:
            mode = tmp.stat().st_mode  # the usual one (0666 less the umask)
            save_file(tensors, str(tmp), metadata={"chatforge": json.dumps(meta)})
            # safetensors writes its own private (0600) file in place of ours; a cache
            # other accounts share must stay readable to them, as every other file is.
            os.chmod(tmp, mode)
    except OSError as e:
        log.warning("could not save the fast decoder to %s: %s", path, e)
        return False
    # Packs of the same settings for other kernels are stale now: not left to pile up.
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)
    return True


def load_pack(path: Path) -> tuple[FastDecoder, dict[str, Any]] | None:
    """The decoder saved at ``path`` and its ``info``; None when there is none or our
    kernels cannot run here now (``CHATFORGE_NATIVE=0``, no build: its layouts are
    theirs). A pack that cannot be read is removed (the caller builds the decoder again)."""
    if not path.is_file() or not native.available():
        return None
    try:
        return _load(path)
    except Exception as e:  # a truncated or foreign file: a cache entry to drop
        log.warning("removing the unreadable fast-decoder pack %s (%s)", path, e)
        path.unlink(missing_ok=True)
        return None


def _load(path: Path) -> tuple[FastDecoder, dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["chatforge"])
        if meta.get("version") != PACK_VERSION:
            raise ValueError(f"pack format {meta.get('version')}, not {PACK_VERSION}")
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    cfg = dict(meta["cfg"])
    cfg["dtype"] = getattr(torch, cfg["dtype"])
    fc = FastConfig(**cfg)
    eps, rms = fc.eps, fc.arch != "gpt2"  # every norm's, as convert.py builds them
    lins = meta["linears"]

    def norm(name: str) -> Norm:
        return Norm(t[f"{name}.weight"], t.get(f"{name}.bias"), eps, rms)

    layers = [
        Layer(
            norm1=norm(f"layers.{i}.norm1"),
            norm2=norm(f"layers.{i}.norm2"),
            **{n: _get_linear(t, f"layers.{i}.{n}", lins[f"layers.{i}.{n}"]) for n in LINEARS},
        )
        for i in range(fc.n_layers)
    ]
    rope = t.get("rope")
    dec = FastDecoder(
        cfg=fc,
        embed=_get_embed(t, meta["embed"]),
        layers=layers,
        norm=norm("norm"),
        head=_get_linear(t, "head", lins["head"]),
        pos_embed=t.get("pos_embed"),
        rope=None if rope is None else torch.view_as_complex(rope),
    )
    dec.native = NativeDecode.build(dec)
    return dec, meta["info"]


def _put_norm(tensors: dict[str, Tensor], name: str, n: Norm) -> None:
    tensors[f"{name}.weight"] = n.weight
    if n.bias is not None:
        tensors[f"{name}.bias"] = n.bias


def _put_embed(tensors: dict[str, Tensor], e: Any) -> str:
    if isinstance(e, Tensor):
        tensors["embed"] = e
        return "dense"
    tensors["embed.q"], tensors["embed.d"] = e.q, e.d
    if e.m is not None:
        tensors["embed.m"] = e.m
    return "blocks"


def _get_embed(t: dict[str, Tensor], how: str) -> Any:
    if how == "dense":
        return t["embed"]
    return BlockEmbedding(t["embed.q"], t["embed.d"], t.get("embed.m"))


def _put_linear(tensors: dict[str, Tensor], name: str, lin: Any) -> dict[str, Any]:
    if lin.bias is not None:
        tensors[f"{name}.bias"] = lin.bias
    if isinstance(lin, DenseLinear):
        tensors[f"{name}.weight"] = lin.weight
        return {"class": "dense"}
    tensors[f"{name}.weight_q"], tensors[f"{name}.scales"] = lin.weight_q, lin.scales
    spec = {"class": "int4" if isinstance(lin, Int4Linear) else "int8", "kind": lin.kind}
    spec.update(n=lin.out_features, k=lin.in_features)
    if isinstance(lin, Int4Linear):
        spec["group_size"] = lin.group_size
    return spec


def _get_linear(t: dict[str, Tensor], name: str, spec: dict[str, Any]) -> Any:
    bias = t.get(f"{name}.bias")
    if spec["class"] == "dense":
        return DenseLinear(t[f"{name}.weight"], bias, t[f"{name}.weight"].dtype)
    lin = _CLASSES[spec["class"]].__new__(_CLASSES[spec["class"]])
    lin.kind, lin.native = spec["kind"], True
    lin.out_features, lin.in_features = spec["n"], spec["k"]
    if "group_size" in spec:
        lin.group_size = spec["group_size"]
    lin.weight_q, lin.scales, lin.bias = t[f"{name}.weight_q"], t[f"{name}.scales"], bias
    return lin
