"""LoRA adapters applied per row, without merging them into the weights.

A LoRA adapter (``chatforge train --lora``, or any peft adapter of a Llama-family
or GPT-2 model) changes a linear ``y = x W^T`` into ``y = x W^T + s (x A^T) B^T``
with A (r, K), B (N, r) and s = alpha / r. Merging that into W makes a second
model; kept apart, one decoder serves its base and any number of adapters, and
one batch may mix them (S-LoRA / punica's idea): each row carries its adapter
slot and the forward adds that adapter's deltas after each linear (see
``kernels/decode.c``; the torch path does the same with matmuls).

Our linears are fused (Q, K and V in one; gate and up in one), so an adapter's
per-projection A and B are fused too: A's rows stacked (r_q + r_k + r_v, K) and
B block-diagonal (N_q + N_k + N_v, r_q + r_k + r_v), with Q/K output rows
reordered as the converter reorders the weights (``layout.interleave``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from chatforge.models.adapter_files import AdapterError, check_adapter_files
from chatforge.models.fast.layout import interleave

MAX_RANK = 1024  # summed rank of one fused linear (decode.c's CF_LORA_MAX_R)

# peft module name -> (our fused linear, part index within it)
_LLAMA = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("out", 0),
    "gate_proj": ("up", 0),
    "up_proj": ("up", 1),
    "down_proj": ("down", 0),
}
_GPT2 = {
    "attn.c_attn": ("qkv", 0),
    "attn.c_proj": ("out", 0),
    "mlp.c_fc": ("up", 0),
    "mlp.c_proj": ("down", 0),
}
_KEY = re.compile(
    r"(?:^|\.)(?:layers|h)\.(\d+)\.((?:self_attn|mlp|attn)\.\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)


class AdapterNotApplicable(AdapterError):
    """A sound adapter that per-row application cannot apply (DoRA, trained biases, saved
    modules, per-module alpha, LoRA on the LM head or embeddings): merging it can."""


@dataclass
class LoraLinear:
    """One adapter's delta on one fused linear, in the layout decode.c streams."""

    a_t: Tensor  # (K, r) fp32: A^T, the parts' A rows stacked
    b_t: Tensor  # (r, N) fp32: (s * B)^T, block-diagonal over the parts
    # (r, 2) int64: the columns [lo, hi) of each row of b_t outside which it is zero
    # (its part's outputs), so decode.c reads only the blocks on the diagonal
    spans: Tensor
    _packed: tuple[Tensor, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def rank(self) -> int:
        return self.a_t.shape[1]

    def packed(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """decode.c's view (see ``cf_lora``): A^T in fp16 (K, r), B^T's rows on their
        spans back to back in fp16 (one stream to read: a decode step is bound by
        reading the adapter), (r, 3) int64 (lo, hi, start) per row, and (r,) fp32 the
        power of two each rank's product is scaled by. Exact: the weights were rounded
        to these values at load (:func:`fp16_exact`)."""
        if self._packed is None:
            a16, ea = _fp16(self.a_t.detach().float().cpu(), 0)
            b16, eb = _fp16(self.b_t.detach().float().cpu(), 1)
            rows, index, at = [], [], 0
            for i, (lo, hi) in enumerate(self.spans.tolist()):
                rows.append(b16[i, lo:hi])
                index.append((lo, hi, at))
                at += hi - lo
            self._packed = (
                a16.contiguous(),
                torch.cat(rows).contiguous(),
                torch.tensor(index, dtype=torch.int64),
                torch.ldexp(torch.ones(self.rank), ea + eb).float(),
            )
        return self._packed


def _fp16(t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``t`` (2-D fp32) as fp16 times a power of two per slice along ``dim``'s other
    axis (a rank: A^T's columns, dim 0; B^T's rows, dim 1): (fp16 values, exponents e),
    the slice's largest |value| put in [2^14, 2^15) so none overflows and small values
    keep fp16's precision (no subnormals)."""
    peak = t.abs().amax(dim=dim)
    e = torch.where(peak > 0, torch.frexp(peak).exponent - 15, 0)
    shape = (1, -1) if dim == 0 else (-1, 1)
    return torch.ldexp(t, -e.view(shape)).half(), e


def fp16_exact(t: Tensor, dim: int) -> Tensor:
    """``t`` rounded to what :func:`_fp16` stores (fp32, each value fp16 times its
    slice's power of two): the weights both paths (C and torch) then use."""
    h, e = _fp16(t, dim)
    return torch.ldexp(h.float(), e.view((1, -1) if dim == 0 else (-1, 1)))


@dataclass
class LoraAdapter:
    """An adapter ready to apply: per layer, the deltas on our four linears."""

    name: str
    path: Path
    layers: list[dict[str, LoraLinear]]  # per layer: linear name -> delta (absent: none)
    base: str | None = None  # the base model the adapter names (informational)
    key: bytes = field(default=b"")  # unique per load: salts the prefix cache

    @property
    def nbytes(self) -> int:
        return sum(
            (d.a_t.numel() + d.b_t.numel()) * 4
            + (sum(t.numel() * t.element_size() for t in d._packed) if d._packed else 0)
            for layer in self.layers
            for d in layer.values()
        )


def _parts(dec, linear: str) -> list[int]:
    """Output sizes of the parts fused into ``linear`` (Q, K, V / gate, up / one)."""
    cfg = dec.cfg
    if linear == "qkv" and cfg.arch == "llama":
        kv = cfg.n_kv_heads * cfg.head_dim
        return [cfg.n_heads * cfg.head_dim, kv, kv]
    if linear == "up" and cfg.arch == "llama":
        half = dec.layers[0].up.out_features // 2
        return [half, half]
    return [getattr(dec.layers[0], linear).out_features]


def unsupported_settings(conf: dict) -> list[str]:
    """The settings of a peft ``adapter_config.json`` that per-request application
    cannot honour (it changes only linear layers): DoRA, trained biases, saved modules
    such as a resized embedding, per-module alpha. Empty when it can be applied."""
    bad = {
        "use_dora": bool(conf.get("use_dora")),
        "bias": conf.get("bias") not in (None, "none"),
        "modules_to_save": bool(conf.get("modules_to_save")),
        "alpha_pattern": bool(conf.get("alpha_pattern")),
    }
    return [key for key, on in bad.items() if on]


def per_row_problem(conf: dict, names) -> str | None:
    """Why an adapter (its ``adapter_config.json`` and tensor names) cannot be applied
    per row on the fast path, whatever the model; None when it can be (the shapes are
    checked against the model by :func:`load_adapter`)."""
    unsupported = unsupported_settings(conf)
    if unsupported:
        key = unsupported[0]
        return f"{key}={conf.get(key)!r} is not applied per request"
    for key in names:
        m = _KEY.search(key)
        module = m.group(2) if m else None
        if m is None or (module.split(".")[-1] not in _LLAMA and module not in _GPT2):
            return f"its weight {key!r} is on a layer only a merge changes"
    return None


def load_adapter(directory: str | Path, dec, name: str | None = None) -> LoraAdapter:
    """Read a peft LoRA adapter directory for decoder ``dec`` (a FastDecoder).

    Raises :class:`AdapterError` naming what is wrong: not an adapter, a feature we
    do not apply (DoRA, trained biases, saved modules, per-module alpha), a module
    we cannot place (the LM head, embeddings), or shapes that are not this model's.
    """
    from safetensors.torch import load_file

    path = Path(directory).expanduser()
    files = check_adapter_files(path, need_base=False)  # the files first: no weights read
    conf = files.config
    unsupported = unsupported_settings(conf)
    if unsupported:
        key = unsupported[0]
        raise AdapterNotApplicable(
            f"{path}: {key}={conf.get(key)!r} is not supported per request; "
            "load the adapter merged instead (chatforge chat/serve on the adapter directory)"
        )
    weights = files.weights
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - a corrupt file: say which
        raise AdapterError(f"cannot read {weights}: {e}") from e
    alpha = float(conf.get("lora_alpha", 8))
    rslora = bool(conf.get("use_rslora"))
    table = _LLAMA if dec.cfg.arch == "llama" else _GPT2
    # (layer, linear) -> part -> (A (r, K), B (N, r) scaled)
    found: dict[tuple[int, str], dict[int, list[Tensor | None]]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        module = m.group(2) if m else None
        if dec.cfg.arch == "llama" and module:
            module = module.split(".")[-1]
        if m is None or module not in table:
            raise AdapterNotApplicable(
                f"{path}: cannot apply the adapter weight {key!r} to this model per request"
            )
        layer = int(m.group(1))
        if layer >= dec.cfg.n_layers:
            raise AdapterError(f"{path}: {key!r} names layer {layer}; the model has fewer")
        linear, part = table[module]
        slot = found.setdefault((layer, linear), {}).setdefault(part, [None, None])
        slot[0 if m.group(3) == "A" else 1] = t.float()
    layers: list[dict[str, LoraLinear]] = [{} for _ in range(dec.cfg.n_layers)]
    for (layer, linear), parts in found.items():
        lin = getattr(dec.layers[layer], linear)
        sizes = _parts(dec, linear)
        a_rows, b_blocks, rank = [], [], 0
        for part, (a, b) in sorted(parts.items()):
            if a is None or b is None:
                raise AdapterError(f"{path}: layer {layer} {linear} has lora_A or lora_B missing")
            r = a.shape[0]
            if a.shape[1] != lin.in_features or b.shape != (sizes[part], r):
                raise AdapterError(
                    f"{path}: layer {layer} {linear} shapes A {tuple(a.shape)} B "
                    f"{tuple(b.shape)} do not fit this model; is it an adapter of another base?"
                )
            scale = alpha / (r**0.5 if rslora else r)
            b = b * scale
            if dec.cfg.arch == "llama" and linear == "qkv" and part < 2:  # as the weights
                heads = dec.cfg.n_heads if part == 0 else dec.cfg.n_kv_heads
                b = interleave(b, heads, dec.cfg.head_dim)
            a_rows.append(a)
            b_blocks.append((part, rank, b))
            rank += r
        if rank > MAX_RANK:
            raise AdapterError(f"{path}: rank {rank} on one linear; at most {MAX_RANK}")
        offsets = [sum(sizes[:p]) for p in range(len(sizes))]
        b_full = torch.zeros(lin.out_features, rank)  # (N, r) block-diagonal
        spans = torch.zeros(rank, 2, dtype=torch.int64)
        for part, col, b in b_blocks:
            b_full[offsets[part] : offsets[part] + sizes[part], col : col + b.shape[1]] = b
            spans[col : col + b.shape[1], 0] = offsets[part]
            spans[col : col + b.shape[1], 1] = offsets[part] + sizes[part]
        # fp16 per rank (decode.c reads it so), and the torch path uses the same values
        layers[layer][linear] = LoraLinear(  # on the decoder's device (a GPU's too)
            a_t=fp16_exact(torch.cat(a_rows).t().contiguous(), 0).to(dec.device),
            b_t=fp16_exact(b_full.t().contiguous(), 1).to(dec.device),
            spans=spans,
        )
    if not found:
        raise AdapterError(f"{path} holds no LoRA weights")
    return LoraAdapter(
        name=name or path.name, path=path, layers=layers, base=conf.get("base_model_name_or_path")
    )


def stacked(first: LoraAdapter, second: LoraAdapter) -> LoraAdapter:
    """``second`` on top of ``first``: one adapter whose delta on each linear is the sum
    of theirs (A^T's columns and B^T's rows concatenated: rank r1 + r2), named, keyed
    and placed as ``second``. How a LoRA directory loaded as a model (``first``, its own
    adapter) takes another adapter per request: as its merged weights plus that one."""
    from dataclasses import replace

    layers: list[dict[str, LoraLinear]] = []
    for mine, theirs in zip(first.layers, second.layers, strict=True):
        layer = dict(mine)
        for name, d in theirs.items():
            if name in layer:
                a, b = layer[name], d
                if a.rank + b.rank > MAX_RANK:
                    raise AdapterError(
                        f"{second.path}: rank {a.rank + b.rank} on one linear with the "
                        f"model's own adapter; at most {MAX_RANK}"
                    )
                d = LoraLinear(
                    a_t=torch.cat([a.a_t, b.a_t], 1).contiguous(),
                    b_t=torch.cat([a.b_t, b.b_t], 0).contiguous(),
                    spans=torch.cat([a.spans, b.spans]),
                )
            layer[name] = d
        layers.append(layer)
    return replace(second, layers=layers)


def torch_delta(delta: LoraLinear, x: Tensor) -> Tensor:
    """The adapter's contribution for rows ``x`` (..., K) -> (..., N), in x's dtype."""
    return ((x.float() @ delta.a_t) @ delta.b_t).to(x.dtype)
