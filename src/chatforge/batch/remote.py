"""Run a file of prompts through an OpenAI-compatible endpoint (a chatforge server,
vLLM, a hosted API): the same records, templates, system prompt, output rows and
resumability as :func:`~chatforge.batch.generate_batch`, with up to
``max_concurrency`` requests in flight.

Rows are written in input order as soon as every record before them has its row.
A record the endpoint rejects (a 4xx, e.g. a prompt too long for its context) gets
an error row, as a bad record does locally. Failures that may pass (a timeout, 429,
5xx after the client's retries) get no row, so the next run retries them; failures
that would fail every record (cannot connect, a bad key, an unknown model) stop the
run with one error, keeping the rows written so far.

The settings go as :func:`chatforge.openai_api.request_params` maps them, as
``chat --api-base`` sends them: extras (``top_k``, ``min_p``, ...) only when switched
on; a setting no request can carry (``max_length``) is an error, never silently dropped.

>>> generate_batch_remote("http://127.0.0.1:8000/v1", "smollm2",  # doctest: +SKIP
...                       "prompts.txt", "answers.jsonl", max_concurrency=8)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
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
from chatforge.batch.settings import fingerprint, run_settings
from chatforge.batch.template import PromptTemplate
from chatforge.errors import ChatforgeError, ParamError
from chatforge.generation.config import GenerationConfig
from chatforge.openai_api import (
    describe_api_error,
    openai_client,
    remote_config,
    request_params,
)

DEFAULT_CONCURRENCY = 4
"""Requests in flight at once when no ``max_concurrency`` is given."""

RERUN = "(no row written: a rerun retries it)"
"""How the message of a failure that may pass ends (its record gets no row)."""


@dataclass
class _Reply:
    """One sample's result, with the fields the row needs (as a local Completion)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    slid_tokens: int = 0  # a chatforge server's extra on the choice (the slide extra)


class _Fatal(ChatforgeError):
    """A failure every other request would meet too: stop the run."""


class _Failed(Exception):
    """One request failed; ``retry`` when it may pass on a rerun; ``kind`` as the
    summary counts it (see :data:`~chatforge.batch.jobs.ERROR_KINDS`)."""

    def __init__(self, message: str, retry: bool, kind: str = "endpoint error") -> None:
        super().__init__(message)
        self.retry = retry
        self.kind = "not answered" if retry else kind


def generate_batch_remote(
    api_base: str,
    model: str,
    inputs: str | Path | Iterable[str | Mapping[str, Any]],
    output: str | Path,
    template: str | PromptTemplate | None = None,
    system: str | None = None,
    config: GenerationConfig | None = None,
    n: int = 1,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    fail_fast: bool = False,
    progress: bool | ProgressFn = True,
    api_key: str | None = None,
    key_source: str | None = None,
    timeout: float = 600.0,
    force_resume: bool = False,
) -> BatchSummary:
    """Generate a reply for every input record with the endpoint at ``api_base``
    (``model`` as it names it) and append one row per record to ``output``.

    Arguments are :func:`~chatforge.batch.generate_batch`'s, plus ``api_key`` (and
    ``key_source``, where it came from, for a 401's message), ``max_concurrency``
    requests in flight and a per-request ``timeout`` in seconds. ``config`` defaults
    to :func:`~chatforge.openai_api.remote_config`; with a seed, sample ``j`` uses ``seed + j``
    (:meth:`~chatforge.GenerationConfig.for_sample`; one request per sample). The rows'
    ``model`` is ``{"name", "ref", "api_base"}``; their ``settings`` record ``model`` and
    ``api_base``, so resuming with another endpoint or model is refused unless
    ``force_resume``, as a local run's.
    """
    config = config if config is not None else remote_config()
    request_params(config)  # unsendable settings fail before anything is sent
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParamError("n", f"must be an integer >= 1 (got {n!r})")
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
        raise ParamError("max_concurrency", f"must be an integer >= 1 (got {max_concurrency!r})")
    if max_concurrency < 1:
        raise ParamError("max_concurrency", f"must be >= 1 (got {max_concurrency})")
    tmpl = template if isinstance(template, PromptTemplate) else PromptTemplate(template)
    open_records = records_opener(inputs)
    check_output(output)
    client = openai_client(api_base, api_key, timeout=timeout)
    settings = run_settings(model, tmpl.text, system, n, api_base=api_base)
    fp = fingerprint(settings, resolved_params(config))
    with RowWriter(output, fp, force_resume) as writer:
        total, todo = count_todo(open_records(), writer)
        if todo == 0:
            return BatchSummary(
                output=writer.path,
                total=total,
                skipped=total,
                torn_bytes=writer.existing.torn_bytes,
            )
        info = {"name": model, "ref": model, "api_base": api_base}
        run = RemoteRun(writer, tmpl, system, config, n, fail_fast, info, settings)
        run.client, run.api_base = client, api_base
        run.key_source = key_source if api_key else None
        run.concurrency = max_concurrency
        run.execute(open_records, total, todo, progress)
    return run.summary


class RemoteRun(RowsRun):
    """The state of one :func:`generate_batch_remote` call: each record's requests sent
    to the endpoint (what a request is made of: :meth:`calls`)."""

    client: Any
    api_base: str
    key_source: str | None
    concurrency: int

    def run(self, records: Iterable[Record]) -> None:
        """Send records' requests, ``concurrency`` at a time, writing rows in order."""
        t0 = time.perf_counter()
        self._stop_event = threading.Event()
        owner: dict[Future, tuple[Job, int]] = {}
        pending: deque[Job] = deque()
        feed = Feed(iter(records), self.concurrency)
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="chatforge-remote")
        try:
            while True:
                # Twice the concurrency queued, so a freed thread starts at once.
                limit = 2 * self.concurrency
                for job in self._admit(feed, pending, owner.__len__, limit, self._start):
                    if job.error is None:
                        for j, (model, messages, params) in enumerate(self.calls(job)):
                            job.requests.append(params)
                            owner[pool.submit(self._call, model, messages, params)] = (job, j)
                self._write_ready(pending)
                if not owner:
                    if feed.exhausted or feed.stop is not None:
                        break
                    continue
                finished, _ = wait(list(owner), return_when=FIRST_COMPLETED)
                for future in finished:
                    job, j = owner.pop(future)
                    try:
                        job.completions[j] = future.result()
                    except _Failed as e:
                        if job.error is None:
                            job.fail(e.kind, f"{job.record.source}: {e}")
                            job.retry = e.retry
                    # A failed sample makes the row an error row (written at once).
        except BaseException as e:
            self._stop_event.set()  # calls not started yet return at once
            for future in owner:
                future.cancel()
            self._write_ready(pending)  # keep what is finished, in order
            if isinstance(e, _Fatal):
                written = self.summary.done + self.summary.errors
                if written:
                    raise ChatforgeError(
                        f"{e}; the {written} rows written before are kept: rerun the same "
                        "command to resume"
                    ) from None
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.summary.seconds = time.perf_counter() - t0
        if feed.stop is not None:
            raise self._stopped(feed.stop)

    def calls(self, job: Job) -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
        """``(model, messages, params)`` of each request a job with a rendered prompt
        sends: one per sample, each with its own seed (GenerationConfig.for_sample)."""
        messages, config, samples = self._plan(job)
        sent = [m.to_dict() for m in messages]
        return [
            (self.model_info["ref"], sent, request_params(config.for_sample(j), endpoint="chat"))
            for j in samples
        ]

    def _call(self, model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> _Reply:
        """One chat completion; raises :class:`_Failed` (this record) or :class:`_Fatal`."""
        import openai

        if self._stop_event.is_set():
            raise _Failed("not sent: the run stopped", retry=True)
        t0 = time.perf_counter()
        try:
            r = self.client.chat.completions.create(
                model=model, messages=messages, extra_body=params
            )
        except openai.APIStatusError as e:
            text = describe_api_error(e, self.api_base, self.key_source)
            if e.status_code in (401, 403, 404):  # every other request would fail alike
                raise _Fatal(text) from None
            if e.status_code == 429 or e.status_code >= 500:
                raise _Failed(f"{text} {RERUN}", retry=True) from None
            raise _Failed(text, retry=False, kind="rejected by the endpoint") from None
        except openai.APITimeoutError as e:
            text = describe_api_error(e, self.api_base, self.key_source)
            raise _Failed(f"{text} (timed out) {RERUN}", retry=True) from None
        except openai.APIConnectionError as e:
            raise _Fatal(describe_api_error(e, self.api_base, self.key_source)) from None
        except openai.APIError as e:
            text = describe_api_error(e, self.api_base, self.key_source)
            raise _Failed(text, retry=False) from None
        if not r.choices:
            raise _Failed(f"{self.api_base} answered with no choices", retry=True)
        choice = r.choices[0]
        usage = r.usage
        return _Reply(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=int(usage.prompt_tokens) if usage else 0,
            completion_tokens=int(usage.completion_tokens) if usage else 0,
            seconds=time.perf_counter() - t0,
            slid_tokens=int((getattr(choice, "model_extra", None) or {}).get("slid_tokens") or 0),
        )


__all__ = [
    "DEFAULT_CONCURRENCY",
    "RERUN",
    "generate_batch_remote",
]
