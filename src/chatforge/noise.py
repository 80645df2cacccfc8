"""Keep the libraries' noise out of normal runs.

transformers warns about things that are not problems for chatforge, which
does its own context budgeting, progress reporting and checkpointing:

* "Token indices sequence length is longer than the specified maximum ..." when a
  long text is tokenised (we never feed it to the model without fitting it);
* progress bars such as "Writing model shards" when a model is saved (our own
  status lines say what is happening; ``--quiet`` must mean quiet);
* ``is_gradient_checkpointing is deprecated`` (raised inside peft/transformers,
  not by our code).

Each is silenced by its exact message, so every other warning still shows.
:func:`quiet_transformers` turns transformers' warnings and progress bars off for
the length of one load, where chatforge reports what matters itself.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_DONE = False
_DROPPED = ("Token indices sequence length is longer than the specified maximum",)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(d) for d in _DROPPED)


def quiet_libraries() -> None:
    """Silence the known-harmless library messages (idempotent; call before loading)."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    logging.getLogger("transformers.tokenization_utils_base").addFilter(_DropMessages())
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off while we load (we report what matters)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:  # as it was (quiet_libraries turns them off for good)
            hf_logging.enable_progress_bar()
