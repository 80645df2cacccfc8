"""``ConversationModel``: load, ``generate`` with transformers' knobs, ``fit`` on
in-memory conversations; a thin layer over ``load_model``, the engine and the trainer."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatforge.convmodel.knobs import generation_settings
from chatforge.convmodel.tokenizer import ConversationTokenizer, context_messages
from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    from chatforge.training.trainer import TrainResult


@dataclass
class ConversationModelOutput:
    """The replies to one context (convmodel's output, plus how each was made)."""

    responses: list[str]
    """The reply texts, one per ``num_return_sequences`` (the stop token not included)."""
    context: list[Any]
    """The context as given."""
    completions: list[Any] = field(default_factory=list, repr=False)
    """The engine's :class:`~chatforge.generation.types.Completion` of each reply
    (finish reason, token ids, counts)."""
    dropped: list[Any] = field(default_factory=list, repr=False)
    """Oldest turns of the context left out to fit the model's context, oldest first."""


class ConversationModel:
    """A model of any prompt format behind convmodel's interface.

    >>> model = ConversationModel.from_pretrained("my-gpt2/")  # doctest: +SKIP
    >>> model.generate(["Hello", "How are you"], do_sample=True, seed=0)  # doctest: +SKIP
    ConversationModelOutput(responses=['...'], context=['Hello', 'How are you'])
    """

    def __init__(self, loaded: Any, *, dtype: str | None = "auto", quantize: str | None = "auto"):
        """Wrap a :class:`~chatforge.models.LoadedModel`; ``dtype`` and ``quantize`` are
        the settings a model written by :meth:`fit` is loaded again with."""
        self._settings = (dtype, quantize)
        self._attach(loaded)

    def _attach(self, loaded: Any) -> None:
        from chatforge.generation.engine import Engine

        self.loaded = loaded
        self.engine = Engine.shared(loaded)
        self.tokenizer = ConversationTokenizer.from_format(loaded.format)

    @classmethod
    def from_pretrained(
        cls, path_or_alias: str | Path, dtype: str | None = "auto", quantize: str | None = "auto"
    ) -> ConversationModel:
        """Load a model directory, alias, ``.gguf`` file or hub id with ``load_model``
        (same ``dtype`` / ``quantize`` settings); its prompt format is the recorded one,
        else its chat template, else sep when ``<sep>`` is in its vocabulary, else eos."""
        from chatforge.models import load_model

        return cls(load_model(str(path_or_alias), dtype, quantize), dtype=dtype, quantize=quantize)

    @property
    def format(self) -> str:
        """The prompt format replies are generated in."""
        return self.loaded.format.name

    @property
    def hf_tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def generate(self, context: Sequence[Any], **knobs: Any) -> ConversationModelOutput:
        """Replies to ``context`` (strings, the last one the user's, or messages).

        ``knobs`` are transformers' ``generate`` names (``do_sample``, ``top_p``,
        ``top_k``, ``temperature``, ``max_new_tokens``, ``max_length``,
        ``num_return_sequences``, ``repetition_penalty``, ``no_repeat_ngram_size``,
        ...) plus ``seed`` and chatforge's own settings; see
        :mod:`chatforge.convmodel.knobs`. An unknown knob is a ``ParamError`` naming it.
        Oldest turns that do not fit the context are dropped (``output.dropped``).
        """
        from chatforge.generation.plan import plan_request

        config, n = generation_settings(knobs)
        msgs = context_messages(context)
        plan = plan_request(self.loaded.format, msgs, self.loaded.info.context_length, config)
        req = plan.request
        requests = [
            dataclasses.replace(req, config=config.for_sample(j), processors=[]) for j in range(n)
        ]
        done = self.engine.generate(requests)
        for c in done:
            if c.finish_reason == "error":
                raise ChatforgeError(f"generation failed: {c.error}")
        return ConversationModelOutput([c.text for c in done], list(context), done, plan.dropped)

    def fit_format(self) -> str:
        """The format :meth:`fit` trains in: the model's, except that a model with no
        recorded format, no chat template and no ``<sep>`` (a plain GPT-2) becomes a sep
        model, as convmodel's are."""
        from chatforge.models.meta import ModelMeta

        meta = ModelMeta.read(self.loaded.info.path)
        recorded = meta.prompt_format if meta else None
        return self.format if recorded or self.format != "eos" else "sep"

    def fit(
        self,
        train_iterator: Iterable[Any],
        valid_iterator: Iterable[Any] | None = None,
        output_path: str | Path | None = None,
        **train_args: Any,
    ) -> TrainResult:
        """Fine-tune this model on in-memory conversations with chatforge's trainer.

        Items are lists of strings (turns alternate user/assistant, as a ``convmodel``
        JSONL line), lists of messages, or ``{"messages": ...}`` dicts. ``train_args`` are
        :class:`~chatforge.training.TrainConfig` fields (``max_steps``, ``epochs``,
        ``batch_size``, ``lr``, ``context``, ``train_on``, ``lora``, ``format``, ...;
        convmodel's ``accumulation_steps``, ``warmup_steps``, ``max_len``, ``log_steps``,
        ``save_best_model`` are understood); an unknown one is a ``ParamError`` naming it.
        ``output_path`` becomes a model directory (format recorded, checkpoints,
        ``metrics.jsonl``); afterwards this object generates with the trained model.
        Returns the :class:`~chatforge.training.TrainResult`.
        """
        from chatforge.convmodel.fit import fit
        from chatforge.models import load_model

        result = fit(
            self.loaded.info.ref,
            self.fit_format(),
            train_iterator,
            valid_iterator,
            output_path,
            train_args,
        )
        dtype, quantize = self._settings
        self._attach(load_model(str(result.output), dtype, quantize))
        return result

    def __repr__(self) -> str:
        info = self.loaded.info
        return f"ConversationModel({info.name!r}, format={self.format!r}, engine={info.engine!r})"
