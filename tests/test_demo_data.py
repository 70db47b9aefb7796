"""The demo model's synthetic data, its evaluation, and its build recipe end to end at a toy size."""

import contextlib
import io
import json
from collections import Counter

import pytest

from glmkit.chat_format import (
    extract_code,
    parse_reply,
    parse_tool_call,
    render_with_loss_mask,
)
from glmkit.demo import content, synth
from glmkit.demo.build import PRESETS, build, group_by_length, recipe_with
from glmkit.demo.evaluate import contains_number, evaluate, passes
from glmkit.train.data import IGNORE_INDEX, conversation_messages, load_conversations

N = 400


@pytest.fixture(scope="module")
def train_set():
    return synth.conversations(N, seed=0)


@pytest.fixture(scope="module")
def eval_set():
    return synth.conversations(60, seed=0, split="eval")


def checks(conversations, kind=None):
    return [(c, k) for c in conversations for k in c.checks if kind is None or k.kind == kind]


# -- the generator ------------------------------------------------------------------------------------


def test_same_seed_same_conversations():
    first = [c.record() for c in synth.conversations(50, seed=3)]
    assert first == [c.record() for c in synth.conversations(50, seed=3)]
    assert first != [c.record() for c in synth.conversations(50, seed=4)]
    assert first[:20] == [c.record() for c in synth.conversations(20, seed=3)]  # a prefix of the same stream


def test_every_conversation_renders_with_a_loss(tok, train_set, eval_set):
    for conversation in train_set + eval_set:
        messages, _ = conversation_messages(conversation.record())
        ids, mask = render_with_loss_mask(tok, messages)
        assert any(mask) and len(ids) < 1024


def test_records_load_as_training_examples(tok, train_set, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(c.record(), ensure_ascii=False) + "\n" for c in train_set), encoding="utf-8")
    examples, report = load_conversations(path, tok, max_length=1024)
    assert report.examples == N and not report.bad_lines and not report.truncated
    assert all(any(label != IGNORE_INDEX for label in e["labels"]) for e in examples)


def test_both_languages_and_every_kind_appear(train_set):
    assert set(Counter(c.language for c in train_set)) == {"en", "zh"}
    kinds = Counter((k.kind, k.task) for _, k in checks(train_set))
    for task in ("weather", "arithmetic", "convert", "interpreter"):
        assert kinds["call", task] > 10 and kinds["answer", task] > 10
    for task in ("weather", "arithmetic", "convert"):
        assert kinds["refusal", task] > 3
    texts = {m["content"] for c in train_set for m in c.messages if m["role"] == "user"}
    assert texts & set(content.GREETINGS["en"]) and texts & set(content.GREETINGS["zh"])
    assert texts & set(content.IDENTITY_QUESTIONS["en"]) and texts & set(content.IDENTITY_QUESTIONS["zh"])
    assert any(len([m for m in c.messages if m["role"] == "user"]) > 1 for c in train_set)  # follow-ups


def test_tool_calls_parse_back_to_what_was_meant(tok, train_set):
    for conversation, check in checks(train_set, "call"):
        message = conversation.messages[check.turn]
        assert message["role"] == "assistant" and message["metadata"] == check.expect["name"]
        if check.task == "interpreter":
            assert extract_code(message["content"]) == check.expect["content"]
        else:
            assert parse_tool_call(message["content"]) == check.expect["parameters"]
            assert check.expect["name"] in [t["name"] for t in conversation.tools]
        # The model's reply text, parsed as inference parses it, is the intended call.
        text = message["metadata"] + "\n" + message["content"]
        assert parse_reply(text, tools_declared=bool(conversation.tools)).response == check.expect


def test_tool_call_text_renders_as_chat_format_renders_a_call(tok):
    parameters = {"city": "Xi'an", "value": 3, "to_unit": "mi"}
    as_text = [{"role": "assistant", "metadata": "t", "content": synth.tool_call_text(parameters)}]
    as_dict = [{"role": "assistant", "content": {"name": "t", "parameters": parameters}}]
    assert render_with_loss_mask(tok, as_text) == render_with_loss_mask(tok, as_dict)


def test_answers_quote_their_observation(train_set):
    for conversation, check in checks(train_set, "answer"):
        observation, answer = conversation.messages[check.turn - 1], conversation.messages[check.turn]
        assert observation["role"] == "observation"
        assert contains_number(observation["content"], check.expect["value"])
        assert contains_number(answer["content"], check.expect["value"])
        assert len(check.expect["value"].replace("-", "").replace(".", "")) <= 10  # short enough to copy


def test_weather_answer_quotes_the_temperature(train_set):
    weather = [(c, k) for c, k in checks(train_set, "answer") if k.task == "weather"]
    for conversation, check in weather:
        observation = json.loads(conversation.messages[check.turn - 1]["content"])
        assert check.expect["value"] == str(observation["temperature"])
        assert f"{observation['temperature']}°C" in conversation.messages[check.turn]["content"]


def test_refusals_only_where_the_tool_was_not_declared(train_set):
    refusals = checks(train_set, "refusal")
    assert refusals
    for conversation, check in refusals:
        assert check.expect["tool"] not in [t["name"] for t in conversation.tools]
        reply = conversation.messages[check.turn]
        assert not reply.get("metadata") and check.expect["marker"] in reply["content"]
    for conversation, check in checks(train_set, "call"):
        if check.task != "interpreter":
            assert check.expect["name"] in [t["name"] for t in conversation.tools]


def test_interpreter_results_are_what_the_code_prints(train_set):
    for conversation, check in checks(train_set, "call"):
        if check.task != "interpreter":
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(check.expect["content"], {})  # noqa: S102 - the generator's own code templates, not model output
        observation = conversation.messages[check.turn + 1]["content"]
        assert observation == f"```result\n{printed.getvalue().strip()}\n```"


def test_held_out_prompts_never_appear_in_training(train_set, eval_set):
    assert not any(synth.is_held_out(text) for c in train_set for text in c.requests)
    train_texts = {text for c in train_set for text in c.requests}
    for conversation, check in checks(eval_set):
        assert check.held_out
        prompt = conversation.messages[check.turn - 1]
        if prompt["role"] == "user":
            assert synth.is_held_out(prompt["content"]) and prompt["content"] not in train_texts


def test_corpus_is_plain_text_in_both_languages(train_set):
    docs = synth.corpus_documents(train_set, seed=0)
    assert len(docs) > len(train_set)
    text = "\n".join(docs)
    assert "<|user|>" not in text and "[gMASK]" not in text
    assert "The capital of France is Paris." in text and "法国的首都是巴黎。" in text
    assert "tool_call(" in text and '"name": "get_weather"' in text and "You have access to the following tools" in text


# -- evaluation --------------------------------------------------------------------------------------


def test_contains_number_matches_whole_numbers():
    assert contains_number("It is 23°C.", "23") and contains_number("-5°C now", "-5")
    assert not contains_number("123 apples", "23") and not contains_number("23.5", "23")
    assert contains_number("about 3.11 mi.", "3.11") and not contains_number("3.115", "3.11")


class ScriptedModel:
    """Replies from the data itself (or wrongly, on request): scores what `evaluate` counts."""

    def __init__(self, held_out, wrong_kind=None):
        self.replies = {}
        for conversation in held_out:
            for check in conversation.checks:
                record = conversation.record() | {"conversations": conversation.messages[:check.turn]}
                key = json.dumps(conversation_messages(record)[0], ensure_ascii=False)
                self.replies[key] = (check, conversation.messages[check.turn])
        self.wrong_kind = wrong_kind

    def chat(self, query, history, role, **sampling):
        assert sampling["temperature"] == 0.0
        messages = [*history, {"role": role, "content": query}]
        check, message = self.replies[json.dumps(messages, ensure_ascii=False)]
        if check.kind == self.wrong_kind:
            return "I do not know.", []
        if message.get("metadata"):
            return parse_reply(message["metadata"] + "\n" + message["content"], True).response, []
        return message["content"], []


def test_evaluate_scores_each_check(eval_set):
    report = evaluate(ScriptedModel(eval_set), eval_set)
    assert report["rates"]["call"] == report["rates"]["answer"] == report["rates"]["refusal"] == 1.0
    assert report["meets_targets"]
    assert report["counts"]["call"]["total"] == len(checks(eval_set, "call"))
    report = evaluate(ScriptedModel(eval_set, wrong_kind="call"), eval_set)
    assert report["rates"]["call"] == 0.0 and report["rates"]["answer"] == 1.0 and not report["meets_targets"]
    assert report["failures"] and report["failures"][0]["kind"] == "call"


class CannedDemo:
    """Replies as a well-trained demo model would; `city` sets the city its weather call names."""

    def __init__(self, city=None):
        self.city = city

    def chat(self, query, history=None, role="user", **sampling):
        history = list(history or [])
        tools = [t["name"] for m in history if m["role"] == "system" for t in m.get("tools", [])]
        if role == "observation":
            return f"It is {json.loads(query)['temperature']}°C.", []
        if tools == ["get_weather"]:
            city = self.city or ("Beijing" if "Beijing" in query else "北京")
            call = {"name": "get_weather", "parameters": {"city": city}}
            reply = {"role": "assistant", "metadata": "get_weather",
                     "content": synth.tool_call_text(call["parameters"])}
            return call, history + [{"role": "user", "content": query}, reply]
        return ("Hello! I am glmkit-demo." if query == "Hello" else "你好！我是 glmkit-demo。"), []


def test_showcase_checks_the_readme_replies():
    from glmkit.demo.evaluate import showcase

    shown = showcase(CannedDemo())
    assert shown["ok"] and set(shown) == {"ok", "greeting/en", "greeting/zh", "weather_call/en", "weather_call/zh",
                                          "weather_answer/en", "weather_answer/zh"}
    shown = showcase(CannedDemo(city="Shanghai"))
    assert not shown["ok"] and not shown["weather_call/en"]["ok"] and shown["weather_answer/en"]["ok"]


def test_passes_requires_the_exact_call():
    check = synth.Check("call", "weather", 1, {"name": "get_weather", "parameters": {"city": "北京"}}, True)
    assert passes(check, {"name": "get_weather", "parameters": {"city": "北京"}})
    assert not passes(check, {"name": "get_weather", "parameters": {"city": "Beijing"}})
    assert not passes(check, "北京现在天气晴")


# -- the build ---------------------------------------------------------------------------------------


def test_group_by_length_keeps_every_record_and_pads_little():
    records = list(range(1000))
    lengths = [(i * 7919) % 600 + 50 for i in records]
    ordered = group_by_length(records, lengths, batch_size=8, seed=0)
    assert sorted(ordered) == records and ordered == group_by_length(records, lengths, 8, seed=0)
    batches = [ordered[i:i + 8] for i in range(0, 1000, 8)]
    padded = sum(8 * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)


def test_recipe_settings_are_typed_and_named():
    assert recipe_with(PRESETS["demo"], ["sft_steps=5", "sft_lr=0.5"]).sft_steps == 5
    with pytest.raises(ValueError, match="sft_step"):
        recipe_with(PRESETS["demo"], ["sft_step=5"])
    with pytest.raises(ValueError, match="not a int"):
        recipe_with(PRESETS["demo"], ["sft_steps=many"])


def test_demo_recipe_fits_the_size_bar():
    from glmkit.train.scratch import scratch_config

    recipe = PRESETS["demo"]
    config = scratch_config(recipe.vocab_size + 9, **recipe.model_fields())
    assert config.num_parameters() <= 10_000_000
    assert 2 * config.num_parameters() <= 25_000_000  # saved in bfloat16


@pytest.mark.slow
def test_toy_build_makes_a_model_glmkit_can_chat_with(tmp_path):
    import glmkit

    log = build(tmp_path, seed=0, recipe=PRESETS["toy"], progress=False)
    folder = tmp_path / "model"
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model", "demo.json"}
    assert set(log["stages"]) == {"data", "tokenizer", "shards", "init", "pretrain", "order", "sft", "model",
                                  "evaluate"}
    assert log["stages"]["sft"]["command"].startswith("glmkit finetune --model")
    model = glmkit.load(folder, device="cpu")
    assert model.tokenizer.num_pieces == PRESETS["toy"].vocab_size
    _, history = model.chat("Hello", temperature=0.0, max_new_tokens=4)
    assert history[0] == {"role": "user", "content": "Hello"} and len(history) == 2
    card = json.loads((folder / "demo.json").read_text(encoding="utf-8"))
    assert card["name"] == "glmkit-demo" and set(card["evaluation"]["rates"]) >= {"call", "answer"}
