"""The demo model's training data: seeded synthetic conversations in English and Chinese.

`conversations(n, seed, split)` draws `n` conversations from the tables of `glmkit.demo.content`:
greetings and self-introduction, short facts, arithmetic through a `calculator` tool, weather
through `get_weather`, unit conversion through `convert_units`, computation in the code
interpreter, follow-up questions, and refusals when the tool a question needs was not declared.
Each is a `Conversation`: a record in ChatGLM3's fine-tuning JSONL format
(`{"tools"?: [...], "conversations": [...]}`, read by `glmkit.train.data.load_conversations`) plus
the `Check`s an evaluation can make on it. `corpus_documents` turns conversations into raw text
for tokenizer training and pretraining.

Tool results are computed here (never by running the code the conversation shows), and every
answer quotes its observation, so the model learns to read results rather than invent them.

Held-out prompts: every request for a tool (and every follow-up) is a user text; a fixed hash puts
one in ten of all possible texts in the "eval" split. The "train" split never contains one of
them, and "eval" checks only exchanges whose text is held out, so the evaluation asks questions
the model has never seen verbatim. The same seed and split always give the same conversations.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glmkit.agent.observation import result_block
from glmkit.chat_format import INTERPRETER, TOOLS_PREAMBLE

from . import content as C
from .tools import convert_value, format_number, tool_schema

SPLITS = ("train", "eval")
HELD_OUT_SHARE = 10  # one in this many request texts is held out for evaluation
PLAIN_SYSTEM = {"en": "You are glmkit-demo, a helpful assistant.", "zh": "你是 glmkit-demo，一个乐于助人的助手。"}


@dataclass(frozen=True)
class Check:
    """Something an evaluation asks of the model at one assistant turn of a conversation.

    kind "call": the reply must be `expect` — `{"name", "parameters"}` for a tool, or
    `{"name": "interpreter", "content": code}`. kind "answer": a plain-text reply containing the
    number `expect["value"]`, taken from the observation before it. kind "refusal": the tool
    `expect["tool"]` was not declared: a plain-text reply that says `expect["marker"]` ("Sorry").
    """

    kind: str
    task: str  # weather, arithmetic, convert, interpreter
    turn: int  # index in `Conversation.messages` of the assistant message the model must write
    expect: dict[str, Any]
    held_out: bool  # the request text is in the eval split


@dataclass
class Conversation:
    language: str
    tools: list[dict[str, Any]]  # declared tools, [] if none
    messages: list[dict[str, Any]]  # the "conversations" list of the record
    checks: list[Check] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # user texts that ask for a tool

    def record(self) -> dict[str, Any]:
        """The ChatGLM3 fine-tuning JSONL record."""
        return ({"tools": self.tools} if self.tools else {}) | {"conversations": self.messages}


def is_held_out(text: str) -> bool:
    """Whether a request text belongs to the eval split (a fixed hash, the same for every seed)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % HELD_OUT_SHARE == 0


def conversations(n: int, seed: int, split: str = "train") -> list[Conversation]:
    """`n` conversations of `split`; the same arguments always give the same list.

    "train": conversations with no held-out request. "eval": conversations with at least one
    held-out request and at least one check on it; only checks on held-out requests are kept.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n={n} must not be negative")
    rng = random.Random(f"glmkit-demo/{split}/{seed}")
    out: list[Conversation] = []
    while len(out) < n:
        conversation = _Builder(rng).build()
        held = [is_held_out(t) for t in conversation.requests]
        if split == "train" and not any(held):
            out.append(conversation)
        elif split == "eval" and any(held):
            conversation.checks = [c for c in conversation.checks if c.held_out]
            if conversation.checks:
                out.append(conversation)
    return out


def tool_call_text(parameters: dict[str, Any]) -> str:
    """An assistant's tool-call content, as ChatGLM3 writes it: a fenced `tool_call(name=literal, ...)`."""
    args = ", ".join(f"{key}={value!r}" for key, value in parameters.items())
    return f"```python\ntool_call({args})\n```"


def copied_names() -> list[str]:
    """The names a reply copies from the question: cities and unit names, English and Chinese.

    The demo's tokenizer keeps each one a single piece wherever it appears, so that copying the
    city of "weather in London?" into `get_weather(city='London')` is one token's lookup.
    """
    names = [name for pair in C.CITIES for name in pair]
    names += [name for en, zh in C.UNITS.values() for name in (en, zh)]
    return list(dict.fromkeys(names))


def corpus_documents(drawn: list[Conversation], seed: int) -> list[str]:
    """Raw text for tokenizer training and pretraining: each conversation's tools and messages as
    plain text (metadata lines included, no role tokens), then the facts as short articles in both
    languages (one per language for every 50 conversations)."""
    docs = [_transcript(c) for c in drawn]
    rng = random.Random(f"glmkit-demo/corpus/{seed}")
    for language in C.LANGUAGES:
        facts = _fact_sentences(language)
        for _ in range(max(1, len(drawn) // 50)):
            rng.shuffle(facts)
            docs.append(("\n" if language == "en" else "").join(facts[:8]))
    return docs


def _transcript(conversation: Conversation) -> str:
    lines = []
    if conversation.tools:  # the text of the system message that announces them
        lines += [TOOLS_PREAMBLE, json.dumps(conversation.tools, indent=4, ensure_ascii=False)]
    for m in conversation.messages:
        lines += ([m["metadata"]] if m.get("metadata") else []) + [m["content"]]
    return "\n".join(lines)


def _fact_sentences(language: str) -> list[str]:
    sentences = [C.CAPITAL_ANSWERS[language].format(**_capital(row, language)) for row in C.CAPITALS]
    sentences += [fact[1] if language == "en" else fact[3] for fact in C.FACTS]
    return sentences


def _capital(row: tuple[str, str, str, str], language: str) -> dict[str, str]:
    country, capital = row[:2] if language == "en" else row[2:]
    return {"country": country, "capital": capital}


# -- one conversation ---------------------------------------------------------------------------------

class _Builder:
    """Draws one conversation: a recipe, the tools it declares, then its exchanges in order."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.lang = rng.choice(C.LANGUAGES)
        self.messages: list[dict[str, Any]] = []
        self.checks: list[Check] = []
        self.requests: list[str] = []
        self.declared: list[str] = []

    def pick(self, options):
        return self.rng.choice(options)

    def build(self) -> Conversation:
        recipes: list[tuple[float, Callable[[], None]]] = [
            (0.20, self._chat), (0.16, self._weather_recipe), (0.14, self._arithmetic_recipe),
            (0.11, self._convert_recipe), (0.08, self._two_tools), (0.17, self._interpreter_recipe),
            (0.14, self._refusal_recipe),
        ]
        weights, makers = zip(*recipes)
        self.rng.choices(makers, weights)[0]()
        tools = [tool_schema(name, self.pick(C.TOOL_DESCRIPTIONS[name])) for name in self.declared]
        return Conversation(self.lang, tools, self.messages, self.checks, self.requests)

    # ---- recipes ----
    def _chat(self) -> None:
        if self.rng.random() < 0.35:
            self._declare([], extra=self.rng.randint(1, 3))
        elif self.rng.random() < 0.3:
            self.messages.append({"role": "system", "content": PLAIN_SYSTEM[self.lang]})
        exchanges = [self._greeting, self._identity, self._fact, self._fact]
        for _ in range(self.rng.choice([1, 1, 2, 3])):
            self.pick(exchanges)()
        if self.rng.random() < 0.2:
            self._thanks()

    def _weather_recipe(self) -> None:
        self._declare(["get_weather"])
        self._maybe_greet()
        city = self._weather(C.WEATHER_QUESTIONS)
        if self.rng.random() < 0.35:
            self._weather(C.WEATHER_FOLLOW_UPS, exclude=city)
        self._maybe_thank()

    def _arithmetic_recipe(self) -> None:
        self._declare(["calculator"])
        self._maybe_greet()
        result = self._arithmetic()
        if self.rng.random() < 0.35:
            self._arithmetic(previous=result)
        self._maybe_thank()

    def _convert_recipe(self) -> None:
        self._declare(["convert_units"])
        self._maybe_greet()
        self._convert()
        if self.rng.random() < 0.25:
            self._convert()
        self._maybe_thank()

    def _two_tools(self) -> None:
        first, second = self.rng.sample([self._weather_any, self._arithmetic, self._convert], 2)
        self._declare(["get_weather", "calculator", "convert_units"], extra=self.rng.randint(0, 1))
        first()
        second()

    def _interpreter_recipe(self) -> None:
        self.messages.append({"role": "system", "content": C.INTERPRETER_SYSTEM[self.lang]})
        self._maybe_greet()
        for _ in range(self.rng.choice([1, 1, 1, 2])):
            self._interpreter()
        self._maybe_thank()

    def _refusal_recipe(self) -> None:
        tool = self.pick(C.TASK_TOOLS)
        others = [t for t in C.TASK_TOOLS if t != tool]
        self._declare(self.rng.sample(others, self.rng.randint(0, 2)), extra=self.rng.randint(0, 2), exclude=tool)
        self._refusal(tool)
        usable = [t for t in self.declared if t in C.TASK_TOOLS]
        if usable and self.rng.random() < 0.4:
            {"get_weather": self._weather_any, "calculator": self._arithmetic,
             "convert_units": self._convert}[self.pick(usable)]()

    # ---- declaring tools ----
    def _declare(self, needed: list[str], extra: int | None = None, exclude: str | None = None) -> None:
        """Declare `needed` plus `extra` others (default 0, 1 or 2, fewer more often), in a random order."""
        extra = self.rng.choices([0, 1, 2], [5, 3, 2])[0] if extra is None else extra
        pool = [t for t in C.TASK_TOOLS + C.OTHER_TOOLS if t not in needed and t != exclude]
        names = list(needed) + self.rng.sample(pool, min(extra, len(pool)))
        self.rng.shuffle(names)
        self.declared = names

    # ---- exchanges ----
    def _say(self, role: str, text: str, **extra: Any) -> int:
        self.messages.append({"role": role, "content": text, **extra})
        return len(self.messages) - 1

    def _request(self, text: str) -> bool:
        self._say("user", text)
        self.requests.append(text)
        return is_held_out(text)

    def _call(self, task: str, name: str, parameters: dict[str, Any], held: bool) -> None:
        turn = self._say("assistant", tool_call_text(parameters), metadata=name)
        self.checks.append(Check("call", task, turn, {"name": name, "parameters": parameters}, held))

    def _observe_and_answer(self, task: str, observation: dict[str, Any] | str, value: str, answer: str,
                            held: bool) -> None:
        text = observation if isinstance(observation, str) else json.dumps(observation, ensure_ascii=False)
        self._say("observation", text)
        turn = self._say("assistant", answer)
        self.checks.append(Check("answer", task, turn, {"value": value}, held))

    def _maybe_greet(self) -> None:
        if self.rng.random() < 0.15:
            self._greeting()

    def _maybe_thank(self) -> None:
        if self.rng.random() < 0.15:
            self._thanks()

    def _greeting(self) -> None:
        self._say("user", self.pick(C.GREETINGS[self.lang]))
        self._say("assistant", self.pick(C.GREETING_REPLIES[self.lang]))

    def _identity(self) -> None:
        self._say("user", self.pick(C.IDENTITY_QUESTIONS[self.lang]))
        self._say("assistant", self.pick(C.IDENTITY_ANSWERS[self.lang]))

    def _thanks(self) -> None:
        self._say("user", self.pick(C.THANKS[self.lang]))
        self._say("assistant", self.pick(C.THANKS_REPLIES[self.lang]))

    def _fact(self) -> None:
        if self.rng.random() < 0.5:
            names = _capital(self.pick(C.CAPITALS), self.lang)
            self._say("user", self.pick(C.CAPITAL_QUESTIONS[self.lang]).format(**names))
            self._say("assistant", C.CAPITAL_ANSWERS[self.lang].format(**names))
        else:
            en_questions, en_answer, zh_questions, zh_answer = self.pick(C.FACTS)
            questions, answer = (en_questions, en_answer) if self.lang == "en" else (zh_questions, zh_answer)
            self._say("user", self.pick(questions))
            self._say("assistant", answer)

    def _city(self, exclude: str | None = None) -> str:
        names = [pair[0] if self.lang == "en" else pair[1] for pair in C.CITIES]
        return self.pick([c for c in names if c != exclude])

    def _weather_any(self) -> None:
        self._weather(C.WEATHER_QUESTIONS)

    def _weather(self, questions: dict[str, list[str]], exclude: str | None = None) -> str:
        city = self._city(exclude)
        held = self._request(self.pick(questions[self.lang]).format(city=city))
        self._call("weather", "get_weather", {"city": city}, held)
        i = self.rng.randrange(len(C.CONDITIONS))
        condition = C.CONDITIONS[i][0 if self.lang == "en" else 1]
        temperature = self.rng.randint(-15, 40)
        humidity = self.rng.randint(10, 95)
        observation = {"city": city, "temperature": temperature, "condition": condition, "humidity": humidity}
        answer = self.pick(C.WEATHER_ANSWERS[self.lang]).format(**observation)
        self._observe_and_answer("weather", observation, str(temperature), answer, held)
        return city

    def _arithmetic(self, previous: int | None = None) -> int:
        rng = self.rng
        if previous is None:
            op = self.pick(list(C.OPERATORS))
            a, b = self._operands(op)
            word = C.OPERATORS[op][0 if self.lang == "en" else 1]
            text = self.pick(C.ARITHMETIC_QUESTIONS[self.lang]).format(a=a, b=b, op=op, word=word)
        else:
            i = rng.randrange(len(C.ARITHMETIC_FOLLOW_UPS[self.lang]))
            op, a, b = C.FOLLOW_UP_OPERATORS[self.lang][i], previous, rng.randint(2, 9 if i < 2 else 99)
            text = C.ARITHMETIC_FOLLOW_UPS[self.lang][i].format(b=b)
        expression = f"{a} {op} {b}"
        result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        held = self._request(text)
        self._call("arithmetic", "calculator", {"expression": expression}, held)
        answer = self.pick(C.ARITHMETIC_ANSWERS[self.lang]).format(expression=expression, result=result)
        self._observe_and_answer("arithmetic", {"result": result}, str(result), answer, held)
        return result

    def _operands(self, op: str) -> tuple[int, int]:
        r = self.rng
        if op == "+":
            return r.randint(1, 999), r.randint(1, 999)
        if op == "-":
            return r.randint(1, 999), r.randint(1, 999)
        if op == "*":
            return r.randint(2, 99), r.randint(2, 99)
        b = r.randint(2, 20)
        return b * r.randint(2, 50), b  # exact division: the result is a whole number

    def _convert(self) -> None:
        first, second, factor = self.pick(C.UNIT_PAIRS)
        source, target = (first, second) if self.rng.random() < 0.5 else (second, first)
        value = self.rng.randint(-20, 100) if factor is None else self.rng.randint(1, 500)
        result = convert_value(value, source, target)
        names = {"value": value, "from_name": C.UNITS[source][self.lang == "zh"],
                 "to_name": C.UNITS[target][self.lang == "zh"]}
        held = self._request(self.pick(C.CONVERT_QUESTIONS[self.lang]).format(**names))
        self._call("convert", "convert_units", {"value": value, "from_unit": source, "to_unit": target}, held)
        shown = format_number(result)
        answer = self.pick(C.CONVERT_ANSWERS[self.lang]).format(**names, result=shown)
        observation = {"value": json.loads(shown), "unit": target}
        self._observe_and_answer("convert", observation, shown, answer, held)

    def _interpreter(self) -> None:
        task = self.pick(list(C.INTERPRETER_TASKS))
        en_questions, zh_questions, code, en_answer, zh_answer = C.INTERPRETER_TASKS[task]
        n, m, result = _interpreter_numbers(task, self.rng)
        questions, answer = (en_questions, en_answer) if self.lang == "en" else (zh_questions, zh_answer)
        held = self._request(self.pick(questions).format(n=n, m=m))
        code = code.format(n=n, m=m)
        turn = self._say("assistant", f"```python\n{code}\n```", metadata=INTERPRETER)
        self.checks.append(Check("call", "interpreter", turn, {"name": INTERPRETER, "content": code}, held))
        self._observe_and_answer("interpreter", result_block(str(result)), str(result),
                                 answer.format(n=n, m=m, result=result), held)

    def _refusal(self, tool: str) -> None:
        asks = {"get_weather": lambda: self.pick(C.WEATHER_QUESTIONS[self.lang]).format(city=self._city()),
                "calculator": lambda: self._arithmetic_question(),
                "convert_units": lambda: self._convert_question()}
        held = self._request(asks[tool]())
        turn = self._say("assistant", C.REFUSALS[tool][self.lang == "zh"])
        self.checks.append(Check("refusal", {"get_weather": "weather", "calculator": "arithmetic",
                                             "convert_units": "convert"}[tool], turn,
                                 {"tool": tool, "marker": C.REFUSAL_MARKERS[self.lang]}, held))

    def _arithmetic_question(self) -> str:
        op = self.pick(list(C.OPERATORS))
        a, b = self._operands(op)
        word = C.OPERATORS[op][0 if self.lang == "en" else 1]
        return self.pick(C.ARITHMETIC_QUESTIONS[self.lang]).format(a=a, b=b, op=op, word=word)

    def _convert_question(self) -> str:
        first, second, _ = self.pick(C.UNIT_PAIRS)
        names = {"value": self.rng.randint(1, 500), "from_name": C.UNITS[first][self.lang == "zh"],
                 "to_name": C.UNITS[second][self.lang == "zh"]}
        return self.pick(C.CONVERT_QUESTIONS[self.lang]).format(**names)


def _interpreter_numbers(task: str, rng: random.Random) -> tuple[int, int, int]:
    """(n, m, the result the task's code prints), computed here without running that code.

    The ranges keep results to at most 10 digits: a small model copies them into its answer.
    """
    if task == "sum_squares":
        n = rng.randint(5, 100)
        return n, 0, n * (n + 1) * (2 * n + 1) // 6
    if task == "factorial":
        n = rng.randint(5, 13)
        return n, 0, math.factorial(n)
    if task == "fibonacci":
        n = rng.randint(10, 45)
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return n, 0, a
    if task == "power":
        n = rng.randint(10, 33)
        return n, 0, 2 ** n
    if task == "gcd":
        g = rng.randint(2, 30)
        n, m = g * rng.randint(2, 40), g * rng.randint(2, 40)
        return n, m, math.gcd(n, m)
    if task == "sum_range":
        n = rng.randint(10, 1000)
        return n, 0, n * (n + 1) // 2
    raise ValueError(f"unknown interpreter task {task!r}")
