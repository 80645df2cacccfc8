"""No library noise on normal runs: the transformers messages that are not problems
for chatforge are silenced, by their exact text (other warnings still show)."""

from __future__ import annotations

import logging

from chatforge import load_model


def test_long_texts_and_saving_print_nothing(tiny_llama_dir, tmp_path, capfd):
    lm = load_model(str(tiny_llama_dir))  # installs the filters
    capfd.readouterr()
    lm.tokenizer.encode("hello there " * 200)  # longer than the model's 128 positions
    lm.model.save_pretrained(tmp_path / "copy")  # the "Writing model shards" bar
    err = capfd.readouterr().err
    assert "Token indices sequence length" not in err
    assert "Writing model shards" not in err


def test_other_transformers_warnings_still_show(tiny_llama_dir):
    load_model(str(tiny_llama_dir))
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("transformers.tokenization_utils_base")
    handler = Keep()
    logger.addHandler(handler)  # handlers of a logger run after its filters
    try:
        logger.warning("Token indices sequence length is longer than the specified maximum x")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else"]
