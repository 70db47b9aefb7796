"""`glmkit chat --tools FILE` and `--code-interpreter`: the agent loop in the terminal, with a
tiny checkpoint whose replies are scripted."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from test_agent import scripted_generate
from tiny import make_tiny_checkpoint

import glmkit.chat
from glmkit.cli import main

TOOLS_PY = '''
from typing import Annotated
from glmkit.agent import tool

@tool
def get_weather(city: Annotated[str, "the city"]) -> dict:
    """The current weather of a city."""
    return {"city": city, "weather": "sunny"}
'''


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-agent-cli"))


def chat(monkeypatch, capsys, args: list[str], stdin: str, replies: list[str]) -> tuple[int, str, str]:
    generate = scripted_generate(replies)
    monkeypatch.setattr(glmkit.chat, "generate_stream", generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", *args])
    out, err = capsys.readouterr()
    assert generate.left == [], "the model was asked for fewer replies than scripted"
    return code, out, err


def test_chat_with_tools_runs_the_calls(checkpoint, tmp_path, monkeypatch, capsys):
    tools = tmp_path / "my_tools.py"
    tools.write_text(TOOLS_PY)
    code, out, err = chat(monkeypatch, capsys, ["--model", str(checkpoint), "--tools", str(tools)],
                          "Weather in Paris?\n",
                          ["\nLet me look.<|assistant|>get_weather\n```python\ntool_call(city='Paris')\n```",
                           "\nIt is sunny in Paris."])
    assert code == 0, err
    assert out == ('Let me look.\n'
                   '[tool call] get_weather(city="Paris")\n'
                   '[tool result] {"city": "Paris", "weather": "sunny"}\n'
                   'It is sunny in Paris.\n')


def test_chat_with_the_code_interpreter(checkpoint, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "files"
    workdir.mkdir()
    (workdir / "numbers.txt").write_text("6 7\n")
    code, out, err = chat(monkeypatch, capsys,
                          ["--model", str(checkpoint), "--code-interpreter", "--workdir", str(workdir)],
                          "Multiply the numbers in numbers.txt\n",
                          ["interpreter\n```python\na, b = map(int, open('numbers.txt').read().split())\nprint(a * b)\n```",
                           "\nThe product is 42."])
    assert code == 0, err
    assert out == ("[code interpreter]\na, b = map(int, open('numbers.txt').read().split())\nprint(a * b)\n"
                   "[result]\n42\n"
                   "The product is 42.\n")
    assert (workdir / "numbers.txt").exists()  # the user's folder is kept


def test_the_round_limit_is_reported(checkpoint, tmp_path, monkeypatch, capsys):
    tools = tmp_path / "my_tools.py"
    tools.write_text(TOOLS_PY)
    call = "get_weather\n```python\ntool_call(city='Paris')\n```"
    code, out, err = chat(monkeypatch, capsys, ["--model", str(checkpoint), "--tools", str(tools),
                                                "--max-rounds", "2"], "Weather?\n", [call, call])
    assert code == 0
    assert out.count("[tool call]") == 2 and out.count("[tool result]") == 1
    assert "stopped after 2 model replies without a final answer (--max-rounds)" in err


@pytest.mark.parametrize("args, message", [
    (["--tools", "missing.py"], "cannot load tools: no tools file at missing.py"),
    (["--workdir", "."], "--workdir is the code interpreter's folder"),
    (["--code-interpreter", "--code-timeout", "0"], "--code-timeout must be a positive number"),
    (["--tools", "x.py", "--max-rounds", "0"], "--max-rounds must be at least 1"),
])
def test_bad_agent_flags_fail_before_loading_the_model(args, message, capsys):
    code = main(["chat", "--model", "/nowhere/at/all", *args])
    assert code == 2
    assert message in capsys.readouterr().err
