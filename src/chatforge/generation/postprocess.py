"""Post-processing: from one step's features to tokens, text and events.

After the model runner's forward pass, :meth:`PostProcessor.process` takes every
scheduled sequence's features:

1. prompt rows: the logprobs of the prompt tokens they predict (a scoring request,
   ``prompt_logprobs``) or their final hidden states, summed (an embedding request);
2. a sequence whose tokens are all computed samples its next token, all such rows as
   one batch: logprobs from the raw logits (the model's distribution, as OpenAI
   reports them), then the requests' logits processors (a grammar), then
   :mod:`~chatforge.generation.sampling`'s penalties, warpers and draw;
3. each sampled token goes through the stop rules (a stop token, a stop string, the
   reply budget) and the detokeniser (:mod:`~chatforge.generation.stream`), and
   becomes an event; a finished sequence gets its :class:`Completion`.

Events are collected in the step's :data:`Events` list with the sequence each is
for; delivering them (callbacks, buffers) and freeing a finished sequence's place
are the engine's, handed in as ``retire``. A failure in one request fails that
request only (``finish_reason="error"``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Container, Sequence
from typing import Any

import torch
from torch import Tensor

from chatforge.generation.processors import SequenceView, apply_processors
from chatforge.generation.runner import ModelRunner, Work
from chatforge.generation.sampling import SamplingParams, sample, takes_argmax
from chatforge.generation.sequence import Sequence as Seq
from chatforge.generation.sequence import Status
from chatforge.generation.types import Completion, StreamEvent, TokenLogprob

log = logging.getLogger(__name__)

LOGIT_CHUNK = 256  # rows of prompt logits (or hidden states) materialised at once

Events = list[tuple[Seq, StreamEvent]]
"""One step's events, in order, each with the sequence it belongs to."""


class PostProcessor:
    """Turns features into events for the sequences of a step.

    ``runner`` gives logits and hidden states from features; ``retire(seq)`` is called
    once a sequence has finished (its completion is in the events), to free its place.
    """

    def __init__(self, runner: ModelRunner, retire: Callable[[Seq], None]) -> None:
        self.runner = runner
        self.retire = retire

    def process(
        self,
        work: list[Work],
        features: list[Tensor | None],
        events: Events,
        stop_ids: Container[int],
    ) -> None:
        """Post-process a step: ``features[i]`` are ``work[i]``'s (None where its forward
        pass failed or no row was asked for); ``stop_ids`` end a reply."""
        to_sample: list[tuple[Seq, Tensor]] = []
        for w, f in zip(work, features, strict=True):
            seq = w.seq
            if seq.status is not Status.RUNNING:  # failed in the forward pass
                continue
            if w.all_rows and f is not None and not self._prompt_rows(w, f, events):
                continue
            if not w.samples:
                continue
            if seq.budget == 0:  # scored, nothing to generate
                self.finish(seq, "length", events)
                continue
            assert f is not None
            to_sample.append((seq, f[-1:]))
        if to_sample:
            self._sample_and_accept(to_sample, events, stop_ids)

    # -- prompt rows ----------------------------------------------------------------------

    def _prompt_rows(self, w: Work, features: Tensor, events: Events) -> bool:
        """Prompt logprobs and embedding rows of one chunk; False if the request failed."""
        seq = w.seq
        try:
            if seq.wants_prompt_logprobs:
                self._prompt_logprobs(w, features)
            if seq.request.embed:
                self._embed_rows(w, features)
        except Exception as e:  # noqa: BLE001 - one request's fault
            self.fail(seq, e, events)
            return False
        return True

    def _prompt_logprobs(self, w: Work, features: Tensor) -> None:
        """Logprobs of the prompt tokens this chunk's rows predict (row p predicts p + 1)."""
        seq = w.seq
        k = seq.request.prompt_logprobs or 0
        rows = min(w.end, seq.num_prompt - 1) - w.start
        # After a preemption the prompt is computed again: skip what was scored.
        first = max(0, len(seq.prompt_logprobs) - w.start - 1)
        for lo in range(first, rows, LOGIT_CHUNK):
            hi = min(rows, lo + LOGIT_CHUNK)
            lp = torch.log_softmax(self.runner.logits(features[lo:hi]), dim=-1)  # (n, V)
            targets = seq.tokens[w.start + lo + 1 : w.start + hi + 1]
            seq.prompt_logprobs += token_logprobs(lp, targets, k)

    def _embed_rows(self, w: Work, features: Tensor) -> None:
        """Add this chunk's final hidden states to the sequence's running sum (O(hidden)
        memory however long the prompt); the mean is taken when it finishes."""
        seq = w.seq
        # After a preemption the prompt is computed again: skip what was summed.
        first = max(0, seq.embed_rows - w.start)
        rows = min(w.end, seq.num_prompt) - w.start
        for lo in range(first, rows, LOGIT_CHUNK):
            hi = min(rows, lo + LOGIT_CHUNK)
            part = self.runner.hidden(features[lo:hi]).double().sum(0)  # (H,)
            seq.embed_sum = part if seq.embed_sum is None else seq.embed_sum + part
            seq.embed_rows = w.start + hi

    # -- sampling -------------------------------------------------------------------------

    def _sample_and_accept(
        self, items: list[tuple[Seq, Tensor]], events: Events, stop_ids: Container[int]
    ) -> None:
        """Sample the rows ``items`` (sequence, last-row features) as one batch; when that
        fails, each row alone, failing only the culprits."""
        seqs = [s for s, _ in items]
        try:
            logits = self.runner.logits(torch.cat([f for _, f in items]))  # (B, V)
            tokens, lps = self._sample(seqs, logits)
        except Exception:  # noqa: BLE001 - find the row that failed, keep the others
            tokens, lps = [], []
            for seq, f in items:
                try:
                    t, lp = self._sample([seq], self.runner.logits(f))
                    tokens.append(t[0])
                    lps.append(lp[0])
                except Exception as e:  # noqa: BLE001
                    self.fail(seq, e, events)
                    tokens.append(None)
                    lps.append(None)
        now = time.perf_counter()
        for seq, tok, lp in zip(seqs, tokens, lps, strict=True):
            if tok is not None:
                self._accept(seq, tok, lp, now, events, stop_ids)

    def _sample(self, seqs: list[Seq], logits: Tensor) -> tuple[list[int], list[Any]]:
        """Tokens and (when asked for) logprobs for rows of raw ``logits`` (B, V)."""
        logits = logits.float()
        want = [s.request.logprobs is not None for s in seqs]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want) else None  # (B, V)
        processed = apply_processors(
            [s.processors for s in seqs],
            [SequenceView(s.prompt_ids, s.generated, s.budget) for s in seqs],
            logits,
        )
        configs = [s.request.config for s in seqs]
        if takes_argmax(configs) and not any(s.processors for s in seqs):
            # what sample() gives these rows, without its per-step tensors (~0.4 ms of a
            # ~10 ms batch-1 step); a processor may ban every token: sample() says so
            tokens = processed.argmax(dim=-1).tolist()
        else:
            tokens = sample(
                processed,
                SamplingParams.from_configs(configs, logits.device),
                [s.generator for s in seqs],
                histories=[s.history for s in seqs],  # the whole prompt + reply, slid or not
                replies=[s.generated for s in seqs],
            ).tolist()
        lps: list[Any] = []
        for row, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            if raw_lp is None or not want[row]:
                lps.append(None)
            else:
                lps.append(token_logprobs(raw_lp[row : row + 1], [tok], seq.request.logprobs)[0])
        return tokens, lps

    # -- stop rules, text -----------------------------------------------------------------

    def _accept(
        self,
        seq: Seq,
        tok: int,
        lp: TokenLogprob | None,
        now: float,
        events: Events,
        stop_ids: Container[int],
    ) -> None:
        """Stop rules and detokenisation for one sampled token."""
        if seq.first_token_at is None:
            seq.first_token_at = now
        entry = lp if lp is not None else TokenLogprob(tok, math.nan)
        if tok in stop_ids:
            # The stop token is one of the generated tokens, as in vLLM and OpenAI: it is
            # in token_ids, completion_tokens, the logprobs and this last event's tokens
            # (a scorer that reads the last token, lm-eval's echo + max_tokens=1, needs
            # it), but it adds no text and is never fed to the model (the sequence ends).
            seq.generated.append(tok)
            if lp is not None:
                seq.logprobs.append(lp)
            self.finish(seq, "stop", events, tokens=[entry])
            return
        seq.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        text = seq.stream.push(tok)
        reason = None
        if seq.stream.stopped:
            reason = "stop"
        elif len(seq.generated) >= seq.budget:
            reason = "length"
        if reason is None:
            events.append((seq, StreamEvent(seq.id, text, None, [entry])))
        else:
            self.finish(seq, reason, events, text, [entry])

    # -- the end of a request ---------------------------------------------------------------

    def finish(
        self,
        seq: Seq,
        reason: str,
        events: Events,
        text: str = "",
        tokens: list[TokenLogprob] | None = None,
        error: str | None = None,
    ) -> None:
        """End ``seq``: its last event carries the :class:`Completion`; then ``retire``."""
        now = time.perf_counter()
        if reason != "error" and seq.generated:
            text += seq.stream.flush()  # the last piece goes out with the completion
        req = seq.request
        completion = Completion(
            text=seq.stream.text,
            token_ids=list(seq.generated),
            finish_reason=reason,
            prompt_tokens=seq.num_prompt,
            completion_tokens=len(seq.generated),
            seconds=now - seq.added_at,
            first_token_seconds=(
                None if seq.first_token_at is None else seq.first_token_at - seq.added_at
            ),
            cached_tokens=seq.cached_tokens,
            logprobs=list(seq.logprobs) if req.logprobs is not None else None,
            prompt_logprobs=list(seq.prompt_logprobs) if req.prompt_logprobs is not None else None,
            error=error,
            slides=seq.slides,
            slid_tokens=seq.slid_tokens,
            # The reply used the budget the context left (not the one it asked for).
            context_full=reason == "length"
            and seq.context_capped
            and 0 < seq.budget <= len(seq.generated),
        )
        if req.embed and reason != "error":
            completion.embedding = mean_unit(seq)
        events.append((seq, StreamEvent(seq.id, text, completion, tokens or [])))
        self.retire(seq)

    def fail(self, seq: Seq, exc: BaseException, events: Events) -> None:
        """End ``seq`` with ``finish_reason="error"``, saying why."""
        log.warning("request %s failed: %s: %s", seq.id, type(exc).__name__, exc)
        self.finish(seq, "error", events, error=f"{type(exc).__name__}: {exc}")


def mean_unit(seq: Seq) -> list[float] | None:
    """The L2-normalised mean of a finished embedding request's summed rows."""
    if seq.embed_sum is None or seq.embed_rows != seq.num_prompt:
        return None
    mean = seq.embed_sum / seq.num_prompt  # (H,) float64
    return (mean / mean.norm().clamp_min(1e-12)).float().tolist()


def token_logprobs(lp: Tensor, targets: Sequence[int], k: int) -> list[TokenLogprob]:
    """Rows of log-probabilities (n, V), the token each row chose, and the top ``k``."""
    idx = torch.tensor(list(targets), dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, idx[:, None])[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in targets]
    if k > 0:
        values, ids = torch.topk(lp, k, dim=-1)
        tops = [
            list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    return [
        TokenLogprob(int(t), float(c), top) for t, c, top in zip(targets, chosen, tops, strict=True)
    ]
