"""What a batch run over records shares, whatever generates the replies (the local
engine in :mod:`~chatforge.batch.local`, an endpoint in :mod:`~chatforge.batch.remote`).

Each record becomes a :class:`Job` (its rendered prompt, one request per sample, the
results, or why it produced no output); a :class:`Feed` hands records to the run a
window at a time; :class:`RowsRun` renders prompts and writes finished jobs as rows in
input order, counting them in the :class:`BatchSummary`. Errors are counted by kind
(:data:`ERROR_KINDS`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.batch.output import RowWriter
from chatforge.batch.records import Record, check_input, read_records, records_from
from chatforge.batch.template import PromptTemplate, TemplateError
from chatforge.conversation import Message
from chatforge.errors import ChatforgeError
from chatforge.generation.config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from chatforge.generation.engine import Completion, Request

# Rows that may wait, finished, behind one unfinished earlier row (x batch_size).
_MAX_PENDING = 64

ERROR_KINDS = (
    "unreadable record",  # a malformed line or CSV row, text that is not UTF-8
    "duplicate id",
    "missing field",  # the template (or the default prompt/text) needs a field the record lacks
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
    context_full: int = 0  # replies cut short because the context was full (no slide)
    slid: int = 0  # replies that went past the context by sliding (GenerationConfig.slide)
    context_length: int | None = None  # the model's context (local runs)

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

    def context_notice(self) -> str | None:
        """The line saying replies stopped because the context was full, and how to go
        on past it (None when none did)."""
        if not self.context_full:
            return None
        size = f" ({self.context_length} tokens)" if self.context_length else ""
        return (
            f"{self.context_full} replies stopped because the model's context{size} was "
            "full (finish_reason length); --slide keeps generating by dropping the oldest "
            "tokens"
        )

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
class Job:
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

    def fail(self, kind: str, message: str) -> Job:
        """Record why the job produced no output (the first reason wins)."""
        if self.error is None:
            self.error, self.kind = message, kind
        return self


ProgressFn = Callable[[int, int], None]
"""Called as ``progress(records, completion_tokens)`` after rows are written."""


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
class Feed:
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
            with ProgressBar(todo, self.writer.path.name) as bar:
                self.on_progress = bar.update
                self.run(open_records())
        else:
            self.on_progress = progress or None
            self.run(open_records())

    def run(self, records: Iterable[Record]) -> None:
        raise NotImplementedError

    def _admit(
        self,
        feed: Feed,
        pending: deque[Job],
        in_flight: Callable[[], int],
        limit: int,
        prepare: Callable[[Record], Job],
    ) -> Iterator[Job]:
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

    def _start(self, record: Record) -> Job:
        """A job holding the record's rendered prompt, or the error that stops it."""
        job = Job(record)
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
        # An empty prompt is a request too: the reply starts from the model's start
        # token (plan_request), as a freshly pretrained model is sampled.
        return job

    def _plan(self, job: Job) -> tuple[list[Message], GenerationConfig, list[int]]:
        """What a job with a rendered prompt is sent as: its chat messages, its settings
        and the samples to draw (``for_sample`` indices). A run over one model and one
        config sends every record alike; :mod:`~chatforge.batch.compare` overrides this
        to send each cell of its grid with that cell's system prompt and settings."""
        assert job.prompt is not None
        return self._messages(job.prompt), self.config, list(range(self.n))

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

    def _write_ready(self, pending: deque[Job]) -> None:
        """Write the finished jobs at the head of ``pending`` (one write, then fsync)."""
        ready: list[Job] = []
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
                self.summary.context_full += sum(getattr(c, "context_full", False) for c in done)
                self.summary.slid += sum(bool(getattr(c, "slid_tokens", 0)) for c in done)
        self.summary.completion_tokens += tokens
        if self.on_progress is not None:
            self.on_progress(len(ready), tokens)

    def _row(self, job: Job) -> dict[str, Any]:
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
            if self.config.slide:  # oldest tokens dropped to go past the context, all samples
                row["slid_tokens"] = sum(getattr(c, "slid_tokens", 0) for c in done)
        row["params"] = self.params
        if self.n > 1:
            row["n"] = self.n
        row["model"] = self.model_info
        # The resume key, unlike "id", is unique even when a record has no id of its own.
        row["key"] = rec.key
        row["settings"] = self.settings  # with "params", what a rerun must match to resume
        return row


def resolved_params(config: GenerationConfig) -> dict[str, Any]:
    """The settings as they take effect (the default reply length filled in)."""
    params = config.to_dict()
    if params["max_new_tokens"] is None and params["max_length"] is None:
        params["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    return params


class ProgressBar:
    """A rich progress bar on stderr: records done, records/s, generated tokens/s.

    ``with ProgressBar(total, name) as bar:`` then ``bar.update(records, tokens)``: a
    :data:`ProgressFn`, so one bar can follow several runs (a grid's models)."""

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

    def __enter__(self) -> ProgressBar:
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
