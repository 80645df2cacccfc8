"""Structured output and tools on tiny random models: every reply follows its schema.

A random model writes noise, so these tests show the constraint, not the model,
makes the JSON valid: nested objects, arrays, enums, integers, required fields,
while sampling at temperature 1, and within small reply budgets.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from chatforge import load_model
from chatforge.generation.config import GenerationConfig
from chatforge.generation.engine import Engine
from chatforge.generation.grammar import GrammarConstraint
from chatforge.generation.types import Request
from chatforge.server import Limits, create_app
from conftest import TINY_TOKENIZER, make_tiny_llama
from serverkit import ServerThread

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 1024 positions: the tools' description alone is ~600 of the tiny tokenizer's tokens.
    return load_model(str(make_tiny_llama(tmp_path_factory.mktemp("llama-1k"), positions=1024)))


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.shared(tiny)


@pytest.fixture(scope="module")
def server(tiny):
    app = create_app(tiny, model_id="tiny", limits=Limits(max_tokens=300, max_n=8))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


def _prompt(tiny, text="Describe a user."):
    return list(tiny.tokenizer.encode(text))


# -- the engine ------------------------------------------------------------------------


@pytest.mark.parametrize("max_new_tokens", [400, 100])
def test_sampled_replies_of_a_random_model_follow_the_schema(tiny, engine, max_new_tokens):
    reqs = [
        Request(
            _prompt(tiny),
            GenerationConfig(
                temperature=1.0, seed=seed, max_new_tokens=max_new_tokens, json_schema=SCHEMA
            ),
        )
        for seed in range(8)
    ]
    for c in engine.generate(reqs):
        assert c.finish_reason == "stop", c
        assert c.completion_tokens <= max_new_tokens
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_a_budget_too_small_for_the_schema_ends_by_length(tiny, engine):
    c = engine.generate(
        [Request(_prompt(tiny), GenerationConfig(max_new_tokens=4, json_schema=SCHEMA))]
    )[0]
    assert c.finish_reason == "length"


LONG_TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 50}},
    "required": ["text"],
}


@pytest.mark.parametrize("schema", [SCHEMA, LONG_TEXT], ids=["nested", "min-length"])
def test_a_budget_of_the_shortest_reply_always_completes(tiny, engine, schema):
    # The closing walk's estimate is a way to finish the reply can always follow, so a
    # budget of exactly that many tokens (the end token included) holds a valid reply.
    constraint = GrammarConstraint.from_json_schema(schema)
    need = constraint.shortest_reply(engine, 1000)
    assert need is not None and constraint.shortest_reply(engine, need - 1) is None
    reqs = [
        Request(
            _prompt(tiny),
            GenerationConfig(temperature=1.0, seed=seed, max_new_tokens=budget),
            processors=[constraint],
        )
        for budget in (need, need + 3, need + 70)
        for seed in range(4)
    ]
    for c in engine.generate(reqs):
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), schema)


def test_one_constraint_serves_many_sequences(tiny, engine):
    # n choices share the request's processors: each needs its own parser state.
    constraint = GrammarConstraint.from_json_schema({"type": "array", "items": {"type": "integer"}})
    reqs = [
        Request(_prompt(tiny), GenerationConfig(temperature=1.0, seed=s), processors=[constraint])
        for s in range(4)
    ]
    for c in engine.generate(reqs):
        assert isinstance(json.loads(c.text), list)


def test_an_invalid_schema_is_refused_where_the_config_is_built():
    with pytest.raises(ValueError, match="json_schema"):
        GenerationConfig(json_schema={"type": "objekt"})
    with pytest.raises(ValueError, match="json_schema"):
        GenerationConfig(json_schema=["not", "a", "schema"])  # type: ignore[arg-type]


def test_set_json_schema_from_text_or_file(tmp_path):
    cfg = GenerationConfig().set_param("json_schema", '{"type": "object"}')
    assert cfg.json_schema == {"type": "object"}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SCHEMA))
    assert GenerationConfig().set_param("json-schema", str(path)).json_schema == SCHEMA
    assert cfg.set_param("json_schema", "off").json_schema is None
    with pytest.raises(ValueError, match="json_schema"):
        GenerationConfig().set_param("json_schema", str(tmp_path / "missing.json"))


def _follows(schema: dict, text: str, lenient: bool = False) -> bool:
    """Whether the grammar of ``schema`` takes all of ``text`` (tokenised by the tiny tokenizer)."""
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    from chatforge.generation.schema import json_schema_grammar

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    grammar = json_schema_grammar(schema, lenient=lenient)
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tok), grammar)
    ids = tok.encode(text, add_special_tokens=False)
    return matcher.validate_tokens(ids) == len(ids)


@pytest.mark.parametrize("lenient", [False, True])
def test_listed_properties_are_the_only_keys_unless_the_schema_allows_others(lenient):
    """A random model under ``llm --schema "name, age int, bio"`` wrote an extra key: JSON
    Schema allows any key where additionalProperties is unset, and so did our grammar."""
    person = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    assert _follows(person, '{"name": "x"}', lenient)
    assert not _follows(person, '{"name": "x", "b": 1}', lenient)
    assert _follows({**person, "additionalProperties": True}, '{"name": "x", "b": 1}', lenient)
    assert _follows(
        {**person, "additionalProperties": {"type": "integer"}}, '{"name": "x", "b": 1}', lenient
    )
    nested = {"type": "object", "properties": {"p": person}}
    assert _follows(nested, '{"p": {"name": "x"}}', lenient)
    assert not _follows(nested, '{"p": {"name": "x", "z": 2}}', lenient)
    listed = {"type": "array", "items": person}
    assert not _follows(listed, '[{"name": "x", "z": 2}]', lenient)
    # allOf's members each list part of the keys: they stay open, the object holds both.
    both = {"allOf": [{"properties": {"a": {"type": "integer"}}}, person]}
    assert _follows(both, '{"a": 1, "name": "x"}', lenient)


def test_close_objects_copies_and_keeps_what_the_schema_says():
    from chatforge.generation.schema import close_objects

    schema = {
        "type": "object",
        "properties": {"a": {"type": ["object", "null"], "properties": {}}},
        "patternProperties": {"^x": {"type": "object", "properties": {}}},
        "$defs": {"d": {"properties": {}, "additionalProperties": True}},
    }
    before = json.dumps(schema)
    closed = close_objects(schema)
    assert json.dumps(schema) == before  # the caller's schema is not changed
    assert "additionalProperties" not in closed  # patternProperties says which others
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["patternProperties"]["^x"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is True
    assert close_objects({"type": "object"}) == {"type": "object"}  # any object stays any


# -- the server: response_format ----------------------------------------------------------


def test_chat_json_schema_strict_and_json_object(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Describe a user."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "user", "schema": SCHEMA, "strict": True},
            },
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        response_format={"type": "json_object"},
        max_tokens=100,
        n=3,
        seed=1,
    )
    for choice in r.choices:
        assert isinstance(json.loads(choice.message.content), dict)


def test_streamed_structured_reply_is_the_same_json(client):
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Describe a user."}],
        response_format={"type": "json_schema", "json_schema": {"name": "u", "schema": SCHEMA}},
        temperature=0,
        max_tokens=200,
    )
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = client.chat.completions.create(**kw, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), SCHEMA)


def test_completions_take_response_format_too(client):
    r = client.completions.create(
        model="tiny",
        prompt="A user:",
        max_tokens=200,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "u", "schema": SCHEMA},
            }
        },
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "objekt"}}},
        {"type": "json_schema"},
        {"type": "xml"},
    ],
)
def test_a_bad_response_format_is_a_400_naming_it(server, response_format):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "response_format": response_format,
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("response_format"), r.json()


# -- the server: tools -----------------------------------------------------------------


def _calls_valid(calls, tools):
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_choice_returns_valid_calls(client, seed):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        temperature=1.0,
        seed=seed,
        max_tokens=250,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.tool_calls
    _calls_valid(choice.message.tool_calls, [WEATHER, CLOCK])


def test_named_function_and_no_parallel_calls(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Time?"}],
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=1.0,
        seed=3,
        max_tokens=250,
    )
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    _calls_valid(calls, [CLOCK])


def test_streamed_tool_calls_assemble_in_the_sdk(client):
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=250,
    )
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas, "no tool_calls delta"
    call = deltas[0].tool_calls[0]
    assert call.index == 0 and call.function.name == "get_weather"
    assert call.function.arguments == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


# A call whose shortest form is long: a 50-character string argument (issue 22).
NOTE = {
    "type": "function",
    "function": {"name": "save_note", "parameters": LONG_TEXT},
}


def _streamed_choice(client, **kw) -> tuple[str, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) of a streamed chat reply."""
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                calls.append((call.function.name, call.function.arguments))
            finish = choice.finish_reason or finish
    return content, calls, finish


def test_a_required_call_closes_within_a_small_budget_or_is_refused(client):
    # Issue 22: with max_tokens 40-70, 14 of 30 such replies had no call (the raw
    # "<tool_call>..." in content, nothing streamed). Each reply is now a valid call,
    # the same streamed or not, or, below the shortest call, a 400 before generating.
    made = refused = 0
    for max_tokens in (40, 55, 70, 75, 80, 100):
        for seed in range(3):
            kw = dict(
                model="tiny",
                messages=[{"role": "user", "content": "Take a note."}],
                tools=[NOTE],
                tool_choice="required",
                temperature=1.0,
                seed=seed,
                max_tokens=max_tokens,
            )
            try:
                whole = client.chat.completions.create(**kw).choices[0]
            except openai.BadRequestError as e:
                assert e.body["param"] == "max_tokens" and "shortest call" in e.body["message"]
                refused += 1
                continue
            assert whole.finish_reason == "tool_calls", (max_tokens, seed, whole)
            assert whole.message.content is None and whole.message.tool_calls
            _calls_valid(whole.message.tool_calls, [NOTE])
            calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
            assert _streamed_choice(client, **kw) == ("", calls, "tool_calls")
            made += 1
    assert made and refused  # budgets on both sides of the shortest call were tried


@pytest.mark.parametrize(
    ("field", "choice", "stream"),
    [
        ("max_tokens", "required", False),
        ("max_completion_tokens", {"type": "function", "function": {"name": "save_note"}}, True),
    ],
)
def test_a_budget_too_small_for_a_required_call_is_a_400(server, field, choice, stream):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Take a note."}],
        "tools": [NOTE],
        "tool_choice": choice,
        field: 30,
        "stream": stream,
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field
    assert "requires a call" in error["message"] and "only 30 tokens" in error["message"]
    # "auto" may answer in text: nothing to refuse.
    body = {**body, "tool_choice": "auto", "stream": False}
    assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 200


def test_a_call_cut_short_is_never_markup_in_the_content(client):
    # A stop string inside the call's markup ends the reply before the call is whole:
    # no call then, and the markup is not passed off as the answer (streamed or not).
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        stop=["arguments"],
        seed=0,
        max_tokens=100,
    )
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "stop"
    assert whole.message.content is None and not whole.message.tool_calls
    assert _streamed_choice(client, **kw) == ("", [], "stop")


def test_auto_lets_the_model_answer_or_call(client):
    seen = set()
    for seed in range(6):
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER],
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        choice = r.choices[0]
        if choice.message.tool_calls:
            _calls_valid(choice.message.tool_calls, [WEATHER])
            assert choice.finish_reason == "tool_calls"
            seen.add("call")
        else:
            assert "<tool_call>" not in (choice.message.content or "")[:11]
            seen.add("text")
    assert "text" in seen  # a random model mostly writes text


def _tool_history(arguments: str, result: str) -> list[dict]:
    """A user question, the assistant's get_weather call with ``arguments``, its result."""
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": arguments}
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
    ]


def test_a_tool_result_in_the_history_is_accepted(client, server, tiny):
    history = _tool_history('{"city": "Paris", "unit": "c"}', "21 C, sunny")
    r = client.chat.completions.create(
        model="tiny", messages=history, tools=[WEATHER], max_tokens=10
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    ids = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": history}).json()
    assert ids["count"] > 0
    # The call and its result reach the model as text.
    rendered = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": history, "max_tokens": 1, "tools": [WEATHER]},
    ).json()
    assert rendered["usage"]["prompt_tokens"] > len(tiny.tokenizer.encode("21 C, sunny"))


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [WEATHER], "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_tool_settings_are_a_400_naming_them(server, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- fields we do not implement are never ignored in silence ---------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"functions": [WEATHER["function"]]}, "functions"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"n": 99}, "n"),
    ],
)
def test_unimplemented_fields_are_a_400_naming_them(server, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_image_parts_to_a_text_model_are_a_400(server):
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_bookkeeping_fields_are_accepted(server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "modalities": ["text"],
    }
    assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 200
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "best_of": 1, "user": "u"}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 200
    body["best_of"] = 3
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tool_template_server(tmp_path_factory):
    from transformers import AutoTokenizer

    path = make_tiny_llama(tmp_path_factory.mktemp("llama-tools"), positions=1024)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TOOL_TEMPLATE
    tok.save_pretrained(path)
    with ServerThread(create_app(load_model(str(path)), model_id="tiny")) as srv:
        yield srv


def test_a_template_that_knows_tools_renders_them(tool_template_server):
    srv = tool_template_server
    history = _tool_history('{"city": "Paris"}', "21 C")
    body = {"model": "tiny", "messages": history, "tools": [WEATHER, CLOCK]}
    ids = httpx.post(srv.url + "/tokenize", json=body).json()["tokens"]
    text = httpx.post(srv.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "TOOLS: get_weather get_time" in text
    assert 'CALL get_weather {"city": "Paris"}' in text
    assert "<|im_start|>tool\n21 C" in text
    assert "<tools>" not in text  # not our system-prompt rendering
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    # Seeded (issue 22: it failed now and then in a full run). Seed 31 once began a
    # second call with too few tokens left for it and ended cut short, with no call.
    r = client.chat.completions.create(
        model="tiny",
        messages=history,
        tools=[WEATHER],
        tool_choice="required",
        temperature=1.0,
        seed=31,
        max_tokens=200,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    _calls_valid(r.choices[0].message.tool_calls, [WEATHER])
    body = {**body, "max_tokens": 1}
    usage = httpx.post(srv.url + "/v1/chat/completions", json=body).json()["usage"]
    assert usage["prompt_tokens"] == len(ids)


# A string argument may hold "</tool_call>" (the grammar lets a string hold anything):
# SmolLM2 sampled one in about 1 of 100 seeds ({"city": "Paris'}}</tool_call> 10.7C..."),
# and the call came back as plain text with tool_choice "required".
TRICKY = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris\'}}</tool_call> '
    'x", "unit": "celsius"}}\n</tool_call>'
)


def test_a_call_whose_argument_holds_the_closing_tag_is_one_call():
    from chatforge.server.tools import parse_calls

    (call,) = parse_calls(TRICKY)
    assert call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert args == {"city": "Paris'}}</tool_call> x", "unit": "celsius"}
    two = parse_calls(TRICKY + "\n" + TRICKY)
    assert [c["function"]["arguments"] for c in two] == [call["function"]["arguments"]] * 2
    assert parse_calls(TRICKY[:-3]) is None  # cut short: not a call
    assert parse_calls(TRICKY + " and more") is None  # text after the calls: not calls


@pytest.mark.parametrize("size", [1, 3, 7])
def test_streamed_calls_are_released_when_they_close_not_before(size):
    from chatforge.server.tools import CallStream

    split = CallStream()
    text = TRICKY + "\n" + TRICKY
    released = []
    for i in range(0, len(text), size):
        out, calls = split.push(text[i : i + size])
        assert out == ""
        if calls:
            released.append((i + size, len(calls)))
    end = len(TRICKY)  # the first call closes with its last character, not at the inner tag
    assert released[0][0] >= end and released[0][0] - size < end
    assert sum(n for _, n in released) == 2 and released[-1][0] >= len(text)
