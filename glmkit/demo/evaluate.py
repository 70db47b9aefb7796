"""How well a model uses tools on held-out synthetic prompts: the demo model's quality bar.

    python -m glmkit.demo.evaluate --model DIR [--n 300] [--seed 0] [--out report.json]

For each `Check` of the held-out conversations (`glmkit.demo.synth`, split "eval"), the model
gets the conversation up to that turn through `ChatModel.chat` — the API users call — and replies
greedily:

- call: the reply must be exactly the expected tool call (name and arguments), or the expected
  code for the interpreter;
- answer: after the tool's observation, a plain-text reply that contains the observation's number
  (the temperature, the result) as a whole number token;
- refusal: asked for a tool that was not declared, a plain-text reply that says sorry, and no
  tool call.

The report gives the rate of each, overall and per task, and the first failures for a look;
`showcase` adds the few replies the README shows (greetings, the Beijing weather call and answer).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from glmkit.train.data import conversation_messages

from .content import NAME
from .synth import Check, Conversation, conversations
from .tools import tool_schema

MAX_NEW_TOKENS = 96  # the longest expected reply is well under this
SHOWN_FAILURES = 20
# Headline rates and the bar for them.
TARGETS = {"call": 0.95, "answer": 0.90}


def evaluate(model, held_out: Sequence[Conversation], max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, Any]:
    """Run every check of `held_out` on `model` (a glmkit ChatModel); return the report."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # key -> [passed, total]
    failures: list[dict[str, Any]] = []
    began = time.perf_counter()
    for conversation in held_out:
        for check in conversation.checks:
            response = _reply(model, conversation, check, max_new_tokens)
            passed = passes(check, response)
            for key in (check.kind, f"{check.kind}/{check.task}", f"{check.kind}/{conversation.language}"):
                counts[key][0] += passed
                counts[key][1] += 1
            if not passed and len(failures) < SHOWN_FAILURES:
                failures.append({"kind": check.kind, "task": check.task, "expected": check.expect,
                                 "got": response, "prompt": conversation.messages[check.turn - 1]["content"]})
    rates = {key: passed / total for key, (passed, total) in sorted(counts.items())}
    return {
        "rates": rates, "counts": {key: {"passed": p, "total": t} for key, (p, t) in sorted(counts.items())},
        "meets_targets": all(rates.get(kind, 0.0) >= bar for kind, bar in TARGETS.items()),
        "conversations": len(held_out), "seconds": round(time.perf_counter() - began, 1), "failures": failures,
    }


def showcase(model) -> dict[str, Any]:
    """The demo model's behaviour that the README shows, greedy: a greeting in each language, and
    with `get_weather` declared, a call for Beijing and an answer that quotes the observation's
    temperature. Returns each reply and whether it is right ("ok")."""
    from glmkit.chat_format import tools_system_message

    greedy = {"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS}
    out: dict[str, Any] = {}
    for language, query, hellos in (("en", "Hello", ("Hello", "Hi")), ("zh", "你好", ("你好",))):
        reply, _ = model.chat(query, **greedy)
        ok = isinstance(reply, str) and NAME in reply and any(hello in reply for hello in hellos)
        out[f"greeting/{language}"] = {"reply": reply, "ok": ok}
    tools = tools_system_message([tool_schema("get_weather")])
    for language, query, city in (("en", "What's the weather in Beijing?", "Beijing"),
                                  ("zh", "北京的天气怎么样？", "北京")):
        call, history = model.chat(query, tools, **greedy)
        expected = {"name": "get_weather", "parameters": {"city": city}}
        out[f"weather_call/{language}"] = {"reply": call, "ok": call == expected}
        observation = json.dumps({"city": city, "temperature": 23, "condition": "sunny" if language == "en" else "晴",
                                  "humidity": 40}, ensure_ascii=False)
        answer, _ = model.chat(observation, history, role="observation", **greedy)
        out[f"weather_answer/{language}"] = {"reply": answer,
                                             "ok": isinstance(answer, str) and contains_number(answer, "23")}
    out["ok"] = all(item["ok"] for item in out.values())
    return out


def passes(check: Check, response: str | dict[str, Any]) -> bool:
    """Whether the model's `response` (as `ChatModel.chat` returns it) satisfies `check`."""
    if check.kind == "call":
        return response == check.expect
    if check.kind == "answer":
        return isinstance(response, str) and contains_number(response, check.expect["value"])
    if check.kind == "refusal":
        return isinstance(response, str) and check.expect["marker"] in response
    raise ValueError(f"unknown check kind {check.kind!r}")


def contains_number(text: str, number: str) -> bool:
    """`number` appears in `text` as a whole number: "23" is in "23°C" but not in "123" or "2.35"."""
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d]|\.\d)", text) is not None


def _reply(model, conversation: Conversation, check: Check, max_new_tokens: int) -> str | dict[str, Any]:
    record = conversation.record() | {"conversations": conversation.messages[:check.turn]}
    messages, _ = conversation_messages(record)  # the tools message first, as training renders it
    *history, last = messages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a malformed tool call comes back as text: a failure, not a warning
        response, _ = model.chat(last["content"], history, role=last["role"], temperature=0.0,
                                 max_new_tokens=max_new_tokens)
    return response


def summary(report: dict[str, Any]) -> str:
    """The report's rates as lines for people."""
    lines = []
    for key, counts in report["counts"].items():
        lines.append(f"{key:24s} {counts['passed']:5d}/{counts['total']:<5d} {report['rates'][key]:7.1%}")
    for key, item in report.get("showcase", {}).items():
        if key != "ok":
            lines.append(f"showcase {key:15s} {'ok ' if item['ok'] else 'BAD'} {item['reply']!r}")
    verdict = "meets" if report["meets_targets"] else "MISSES"
    bars = ", ".join(f"{kind} >= {bar:.0%}" for kind, bar in TARGETS.items())
    lines.append(f"{verdict} the targets ({bars}); {report['conversations']} conversations in {report['seconds']}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmkit.demo.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the model folder to evaluate")
    parser.add_argument("--n", type=int, default=300, help="held-out conversations (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out conversations")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    from glmkit.chat import load

    model = load(args.model, device="cpu")
    report = evaluate(model, conversations(args.n, args.seed, "eval"))
    report["showcase"] = showcase(model)
    print(summary(report))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
    return 0 if report["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
