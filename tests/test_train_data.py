"""Conversation JSONL -> training ids and labels, on the real tokenizer.

Expected ids are built by hand from sentencepiece, as the official build_single_message does:
[gMASK] sop, then per message <|role|> encode(metadata + "\\n") encode(content), then </s>.
"""

import json

import pytest
from sentencepiece import SentencePieceProcessor

from glmkit.train import DataError, load_conversations

GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION, EOS = 64790, 64792, 64794, 64795, 64796, 64797, 2
IGNORE = -100
PREAMBLE = "Answer the following questions as best as you can. You have access to the following tools:"
TOOLS = [{"name": "get_weather", "description": "查询城市天气 (weather of a city)",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CALL = "```python\ntool_call(city='北京')\n```"
OBSERVED = '{"city": "北京", "temperature": 22}'
ANSWER = "北京现在 22 度，晴。It is 22 °C in Beijing."


@pytest.fixture(scope="module")
def sp(tokenizer_path) -> SentencePieceProcessor:
    return SentencePieceProcessor(model_file=str(tokenizer_path))


def write_jsonl(path, records) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def turn(sp, role_id: int, content: str, metadata: str = "") -> list[int]:
    return [role_id] + sp.encode(metadata + "\n") + sp.encode(content)


def labelled(ids: list[int], learned: bool) -> list[int]:
    return list(ids) if learned else [IGNORE] * len(ids)


def test_golden_ids_and_labels_with_system_tools_call_and_observation(tok, sp, tmp_path):
    record = {"tools": TOOLS, "conversations": [
        {"role": "system", "content": "You are a weather assistant."},
        {"role": "user", "content": "北京天气如何?"},
        {"role": "assistant", "metadata": "get_weather", "content": CALL},
        {"role": "tool", "content": OBSERVED},  # `tool` is observation
        {"role": "assistant", "content": ANSWER},
    ]}
    examples, report = load_conversations(write_jsonl(tmp_path / "d.jsonl", [record]), tok, max_length=1024)

    tools_text = PREAMBLE + "\n" + json.dumps(TOOLS, indent=4, ensure_ascii=False)
    call, answer = sp.encode("get_weather\n") + sp.encode(CALL), sp.encode("\n") + sp.encode(ANSWER)
    prompt = ([GMASK, SOP] + turn(sp, SYSTEM, tools_text) + turn(sp, SYSTEM, "You are a weather assistant.")
              + turn(sp, USER, "北京天气如何?") + [ASSISTANT])
    observation = turn(sp, OBSERVATION, OBSERVED)
    expected_ids = prompt + call + observation + [ASSISTANT] + answer + [EOS]
    # Learned: each assistant turn's metadata and content, and the token that ends it (the
    # <|observation|> after the call, the final </s>); never a role token of its own, never a prompt.
    expected_labels = (labelled(prompt, False) + labelled(call, True) + [OBSERVATION]
                       + labelled(observation[1:], False) + [IGNORE] + labelled(answer, True) + [EOS])

    assert examples == [{"input_ids": expected_ids, "labels": expected_labels}]
    assert report.examples == 1 and report.lines == 1 and not report.bad_lines
    assert report.tokens == len(expected_ids)
    assert report.learned_tokens == sum(label != IGNORE for label in expected_labels)


def test_loss_flag_overrides_the_role_default_and_interpreter_turns_train(tok, sp, tmp_path):
    code = "```python\nprint(2 ** 10)\n```"
    record = {"conversations": [
        {"role": "user", "content": "2 的 10 次方?"},
        {"role": "assistant", "content": "Let me compute.", "loss": False},
        {"role": "assistant", "metadata": "interpreter", "content": code},
        {"role": "observation", "content": "```result\n1024\n```"},
        {"role": "assistant", "content": "1024"},
    ]}
    (example,), _ = load_conversations(write_jsonl(tmp_path / "d.jsonl", [record]), tok, max_length=1024)
    head = [GMASK, SOP] + turn(sp, USER, "2 的 10 次方?") + [ASSISTANT]
    skipped = sp.encode("\n") + sp.encode("Let me compute.")
    interpreter = sp.encode("interpreter\n") + sp.encode(code)
    result = turn(sp, OBSERVATION, "```result\n1024\n```")
    last = sp.encode("\n") + sp.encode("1024")
    assert example["input_ids"] == head + skipped + [ASSISTANT] + interpreter + result + [ASSISTANT] + last + [EOS]
    assert example["labels"] == (labelled(head + skipped, False) + [IGNORE] + labelled(interpreter, True)
                                 + [OBSERVATION] + labelled(result[1:], False) + [IGNORE] + last + [EOS])


def test_the_official_demos_combined_tool_message_is_a_call_then_its_observation(tok, tmp_path):
    combined = {"tools": TOOLS, "conversations": [
        {"role": "user", "content": "北京天气如何?"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"},
         "observation": {"city": "北京", "temperature": 22}},
        {"role": "assistant", "content": ANSWER}]}
    explicit = {"tools": TOOLS, "conversations": [
        {"role": "user", "content": "北京天气如何?"},
        {"role": "assistant", "metadata": "get_weather", "content": CALL},
        {"role": "observation", "content": OBSERVED},
        {"role": "assistant", "content": ANSWER}]}
    examples, _ = load_conversations(write_jsonl(tmp_path / "d.jsonl", [combined, explicit]), tok, max_length=1024)
    assert examples[0] == examples[1]


def test_bad_lines_are_an_error_naming_each_line(tok, tmp_path):
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [
        good,
        "{not json",
        {"messages": []},
        "",  # blank lines are not data
        {"conversations": [{"role": "robot", "content": "beep"}]},
        {"tools": TOOLS, "conversations": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
        good,
    ])
    with pytest.raises(DataError) as caught:
        load_conversations(path, tok, max_length=64)
    message = str(caught.value)
    assert "4 bad line(s) out of 6" in message
    assert "line 2: not valid JSON" in message
    assert "line 3: no 'conversations' key" in message
    assert "line 5: conversations[0]: unknown role 'robot'" in message
    # the tools' system message comes first, yet the error points into the record as written
    assert "line 6: conversations[1]: missing 'content'" in message
    assert "--skip-bad-lines" in message


def test_skipped_bad_lines_are_still_reported(tok, tmp_path):
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, "[1, 2]", good])
    examples, report = load_conversations(path, tok, max_length=64, skip_bad_lines=True)
    assert len(examples) == 2
    assert report.bad_lines == [(2, "expected a JSON object with 'conversations', got list")]
    assert "1 bad lines skipped" in report.summary()


def test_overlong_examples_are_truncated_or_dropped_and_counted(tok, tmp_path):
    short = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 50}]}
    prompt_only = {"conversations": [{"role": "user", "content": "a long question " * 20},
                                     {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [short, long, prompt_only])
    (full_long,), _ = load_conversations(write_jsonl(tmp_path / "l.jsonl", [long]), tok, max_length=1024)

    truncated, report = load_conversations(path, tok, max_length=20, overlong="truncate")
    examples = truncated
    assert len(examples[0]["input_ids"]) < 20 and len(examples[1]["input_ids"]) == 20
    assert examples[1]["input_ids"] == full_long["input_ids"][:20]  # the head is kept
    assert examples[1]["labels"] == full_long["labels"][:20]
    assert (report.examples, report.truncated, report.dropped_overlong, report.dropped_no_loss) == (2, 1, 0, 1)
    assert "1 truncated to 20 tokens" in report.summary()
    assert "1 dropped with no token to learn within 20 tokens" in report.summary()

    examples, report = load_conversations(path, tok, max_length=20, overlong="drop")
    assert examples == truncated[:1]  # the short one
    assert (report.examples, report.truncated, report.dropped_overlong) == (1, 0, 2)
    assert "2 dropped as longer than 20 tokens" in report.summary()


def test_nothing_left_to_train_on_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DataError, match="no example to train on: .*1 dropped with no token to learn"):
        load_conversations(path, tok, max_length=64)
    with pytest.raises(ValueError, match="overlong='cut'"):
        load_conversations(path, tok, max_length=64, overlong="cut")
