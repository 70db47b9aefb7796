"""The `glmkit` command: chat over a pipe, generate, errors, help."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import make_tiny_checkpoint

import glmkit.chat
from glmkit.cli import main
from glmkit.commands.chat import format_tool_call
from glmkit.generate import Delta

REPO = Path(__file__).resolve().parents[1]
GREEDY = ["--temperature", "0", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-cli"))


def glmkit_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "glmkit.cli", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, cwd=REPO, timeout=120)


def run_in_process(monkeypatch, capsys, args: list[str], stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def halves(text: str) -> tuple[str, str]:
    return text[:len(text) // 2], text[len(text) // 2:]


def test_chat_over_a_pipe_honours_clear_and_stop(checkpoint):
    result = glmkit_cli("chat", "--model", str(checkpoint), *GREEDY, stdin="hello\nclear\nhello\nstop\nhello\n")
    assert result.returncode == 0, result.stderr
    assert "User:" not in result.stdout  # no prompts over a pipe
    first, second = halves(result.stdout)
    assert first == second and first.endswith("\n")  # same question, fresh history: the same reply; then stop


def test_chat_without_clear_keeps_the_history(checkpoint, monkeypatch, capsys):
    code, cleared, _ = run_in_process(monkeypatch, capsys, ["chat", "--model", str(checkpoint), *GREEDY],
                                      "hello\nclear\nhello\n")
    assert code == 0
    code, kept, _ = run_in_process(monkeypatch, capsys, ["chat", "--model", str(checkpoint), *GREEDY],
                                   "hello\nhello\n")  # end of input also exits 0
    assert code == 0
    assert halves(cleared)[0] == halves(kept)[0] or kept.startswith(halves(cleared)[0])
    assert kept != cleared  # the second reply saw the first exchange


def test_chat_prints_tool_calls_readably(checkpoint, monkeypatch, capsys):
    def fake(model, tokenizer, prompt_ids, params, skip_special_tokens=False):
        yield Delta("interpreter\n```python\nprint(1 + 1)\n```", 1)
        yield Delta("", None, "stop")

    monkeypatch.setattr(glmkit.chat, "generate_stream", fake)
    code, out, _ = run_in_process(monkeypatch, capsys, ["chat", "--model", str(checkpoint)], "compute 1+1\n")
    assert code == 0
    assert out == "[code interpreter]\nprint(1 + 1)\n"
    assert format_tool_call({"name": "get_weather", "parameters": {"location": "北京", "days": 2}}) == \
        '[tool call] get_weather(location="北京", days=2)'


def test_system_prompt_survives_clear(checkpoint, monkeypatch, capsys):
    seen = []

    def fake(model, tokenizer, prompt_ids, params, skip_special_tokens=False):
        seen.append(tokenizer.decode(prompt_ids))
        yield Delta("\nok", 1)
        yield Delta("", None, "stop")

    monkeypatch.setattr(glmkit.chat, "generate_stream", fake)
    code, out, _ = run_in_process(monkeypatch, capsys, ["chat", "--model", str(checkpoint), "--system", "Be brief."],
                                  "alpha\nclear\nbravo\n")
    assert code == 0 and out == "ok\nok\n"
    assert all("<|system|>" in p and "Be brief." in p for p in seen)
    assert "alpha" in seen[0] and "alpha" not in seen[1] and "bravo" in seen[1]


def test_generate_prints_a_completion(checkpoint, monkeypatch, capsys):
    code, out, _ = run_in_process(monkeypatch, capsys,
                                  ["generate", "--model", str(checkpoint), *GREEDY, "Once upon a time"])
    assert code == 0 and out.endswith("\n") and out.strip()
    code, again, _ = run_in_process(monkeypatch, capsys, ["generate", "--model", str(checkpoint), *GREEDY],
                                    "Once upon a time")  # no prompt argument: read from stdin
    assert code == 0 and again == out


def test_unavailable_device_is_a_one_line_error(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = ["generate", "--model", str(checkpoint), "--device", "cuda", "x"]
    code, _, err = run_in_process(monkeypatch, capsys, args)
    assert code == 2 and "no CUDA device" in err


def test_missing_model_is_a_one_line_error(tmp_path):
    result = glmkit_cli("chat", "--model", str(tmp_path / "no-such-model"), stdin="hello\n")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmkit: error: cannot load model") and "no-such-model" in lines[0]


def test_folder_without_a_checkpoint_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    code, _, err = run_in_process(monkeypatch, capsys, ["generate", "--model", str(tmp_path), "x"])
    assert code == 2 and "cannot load model" in err and len(err.strip().splitlines()) == 1


def test_bad_sampling_flag_is_reported_by_its_flag_name(checkpoint, monkeypatch, capsys):
    code, _, err = run_in_process(monkeypatch, capsys, ["chat", "--model", str(checkpoint), "--top-p", "1.5"])
    assert code == 2 and "--top-p" in err


def test_help(capsys):
    for args in (["--help"], ["chat", "--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--max-new-tokens" in out and "clear" in out and "THUDM/chatglm3-6b" in out
