"""Train a byte-level BPE tokenizer on the user's data (the ``tokenizers`` library).

The result is an ordinary Hugging Face tokenizer directory (``tokenizer.json``
+ ``tokenizer_config.json``) with the special tokens our formats need:
``<|endoftext|>`` (EOS, also BOS / padding / unknown, as in GPT-2) and
``<sep>`` (the sep format's turn separator), so a model trained from scratch
with it uses the sep format without growing its vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatforge.conversation.formats import SEP_TOKEN
from chatforge.errors import ParamError
from chatforge.training.data import Dataset

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, SEP_TOKEN)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens


def iter_texts(dataset: Dataset) -> Iterator[str]:
    """Every text of a dataset: corpus texts, or each message of each conversation."""
    if dataset.kind == "text":
        yield from dataset.texts
    else:
        for conv in dataset.conversations:
            for m in conv:
                yield m.content


def train_tokenizer(
    dataset: Dataset,
    vocab_size: int,
    output: str | Path | None = None,
    min_frequency: int = 2,
    model_max_length: int = 1024,
) -> Any:
    """Train a byte-level BPE tokenizer; save it to ``output`` when given; return it.

    The returned object is a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ParamError("vocab_size", f"must be >= {MIN_VOCAB} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(dataset), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    fast.add_special_tokens({"additional_special_tokens": [SEP_TOKEN]})
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(out)
    return fast
