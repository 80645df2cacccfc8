"""Run a model over a file of prompts: batched, templated, resumable.

:func:`generate_batch` reads records (:mod:`~chatforge.batch.records`), fills
the template (:mod:`~chatforge.batch.template`), encodes each prompt as chat
messages with the model's format, and feeds the engine a window of requests at
a time. Rows go to the output (:mod:`~chatforge.batch.output`) in input order
as soon as a prefix of the window is complete, so a crash loses only rows that
were not finished; a rerun skips the ids already in the output. A rerun with
other settings (model, template, system prompt, ``n``, generation settings) is
refused unless ``force_resume`` (see :mod:`~chatforge.batch.settings`).

Records that cannot run (unreadable, a missing template field, a prompt too
long for the context) get an error row before any generation and the run goes
on, unless ``fail_fast``. The summary counts errors by kind
(:data:`~chatforge.batch.jobs.ERROR_KINDS`). What this local run shares with
:mod:`~chatforge.batch.remote` (jobs, rows in order, the summary) is in
:mod:`~chatforge.batch.jobs`.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from chatforge.batch.jobs import (
    BatchSummary,
    Feed,
    Job,
    ProgressFn,
    RowsRun,
    count_todo,
    records_opener,
    resolved_params,
)
from chatforge.batch.output import RowWriter, check_output
from chatforge.batch.records import Record
from chatforge.batch.settings import fingerprint, model_key, run_settings
from chatforge.batch.template import PromptTemplate
from chatforge.errors import ContextOverflowError, ParamError
from chatforge.generation.config import GenerationConfig
from chatforge.generation.engine import Completion, Engine
from chatforge.generation.plan import plan_request


def generate_batch(
    model: Any,
    inputs: str | Path | Iterable[str | Mapping[str, Any]],
    output: str | Path,
    template: str | PromptTemplate | None = None,
    system: str | None = None,
    config: GenerationConfig | None = None,
    n: int = 1,
    batch_size: int = 16,
    fail_fast: bool = False,
    progress: bool | ProgressFn = True,
    dtype: str = "auto",
    force_resume: bool = False,
    model_name: str | None = None,
    prompt_format: str | None = None,
) -> BatchSummary:
    """Generate a reply for every input record and append one row per record to ``output``.

    Args:
        model: a :class:`~chatforge.models.LoadedModel`, a reference for
            :func:`~chatforge.models.load_model`, or a function returning a loaded
            model; a reference or function is loaded after the inputs are checked,
            and only if some record is still to do.
        inputs: a ``.txt`` / ``.jsonl`` / ``.csv`` file, or Python records (strings
            become ``{"text": s}``, mappings are the fields).
        output: a ``.jsonl`` or ``.csv`` file; rows already in it are skipped (resume).
            Rows made with other settings (model, template, system prompt, ``n``,
            generation settings) make it a :class:`~chatforge.errors.ChatforgeError`
            naming what differs, before the model is loaded or the file touched.
        template: ``str.format`` template over the record's fields; ``None`` uses the
            record's ``prompt`` or ``text`` field.
        system: a system prompt sent before each record's prompt.
        config: generation settings (default: :meth:`GenerationConfig.default`, as the CLI).
        n: samples per record; with a seed, sample ``j`` uses ``seed + j``
            (:meth:`GenerationConfig.for_sample`).
        batch_size: sequences decoded together (a record with ``n`` samples takes ``n``).
        fail_fast: raise :class:`~chatforge.batch.BatchStopped` at the first bad record instead of
            writing an error row for it.
        progress: show a progress bar on stderr (``True``), nothing (``False``), or
            call a function ``progress(records, tokens)``.
        dtype: ``fp32``, ``bf16`` or ``auto`` when ``model`` is a reference (``auto``:
            as ``load_model``'s default and the CLI's, the fast path's best setting).
        force_resume: add to an output whose rows were made with other settings.
        model_name: the model's reference, recorded in each row's ``settings``, when
            ``model`` is a function (so a mismatch is found before it is called);
            without it the loaded model's ``info.ref`` is checked once it is loaded.
        prompt_format: the prompt format asked for (``text``, ...; ``--format``), used to
            load a reference and recorded in the rows' settings; ``None``: the model's own.

    Returns:
        A :class:`~chatforge.batch.BatchSummary`.

    >>> generate_batch("smollm2", "prompts.txt", "out.jsonl")  # doctest: +SKIP
    """
    config = config if config is not None else GenerationConfig.default()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParamError("n", f"must be an integer >= 1 (got {n!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParamError("batch_size", f"must be an integer >= 1 (got {batch_size!r})")
    tmpl = template if isinstance(template, PromptTemplate) else PromptTemplate(template)
    # Check everything the user gave before the (slow) model load.
    open_records = records_opener(inputs)
    check_output(output)
    if isinstance(model, str):
        from chatforge.models import load_model, parse_dtype

        parse_dtype(dtype)
        ref = model_name = model
        model = lambda: load_model(ref, dtype=dtype, format=prompt_format)  # noqa: E731
    elif not callable(model):
        model_name = model.info.ref
    settings = run_settings(model_name, tmpl.text, system, n, fmt=prompt_format)
    params = resolved_params(config)

    with RowWriter(output, fingerprint(settings, params), force_resume) as writer:
        total, todo = count_todo(open_records(), writer)
        if todo == 0:  # every row is there: no model to load
            return BatchSummary(
                output=writer.path,
                total=total,
                skipped=total,
                torn_bytes=writer.existing.torn_bytes,
            )
        if callable(model):
            model = model()
            if settings["model"] is None:  # now known: check it before any row is written
                settings["model"] = model_key(model.info.ref)
                writer.check_fingerprint(fingerprint(settings, params), force_resume)
        run = LocalRun(model, writer, tmpl, system, config, n, batch_size, fail_fast, settings)
        run.execute(open_records, total, todo, progress)
    return run.summary


class LocalRun(RowsRun):
    """The state of one :func:`generate_batch` call: records through one model's engine.

    A subclass changes what a record is sent as through :meth:`RowsRun._plan` (the grid
    of :mod:`~chatforge.batch.compare` sends each of its cells this way)."""

    def __init__(
        self,
        loaded: Any,
        writer: RowWriter,
        template: PromptTemplate,
        system: str | None,
        config: GenerationConfig,
        n: int,
        batch_size: int,
        fail_fast: bool,
        settings: dict[str, Any],
    ) -> None:
        info = _model_identity(loaded)
        super().__init__(writer, template, system, config, n, fail_fast, info, settings)
        self.loaded = loaded
        self.engine = Engine.shared(loaded)
        self.batch_size = batch_size
        self.summary.context_length = loaded.info.context_length

    def run(self, records: Iterable[Record]) -> None:
        """Stream records through the model's engine, writing rows in order.

        Up to ``batch_size`` sequences decode together; as one finishes, a waiting
        one takes its place, so a long reply never holds the others back. Another
        ``batch_size`` requests wait in the queue so a freed place is filled at
        once. Rows are written as soon as every record before them is written. Records
        sharing a long prompt prefix (a template) reuse its KV from the prefix cache.
        """
        t0 = time.perf_counter()
        engine = self.engine
        owner: dict[int, tuple[Job, int]] = {}  # engine handle -> (job, sample)
        done: list[tuple[int, Completion]] = []  # filled by the engine's events
        pending: deque[Job] = deque()  # read, not yet written, in input order
        feed = Feed(iter(records), self.batch_size)

        def on_event(ev: Any) -> None:
            if ev.completion is not None:
                done.append((ev.index, ev.completion))

        try:
            while True:
                # Keep batch_size requests in the engine (the engine's own limit on
                # running sequences applies too).
                for job in self._admit(
                    feed, pending, owner.__len__, self.batch_size, self._prepare
                ):
                    for j, req in enumerate(job.requests):
                        owner[engine.add(req, on_event=on_event)] = (job, j)
                self._write_ready(pending)
                if not owner:
                    if feed.exhausted or feed.stop is not None:
                        break
                    continue
                engine.step()
                for handle, completion in done:
                    job, j = owner.pop(handle)
                    job.completions[j] = completion
                    if completion.finish_reason == "error":
                        msg = f"{job.record.source}: generation failed: {completion.error}"
                        job.fail("generation failed", msg)
                done.clear()
        except BaseException:
            for handle in owner:  # interrupted: leave nothing running in the shared engine
                engine.abort(handle)
            raise
        finally:
            self.summary.seconds = time.perf_counter() - t0
        assert not pending, "the scheduler ended before every request completed"
        if feed.stop is not None:
            raise self._stopped(feed.stop)

    # -- one record --------------------------------------------------------------

    def _prepare(self, record: Record) -> Job:
        """Render and encode a record, or say why it cannot run (before any generation)."""
        job = self._start(record)
        if job.error is not None:
            return job
        messages, config, samples = self._plan(job)
        try:
            # Raises ContextOverflowError when the prompt leaves no room for a reply.
            plan = plan_request(
                self.loaded.format,
                messages,
                self.loaded.info.context_length,
                config,
                drop_history=False,
            )
            self.engine.budget_for(plan.request)
        except ValueError as e:
            kind = "prompt too long" if isinstance(e, ContextOverflowError) else "invalid request"
            return job.fail(kind, f"{record.source}: {e}")
        # Reruns reproduce every sample, and sample 0 matches `chatforge chat --seed S`.
        for j in samples:
            cfg = plan.request.config.for_sample(j)  # the plan's (with the format's stops)
            job.requests.append(dataclasses.replace(plan.request, config=cfg))
        return job


def _model_identity(loaded: Any) -> dict[str, Any]:
    info = loaded.info
    return {
        "name": info.name,
        "ref": info.ref,
        "architecture": info.architecture,
        "n_params": info.n_params,
        "dtype": info.dtype,
        "prompt_format": info.prompt_format,
    }
