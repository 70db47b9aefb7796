"""What the server tests share: a live server on loopback, and a model that says what it is told.

`LiveServer(app)` runs uvicorn in a thread on 127.0.0.1 with a port the OS picks, for real HTTP
clients (the `openai` client, httpx, Chromium). `ScriptedModel` stands in for the model under the
real generator, sampler, detokenizer, backend and server: its logits make the scripted reply's next
token overwhelmingly likely, so a test decides what "the model" writes (a tool call, a long reply)
while every other layer runs as in production.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
import uvicorn

from glmkit.server.backend import SequentialBackend


class LiveServer:
    def __init__(self, app, startup_timeout: float = 60.0):
        self.app = app
        self.startup_timeout = startup_timeout
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> LiveServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class _Cursor:
    """The scripted model's 'KV cache': which reply this generation plays and how far it is."""

    def __init__(self):
        self.reply: list[int] | None = None
        self.position = 0


class ScriptedModel:
    """A stand-in model whose every generation writes a scripted reply, then `</s>`.

    reply_for(prompt_ids) -> the reply's token ids (the prompt is recorded in `prompts`).
    delay: seconds each forward call sleeps, to make a generation slow enough to watch or stop.
    """

    def __init__(self, tokenizer, reply_for: Callable[[list[int]], Sequence[int]], delay: float = 0.0,
                 seq_length: int = 2048):
        self.config = SimpleNamespace(seq_length=seq_length, padded_vocab_size=65024)
        self.device = torch.device("cpu")
        self.tokenizer = tokenizer
        self.reply_for = reply_for
        self.delay = delay
        self.prompts: list[list[int]] = []
        self.calls = 0

    def new_kv_cache(self, batch_size: int, capacity: int) -> _Cursor:
        return _Cursor()

    def __call__(self, input_ids: torch.Tensor, kv_cache: _Cursor, **kwargs) -> torch.Tensor:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if kv_cache.reply is None:
            prompt = input_ids[0].tolist()
            self.prompts.append(prompt)
            kv_cache.reply = list(self.reply_for(prompt))
        reply, i = kv_cache.reply, kv_cache.position
        kv_cache.position += 1
        token = reply[i] if i < len(reply) else self.tokenizer.eos_id
        logits = torch.full((1, 1, self.config.padded_vocab_size), -30.0)
        logits[0, 0, token] = 30.0
        return logits


def text_reply(tok, text: str) -> list[int]:
    """The ids ChatGLM3 writes for a plain answer: an empty metadata line, then the text."""
    return tok.encode("\n") + tok.encode(text)


def tool_call_reply(tok, name: str, arguments: str, metadata: bool = True) -> list[int]:
    """The ids ChatGLM3 writes to call a tool (metadata line = its name), ending with `<|observation|>`.
    Without `metadata`, only the part after a prefilled name line."""
    body = tok.encode(f"```python\ntool_call({arguments})\n```") + [tok.token_id("<|observation|>")]
    return (tok.encode(name + "\n") if metadata else []) + body


def code_reply(tok, code: str) -> list[int]:
    """The ids ChatGLM3 writes to run code: metadata `interpreter`, a fenced block, `<|observation|>`."""
    return tok.encode("interpreter\n") + tok.encode(f"```python\n{code}\n```") + [tok.token_id("<|observation|>")]


def scripted_backend(tok, reply_for, delay: float = 0.0) -> tuple[ScriptedModel, SequentialBackend]:
    model = ScriptedModel(tok, reply_for, delay)
    return model, SequentialBackend(model, tok)
