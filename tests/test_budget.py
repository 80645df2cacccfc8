"""The context budget: dropping whole oldest turns, keeping the system prompt, clear errors."""

from __future__ import annotations

import pytest

from chatforge.conversation import (
    DEFAULT_MAX_NEW_TOKENS,
    BudgetConfig,
    EosFormat,
    Message,
    fit_prompt,
    reply_budget,
)
from chatforge.errors import ContextOverflowError


@pytest.fixture()
def fmt(tiny_tokenizer) -> EosFormat:
    return EosFormat(tiny_tokenizer)


def _chat(n_turns: int, system: str | None = "Be kind") -> list[Message]:
    msgs = [Message("system", system)] if system else []
    for i in range(n_turns):
        msgs += [Message("user", f"question {i}"), Message("assistant", f"answer {i}")]
    return msgs + [Message("user", "last one")]


def _n(fmt: EosFormat, msgs: list[Message]) -> int:
    return len(fmt.encode(msgs))


def test_nothing_dropped_when_it_fits(fmt) -> None:
    msgs = _chat(3)
    n = _n(fmt, msgs)
    out = fit_prompt(fmt, msgs, context_length=n + 50, max_new_tokens=20)
    assert out.dropped == [] and out.messages == msgs
    assert out.prompt_tokens == n and out.encoded.input_ids == fmt.encode(msgs).input_ids
    assert out.max_new_tokens == 20
    # Without max_new_tokens the reply gets all the room left (up to the default length).
    assert fit_prompt(fmt, msgs, n + 50, None).max_new_tokens == 50


def test_oldest_turns_dropped_whole_system_kept(fmt) -> None:
    msgs = _chat(4)
    keep_two = [msgs[0], *msgs[5:]]  # system + turns 2, 3 + newest user
    limit = _n(fmt, keep_two) + 10
    out = fit_prompt(fmt, msgs, context_length=limit, max_new_tokens=10)
    assert out.dropped == [1, 2, 3, 4]
    assert out.messages == keep_two
    assert out.max_new_tokens == 10 and out.prompt_tokens + 10 <= limit


def test_reply_budget_never_empty(fmt) -> None:
    msgs = _chat(2)
    base = [msgs[0], msgs[-1]]
    limit = _n(fmt, base) + 5  # history cannot fit; only 5 tokens for the reply
    out = fit_prompt(fmt, msgs, limit, max_new_tokens=100, budget=BudgetConfig(min_reply_tokens=4))
    assert out.messages == base and out.dropped == [1, 2, 3, 4]
    assert out.max_new_tokens == 5
    # A small max_new_tokens lowers the room the reply needs.
    out = fit_prompt(fmt, msgs, _n(fmt, base) + 2, max_new_tokens=2)
    assert out.max_new_tokens == 2


def test_history_share_cap(fmt) -> None:
    msgs = _chat(4, system=None)
    n_all, n_base = _n(fmt, msgs), _n(fmt, msgs[-1:])
    context = 4 * n_all
    assert fit_prompt(fmt, msgs, context, 16).dropped == []
    share = (n_all - n_base - 1) / context  # just too small for the whole history
    out = fit_prompt(fmt, msgs, context, 16, budget=BudgetConfig(max_history_share=share))
    assert out.dropped == [0, 1]
    assert out.prompt_tokens - n_base <= share * context


def test_prompt_share_cap(fmt) -> None:
    msgs = _chat(4)
    n_all = _n(fmt, msgs)
    context = 4 * n_all
    out = fit_prompt(fmt, msgs, context, 16, budget=BudgetConfig(max_prompt_share=0.2))
    assert out.dropped and out.prompt_tokens <= 0.2 * context


def test_newest_turn_cannot_fit(fmt) -> None:
    msgs = [Message("system", "Be kind"), Message("user", "word " * 60)]
    n = _n(fmt, msgs)
    with pytest.raises(ContextOverflowError) as err:
        fit_prompt(fmt, msgs, context_length=n - 10, max_new_tokens=None)
    user_n = _n(fmt, msgs[1:])
    assert str(err.value) == (
        f"the message is {user_n} tokens (with the system prompt, {n}) but the model's "
        f"context is {n - 10} tokens, leaving no room for a reply; "
        "shorten the message or the system prompt"
    )
    assert err.value.prompt_tokens == n and err.value.limit == n - 10
    assert isinstance(err.value, ValueError)
    with pytest.raises(ContextOverflowError, match="leaving only 3 tokens for a reply"):
        fit_prompt(fmt, msgs[1:], context_length=user_n + 3, max_new_tokens=None)


def test_max_length_error(fmt) -> None:
    msgs = _chat(1)
    base = _n(fmt, [msgs[0], msgs[-1]])
    with pytest.raises(ContextOverflowError) as err:
        fit_prompt(fmt, msgs, context_length=1024, max_new_tokens=None, max_length=base - 1)
    assert str(err.value) == (
        f"max_length {base - 1} leaves no room for a reply: the prompt is already "
        f"{base} tokens; raise it or use --max-new-tokens"
    )
    out = fit_prompt(fmt, msgs, context_length=1024, max_new_tokens=None, max_length=base + 20)
    assert out.max_new_tokens == 20 and out.dropped == [1, 2]


def test_bad_input(fmt) -> None:
    with pytest.raises(ValueError, match="last message must be a user"):
        fit_prompt(fmt, [Message("user", "a"), Message("assistant", "b")], 100, None)
    with pytest.raises(ValueError, match="last message must be a user"):
        fit_prompt(fmt, [], 100, None)
    with pytest.raises(ValueError, match="max_history_share"):
        BudgetConfig(max_history_share=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fit_prompt(fmt, [Message("user", "a")], 100, 0)


# ------------------------------------------------------------------ the one reply-length rule


def test_reply_budget_is_the_one_rule() -> None:
    assert reply_budget(10) == DEFAULT_MAX_NEW_TOKENS
    assert reply_budget(10, 100) == 90  # the context caps the default
    assert reply_budget(10, 1000, max_new_tokens=50, max_length=40) == 30
    # cap: a budget resolved earlier (Request.max_new_tokens) only lowers it.
    assert reply_budget(10, 1000, max_new_tokens=50, cap=20) == 20
    assert reply_budget(10, 1000, max_new_tokens=50, cap=80) == 50
    # cap=0 scores the prompt: the whole prompt must fit, the length settings do not apply.
    assert reply_budget(100, 100, max_length=50, cap=0) == 0
    with pytest.raises(ContextOverflowError, match="context is 100 tokens; shorten it"):
        reply_budget(101, 100, cap=0)
    with pytest.raises(ContextOverflowError, match="leaves no room for a reply"):
        reply_budget(100, 100)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        reply_budget(10, 100, cap=-1)


def test_fit_prompt_answers_what_the_engine_will(fmt) -> None:
    from chatforge.generation.config import GenerationConfig

    msgs = _chat(1)
    n = _n(fmt, msgs)
    for max_new, max_length, context in [
        (None, None, n + 1000),
        (None, n + 40, n + 1000),
        (30, None, n + 40),
        (None, None, n + 20),
    ]:
        cfg = GenerationConfig(max_new_tokens=max_new, max_length=max_length)
        out = fit_prompt(fmt, msgs, context, max_new, max_length=max_length)
        assert out.dropped == []
        assert out.max_new_tokens == cfg.reply_budget(n, context)
