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
on, unless ``fail_fast``. The summary counts errors by kind (:data:`ERROR_KINDS`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.batch.output import RowWriter, check_output
from chatforge.batch.records import Record, check_input, read_records, records_from
from chatforge.batch.settings import fingerprint, model_key, run_settings
from chatforge.batch.template import PromptTemplate, TemplateError
from chatforge.conversation import Message
from chatforge.errors import ChatforgeError, ContextOverflowError, ParamError
from chatforge.generation.config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from chatforge.generation.engine import Completion, Engine, Request
from chatforge.generation.plan import plan_request

# Rows that may wait, finished, behind one unfinished earlier row (x batch_size).
_MAX_PENDING = 64

ERROR_KINDS = (
    "unreadable record",  # a malformed line or CSV row, text that is not UTF-8
    "duplicate id",
    "missing field",  # the template (or the default prompt/text) needs a field the record lacks
    "empty prompt",
    "prompt too long",  # no room for a reply in the model's context
    "invalid request",  # the engine refused the request for another reason
    "generation failed",
    "rejected by the endpoint",  # --api-base: a 4xx answer
    "endpoint error",  # --api-base: another error answer
    "not answered",  # --api-base: timeout, 429, 5xx; no row written, a rerun retries
)
"""The kinds of error a run counts (:attr:`BatchSummary.error_kinds`)."""


class BatchStopped(ChatforgeError):
    """``fail_fast`` stopped the run at a bad record (its row is not written)."""


@dataclass
class BatchSummary:
    """What a run did. ``str(summary)`` is the one-line summary the CLI prints."""

    output: Path  # the output file
    total: int = 0  # records in the input
    done: int = 0  # rows with outputs written by this run
    errors: int = 0  # error rows written by this run
    skipped: int = 0  # records already in the output when the run started
    seconds: float = 0.0  # wall time of the run (model load excluded)
    prompt_tokens: int = 0  # prompt tokens of generated rows (once per record)
    completion_tokens: int = 0  # generated tokens, all samples
    torn_bytes: int = 0  # bytes of a torn last row cut from the output before resuming
    error_messages: list[str] = field(default_factory=list)  # the first few error messages
    error_kinds: dict[str, int] = field(default_factory=dict)  # kind -> errors (ERROR_KINDS)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time."""
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def records_per_second(self) -> float:
        return (self.done + self.errors) / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> bool:
        """Every record this run tried failed (none succeeded): the CLI exits 1."""
        return self.done == 0 and self.errors > 0

    def errors_by_kind(self) -> str:
        """``"errors by kind: 40 missing field, 20 prompt too long"`` (most first)."""
        kinds = sorted(self.error_kinds.items(), key=lambda kv: (-kv[1], kv[0]))
        return "errors by kind: " + ", ".join(f"{count} {kind}" for kind, count in kinds)

    def __str__(self) -> str:
        return (
            f"{self.total} records: {self.done} done, {self.errors} errors, "
            f"{self.skipped} skipped (already in output) in {self.seconds:.1f} s, "
            f"{self.tokens_per_second:.0f} tok/s"
        )


@dataclass
class _Job:
    """One record on its way through a window."""

    record: Record
    prompt: str | None = None  # the rendered prompt
    requests: list[Request] = field(default_factory=list)  # one per sample
    completions: dict[int, Completion] = field(default_factory=dict)  # sample -> result
    error: str | None = None  # why it produced no output
    kind: str | None = None  # the error's kind (one of ERROR_KINDS)
    retry: bool = False  # the error may pass (a remote endpoint's): no row, a rerun retries

    @property
    def finished(self) -> bool:
        return self.error is not None or len(self.completions) == len(self.requests)

    def fail(self, kind: str, message: str) -> _Job:
        """Record why the job produced no output (the first reason wins)."""
        if self.error is None:
            self.error, self.kind = message, kind
        return self


ProgressFn = Callable[[int, int], None]
"""Called as ``progress(records, completion_tokens)`` after rows are written."""


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
        n: samples per record; with a seed, sample ``j`` uses ``seed + j``.
        batch_size: sequences decoded together (a record with ``n`` samples takes ``n``).
        fail_fast: raise :class:`BatchStopped` at the first bad record instead of
            writing an error row for it.
        progress: show a progress bar on stderr (``True``), nothing (``False``), or
            call a function ``progress(records, tokens)``.
        dtype: ``fp32``, ``bf16`` or ``auto`` when ``model`` is a reference (``auto``:
            as ``load_model``'s default and the CLI's, the fast path's best setting).
        force_resume: add to an output whose rows were made with other settings.
        model_name: the model's reference, recorded in each row's ``settings``, when
            ``model`` is a function (so a mismatch is found before it is called);
            without it the loaded model's ``info.ref`` is checked once it is loaded.

    Returns:
        A :class:`BatchSummary`.

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
        model = lambda: load_model(ref, dtype=dtype)  # noqa: E731 - loaded only if needed
    elif not callable(model):
        model_name = model.info.ref
    settings = run_settings(model_name, tmpl.text, system, n)
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
        run = _Run(model, writer, tmpl, system, config, n, batch_size, fail_fast, settings)
        run.execute(open_records, total, todo, progress)
    return run.summary


def records_opener(
    inputs: str | Path | Iterable[str | Mapping[str, Any]],
) -> Callable[[], Iterator[Record]]:
    """A function that reads the records from the start (a file is checked now)."""
    if isinstance(inputs, str | Path):
        in_path = check_input(inputs)
        return lambda: read_records(in_path)
    items = list(inputs)
    return lambda: records_from(items)


def count_todo(records: Iterable[Record], writer: RowWriter) -> tuple[int, int]:
    """(records, records without a row in the output yet): a first pass, for the
    progress bar and to skip the model load when nothing is left to do."""
    total = todo = 0
    for record in records:
        total += 1
        todo += not writer.existing.has(record.key, record.legacy_key)
    return total, todo


@dataclass
class _Feed:
    """Where a run is in its input: the records left, and why it stopped taking them."""

    source: Iterator[Record]
    width: int  # requests in flight at once: rows held back are capped at a multiple
    exhausted: bool = False
    stop: str | None = None  # the bad record that --fail-fast stops at


class RowsRun:
    """What a run over records shares, whatever generates the replies (the local
    engine here, a remote endpoint in :mod:`chatforge.batch.remote`): rendering
    each record's prompt, and writing finished rows in input order with the summary."""

    def __init__(
        self,
        writer: RowWriter,
        template: PromptTemplate,
        system: str | None,
        config: GenerationConfig,
        n: int,
        fail_fast: bool,
        model_info: dict[str, Any],
        settings: dict[str, Any],
    ) -> None:
        self.writer = writer
        self.template = template
        self.system = system
        self.config = config
        self.n = n
        self.fail_fast = fail_fast
        self.summary = BatchSummary(output=writer.path)
        self.on_progress: ProgressFn | None = None
        self.model_info = model_info
        self.settings = settings  # each row's "settings" (see chatforge.batch.settings)
        self.params = resolved_params(config)
        self._seen: dict[str, str] = {}  # id key -> source of its first record in this input

    def execute(
        self, open_records: Callable[[], Iterable[Record]], total: int, todo: int, progress: Any
    ) -> None:
        """Run over the records with a progress bar (``progress=True``), a callback, or
        nothing; ``total`` records, ``todo`` of them not in the output yet."""
        self.summary.total = total
        self.summary.torn_bytes = self.writer.existing.torn_bytes
        if progress is True:
            with _ProgressBar(todo, self.writer.path.name) as bar:
                self.on_progress = bar.update
                self.run(open_records())
        else:
            self.on_progress = progress or None
            self.run(open_records())

    def run(self, records: Iterable[Record]) -> None:
        raise NotImplementedError

    def _admit(
        self,
        feed: _Feed,
        pending: deque[_Job],
        in_flight: Callable[[], int],
        limit: int,
        prepare: Callable[[Record], _Job],
    ) -> Iterator[_Job]:
        """The next jobs to start, each appended to ``pending`` (input order) first:
        records not yet in the output, while fewer than ``limit`` requests are in
        flight and fewer than ``_MAX_PENDING`` x ``width`` rows wait to be written
        behind a long reply. A bad record under --fail-fast ends the feed (its
        error in ``feed.stop``): what came before it finishes, then the run stops."""
        while (
            not feed.exhausted
            and feed.stop is None
            and in_flight() < limit
            and len(pending) < _MAX_PENDING * feed.width
        ):
            record = next(feed.source, None)
            if record is None:
                feed.exhausted = True
                return
            if self.writer.existing.has(record.key, record.legacy_key):
                self.summary.skipped += 1
                continue
            job = prepare(record)
            if job.error is not None and self.fail_fast:
                feed.stop = job.error
                return
            pending.append(job)
            yield job

    def _start(self, record: Record) -> _Job:
        """A job holding the record's rendered prompt, or the error that stops it."""
        job = _Job(record)
        if record.error is not None:
            return job.fail("unreadable record", record.error)
        first = self._seen.get(record.key)
        if first is not None:
            msg = f"{record.source}: duplicate id {record.id!r} (first at {first})"
            return job.fail("duplicate id", msg)
        self._seen[record.key] = record.source
        try:
            job.prompt = self.template.render(record.fields)
        except TemplateError as e:
            return job.fail("missing field", f"{record.source}: {e}")
        if not job.prompt.strip():
            job.fail("empty prompt", f"{record.source}: the prompt is empty")
        return job

    def _messages(self, prompt: str) -> list[Message]:
        """The chat messages a record's prompt is sent as (the system prompt first)."""
        messages = [Message("user", prompt)]
        if self.system:
            messages.insert(0, Message("system", self.system))
        return messages

    def _stopped(self, stop: str) -> BatchStopped:
        """The error --fail-fast stops at ``stop`` (a bad record) with."""
        done = self.summary.done + self.summary.errors
        return BatchStopped(
            f"{stop} (stopped by --fail-fast after writing {done} rows; "
            "fix the record and rerun to resume)"
        )

    # -- writing -----------------------------------------------------------------

    def _write_ready(self, pending: deque[_Job]) -> None:
        """Write the finished jobs at the head of ``pending`` (one write, then fsync)."""
        ready: list[_Job] = []
        while pending and pending[0].finished:
            ready.append(pending.popleft())
        if not ready:
            return
        self.writer.write([self._row(job) for job in ready if not job.retry])
        tokens = 0
        for job in ready:
            if job.error is not None:
                self.summary.errors += 1
                kinds = self.summary.error_kinds
                kinds[job.kind or "error"] = kinds.get(job.kind or "error", 0) + 1
                if len(self.summary.error_messages) < 5:
                    self.summary.error_messages.append(job.error)
            else:
                self.summary.done += 1
                done = [job.completions[j] for j in range(len(job.requests))]
                self.summary.prompt_tokens += done[0].prompt_tokens
                tokens += sum(c.completion_tokens for c in done)
        self.summary.completion_tokens += tokens
        if self.on_progress is not None:
            self.on_progress(len(ready), tokens)

    def _row(self, job: _Job) -> dict[str, Any]:
        rec = job.record
        row: dict[str, Any] = {"id": rec.id, "source": rec.source, "prompt": job.prompt}
        if job.error is not None:
            row.update(output=None, finish_reason=None, error=job.error)
        else:
            done = [job.completions[j] for j in range(len(job.requests))]
            row["output"] = done[0].text
            if self.n > 1:
                row["outputs"] = [c.text for c in done]
                row["finish_reasons"] = [c.finish_reason for c in done]
            row.update(
                finish_reason=done[0].finish_reason,
                prompt_tokens=done[0].prompt_tokens,
                completion_tokens=sum(c.completion_tokens for c in done),
                seconds=round(max(c.seconds for c in done), 4),
                error=None,
            )
        row["params"] = self.params
        if self.n > 1:
            row["n"] = self.n
        row["model"] = self.model_info
        # The resume key, unlike "id", is unique even when a record has no id of its own.
        row["key"] = rec.key
        row["settings"] = self.settings  # with "params", what a rerun must match to resume
        return row


class _Run(RowsRun):
    """The state of one :func:`generate_batch` call."""

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
        owner: dict[int, tuple[_Job, int]] = {}  # engine handle -> (job, sample)
        done: list[tuple[int, Completion]] = []  # filled by the engine's events
        pending: deque[_Job] = deque()  # read, not yet written, in input order
        feed = _Feed(iter(records), self.batch_size)

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

    def _prepare(self, record: Record) -> _Job:
        """Render and encode a record, or say why it cannot run (before any generation)."""
        job = self._start(record)
        if job.error is not None:
            return job
        assert job.prompt is not None
        messages = self._messages(job.prompt)
        try:
            # Raises ContextOverflowError when the prompt leaves no room for a reply.
            plan = plan_request(
                self.loaded.format,
                messages,
                self.loaded.info.context_length,
                self.config,
                drop_history=False,
            )
            self.engine.budget_for(plan.request)
        except ValueError as e:
            kind = "prompt too long" if isinstance(e, ContextOverflowError) else "invalid request"
            return job.fail(kind, f"{record.source}: {e}")
        for j in range(self.n):
            cfg = self.config
            if cfg.seed is not None and j > 0:
                # Reruns reproduce, and sample 0 matches `chatforge chat --seed S`.
                cfg = cfg.replace(seed=(cfg.seed + j) % 2**64)
            job.requests.append(dataclasses.replace(plan.request, config=cfg))
        return job


def resolved_params(config: GenerationConfig) -> dict[str, Any]:
    """The settings as they take effect (the default reply length filled in)."""
    params = config.to_dict()
    if params["max_new_tokens"] is None and params["max_length"] is None:
        params["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    return params


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


class _ProgressBar:
    """A rich progress bar on stderr: records done, records/s, generated tokens/s."""

    def __init__(self, total: int, name: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._t0 = time.perf_counter()
        self._tokens = 0
        self._records = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.progress.add_task(name, total=total, rate="")

    def __enter__(self) -> _ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, records: int, tokens: int) -> None:
        self._records += records
        self._tokens += tokens
        dt = max(time.perf_counter() - self._t0, 1e-9)
        rate = f"{self._records / dt:.1f} rec/s {self._tokens / dt:.0f} tok/s"
        self.progress.update(self.task, advance=records, rate=rate)
