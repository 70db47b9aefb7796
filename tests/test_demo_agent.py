"""The agent loop with the bundled glmkit-demo model, greedy: real tool and interpreter round trips
run by the model itself (the scripted-model tests in test_agent.py cover every branch)."""

from __future__ import annotations

import pytest

import glmkit
from glmkit.agent import Agent, Tool
from glmkit.demo import model_dir
from glmkit.demo.tools import INTERPRETER_PROMPT, TOOLS, tool_schema, weather

GREEDY = {"temperature": 0.0, "max_new_tokens": 96}


@pytest.fixture(scope="module")
def demo():
    return glmkit.load(model_dir(), device="cpu")


def test_weather_round_trip(demo):
    with Agent(demo, tools=TOOLS, sampling=GREEDY) as agent:
        result = agent.run("What's the weather in Beijing?")
    calls = [e for e in result.trace if e.kind == "tool_call"]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Beijing"})]
    observed = weather("Beijing")
    assert result.stop_reason == "answer" and str(observed["temperature"]) in result.answer


def test_calculator_round_trip_in_chinese(demo):
    with Agent(demo, tools=TOOLS, sampling=GREEDY) as agent:
        result = agent.run("帮我算一下37*12")
    calls = [e for e in result.trace if e.kind == "tool_call"]
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "37 * 12"})]
    assert [e.value for e in result.trace if e.kind == "tool_result"] == [{"result": 444}]
    assert result.stop_reason == "answer" and "444" in result.answer


def test_a_tool_that_raises_becomes_an_observation_and_the_model_goes_on(demo):
    def broken(city: str):
        raise ConnectionError("the weather service is down")

    schema = tool_schema("get_weather")
    tools = [Tool(schema["name"], schema["description"], schema["parameters"], broken)]
    with Agent(demo, tools=tools, sampling=GREEDY) as agent:
        result = agent.run("What's the weather in Paris?")
    results = [e for e in result.trace if e.kind == "tool_result"]
    assert results and results[0].error is not None and "the weather service is down" in results[0].text
    assert result.rounds >= 2  # the model replied to the failure instead of the loop crashing


def test_the_round_limit(demo):
    with Agent(demo, tools=TOOLS, max_rounds=1, sampling=GREEDY) as agent:
        result = agent.run("What's the weather in Tokyo?")
    assert result.stop_reason == "max_rounds" and result.rounds == 1
    assert result.answer == {"name": "get_weather", "parameters": {"city": "Tokyo"}}
    assert not [e for e in result.trace if e.kind == "tool_result"]  # the last call is reported, not run


@pytest.mark.slow
def test_interpreter_round_trip(demo):
    with Agent(demo, code_interpreter=True, interpreter_prompt=INTERPRETER_PROMPT, sampling=GREEDY) as agent:
        result = agent.run("Use Python to compute 2 to the power of 20.")
    codes = [e for e in result.trace if e.kind == "code"]
    outputs = [e for e in result.trace if e.kind == "code_output"]
    assert codes and outputs and outputs[0].error is None
    assert "1048576" in outputs[0].text and "1048576" in result.answer
