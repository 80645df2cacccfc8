"""Shared fixtures: tiny random models (seconds on CPU) and the real SmolLM2.

Tiny models are written as ordinary Hugging Face directories so that tests go
through the same loading code a user's model directory does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_TOKENIZER = FIXTURES / "tiny-tokenizer"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session", autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep tests away from the user's cache, data and hub settings."""
    root = tmp_path_factory.mktemp("chatforge-home")
    os.environ.setdefault("CHATFORGE_CACHE", str(root / "cache"))
    os.environ["CHATFORGE_DATA"] = str(root / "data")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def _tiny_tokenizer(chat: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    if chat:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|im_end|>"
        tok.chat_template = CHATML_TEMPLATE
    return tok


def make_tiny_gpt2(path: Path, seed: int = 0, positions: int = 128) -> Path:
    """A 2-layer random GPT-2 with the tiny tokenizer (eos format, ``positions`` long)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tiny_tokenizer(chat=False)
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_llama(
    path: Path, seed: int = 0, positions: int = 128, hidden: int = 32, arch: str = "llama"
) -> Path:
    """A 2-layer random Llama (GQA; or ``arch`` "qwen2") with a ChatML chat template,
    ``positions`` long, ``hidden`` wide."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    tok = _tiny_tokenizer(chat=True)
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    model = model_cls(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def tiny_tokenizer():
    """The committed tiny byte-level BPE tokenizer (400 tokens, eos id 0)."""
    return _tiny_tokenizer(chat=False)


@pytest.fixture()
def tiny_chat_tokenizer():
    """The tiny tokenizer plus <|im_start|>/<|im_end|> and a ChatML template."""
    return _tiny_tokenizer(chat=True)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
