"""The GGUF side of ``chatforge export``: llama.cpp's metadata, tokenizer and tensors.

Follows llama.cpp's ``convert_hf_to_gguf.py`` (see :mod:`chatforge.models.export`); what
both exports share is in :mod:`chatforge.models.export_common`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from chatforge.conversation.formats import SEP_TOKEN
from chatforge.models.export_common import (
    ARCHITECTURES,
    DEFAULT_QUANTIZE,
    ExportConfig,
    ExportError,
    check_architecture,
    install,
    prompt_format,
    temp_path,
)

log = logging.getLogger(__name__)

_GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
_SKIPPED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

# llama.cpp names the BPE pre-tokenizer (``tokenizer.ggml.pre``) by the SHA-256 of the
# ids of this text (convert_hf_to_gguf.py's get_vocab_base_pre); a few known hashes,
# the rest is recognised from tokenizer.json's pre_tokenizer (see _pre_tokenizer).
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_KNOWN_PRE = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace("\\p{N}{1,3}", "\\p{N}")

# llama.cpp's token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


# -- gguf -----------------------------------------------------------------------


def write_gguf(cfg: ExportConfig, model: Any, tokenizer: Any, directory: Path, name: str) -> None:
    import gguf

    model_type = check_architecture(getattr(model.config, "model_type", None))
    arch, _ = ARCHITECTURES[model_type]
    fmt = prompt_format(tokenizer, directory)
    if fmt == "sep" and model_type == "gpt2":
        log.warning(
            "llama.cpp has no token-type input: this sep-format GPT-2 will score "
            "slightly differently there than in chatforge (which feeds token_type_ids)"
        )
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_name(name)
    writer.add_string("chatforge.prompt_format", fmt)
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    _add_hparams(writer, model.config, model_type, n_vocab, cfg.quantize or DEFAULT_QUANTIZE)
    _add_vocab(writer, tokenizer, n_vocab, fmt)
    for tname, data, qtype in _tensors(model, model_type, cfg.quantize or DEFAULT_QUANTIZE):
        writer.add_tensor(tname, data, raw_dtype=qtype)
    tmp = temp_path(cfg.out)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        install(tmp, cfg.out)
    finally:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _file_type(quantize: str) -> Any:
    import gguf

    return {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quantize]


def _rope(config: Any) -> dict:
    """RoPE settings as one dict (transformers 5 ``rope_parameters``, or 4's fields)."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope:
        return dict(rope.get("full_attention", rope))
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


def _add_hparams(writer: Any, config: Any, model_type: str, n_vocab: int, quantize: str) -> None:
    import gguf

    if model_type == "gpt2":
        n_embd = config.n_embd
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.n_inner or 4 * n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_vocab_size(n_vocab)
        rope = _rope(config)
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        elif rope_type == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(rope["factor"]))
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        elif rope_type not in ("default", "llama3"):  # llama3: the rope_freqs tensor
            raise ExportError(f"cannot export RoPE type {rope_type!r} to GGUF")
    writer.add_file_type(_file_type(quantize))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# -- tokenizer ------------------------------------------------------------------


def _add_vocab(writer: Any, tokenizer: Any, n_vocab: int, fmt: str) -> None:
    """The BPE vocabulary, merges, special ids and chat template, from our tokenizer."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="chatforge-export-") as tmp:
        tokenizer.save_pretrained(tmp)  # one normalised copy: tokenizer.json + config
        spec = _tokenizer_json(Path(tmp))
        pre = _pre_tokenizer(tokenizer, spec)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ExportError("the tokenizer has no BPE merges; llama.cpp could not tokenise with it")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(
            f"the tokenizer has {max(vocab.values()) + 1} tokens but the model only "
            f"{n_vocab} embeddings; resize the model's embeddings first"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        kind = _NORMAL
        if token in added:
            entry = decoder.get(i)
            if entry is not None and not entry.normalized:  # llama.cpp wants them normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special_like = token.startswith("<|") and token.endswith("|>")
            kind = (
                _CONTROL
                if (entry is not None and entry.special) or special_like
                else (_USER_DEFINED)
            )
        tokens.append(token)
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Special ids and flags from the loaded tokenizer itself (what chatforge uses),
    # not from whichever config file SpecialVocab would find first.
    special.special_token_ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            special.special_token_ids[kind] = tid
    sep = vocab.get(SEP_TOKEN)
    if fmt == "sep" and sep is not None:  # a reply ends at <sep>: llama.cpp stops there
        special.special_token_ids["eot"] = sep
    probe = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token = {
        "bos": bool(len(probe) > len(bare) and probe[0] == bos),
        "eos": bool(len(probe) > len(bare) and probe[-1] == eos),
    }
    template = getattr(tokenizer, "chat_template", None)
    special.chat_template = template if isinstance(template, str) else None
    special.add_to_gguf(writer, quiet=True)


def _tokenizer_json(directory: Path) -> dict:
    path = directory / "tokenizer.json"
    if not path.exists():
        raise ExportError(
            "the tokenizer has no tokenizer.json (a slow or SentencePiece tokenizer); "
            "GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, Qwen2)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _pre_tokenizer(tokenizer: Any, spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (``tokenizer.ggml.pre``).

    First llama.cpp's own test (a hash of the ids of a fixed text, for the exact
    vocabularies it knows), then the pre_tokenizer in tokenizer.json, which fixes how
    text is split before BPE: GPT-2's byte-level regex -> ``gpt-2``, digits split
    one by one first -> ``smollm``, Llama 3's / Qwen2's split regex.
    """
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r}"
        )
    ids = tokenizer.encode(_CHKTXT)
    known = _KNOWN_PRE.get(hashlib.sha256(str(ids).encode()).hexdigest())
    if known:
        return known
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp "
        "is known to reproduce (GPT-2, SmolLM, Llama 3, Qwen2 byte-level BPE)"
    )


# -- tensors --------------------------------------------------------------------


def _permute(w: Any, n_head: int) -> Any:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved pairs (LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tensors(model: Any, model_type: str, quantize: str) -> list[tuple[str, Any, Any]]:
    """(GGUF name, data, GGML type) for every tensor, in llama.cpp's layout."""
    import gguf
    import torch

    cfg = model.config
    n_layers = cfg.n_layer if model_type == "gpt2" else cfg.num_hidden_layers
    arch, permute = ARCHITECTURES[model_type]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, n_layers)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    out: list[tuple[str, Any, Any]] = []
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            if hf_name.endswith(_SKIPPED) or (tied and hf_name == "lm_head.weight"):
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ExportError(f"no GGUF name for tensor {hf_name!r} ({model_type})")
            t = tensor.detach().to(torch.float32)
            if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                t = _permute(t, cfg.num_attention_heads)
            elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                t = _permute(t, cfg.num_key_value_heads or cfg.num_attention_heads)
            elif model_type == "gpt2" and hf_name.endswith(_GPT2_CONV1D):
                t = t.transpose(0, 1)  # Conv1D stores (in, out); ggml wants (out, in) rows
            out.append(_encode(name, t.contiguous().numpy(), quantize, tied))
    rope_freqs = _llama3_rope_factors(cfg) if model_type != "gpt2" else None
    if rope_freqs is not None:
        out.append(("rope_freqs.weight", rope_freqs, gguf.GGMLQuantizationType.F32))
    return out


def _encode(name: str, data: np.ndarray, quantize: str, tied: bool) -> tuple[str, Any, Any]:
    """Quantise one tensor as convert_hf_to_gguf.py does.

    Norms, biases, 1-D tensors and GPT-2's position embeddings stay f32. With q4_0
    the output projection (the token embeddings when tied) is q8_0: llama.cpp's
    quantiser keeps it at higher precision too (Q6_K there, which gguf-py cannot
    write). Rows that are not whole quant blocks fall back to f16.
    """
    import gguf

    q = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        qtype = q.F32
    elif name == "position_embd.weight":
        qtype = q.F32
    else:
        qtype = {"f16": q.F16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}[quantize]
        if qtype == q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
            qtype = q.Q8_0
    try:
        return name, gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return name, gguf.quants.quantize(data, q.F16), q.F16


def _llama3_rope_factors(config: Any) -> np.ndarray | None:
    """llama3 RoPE scaling as llama.cpp reads it: per-frequency factors (rope_freqs)."""
    import numpy as np

    rope = _rope(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
