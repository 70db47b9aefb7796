"""Pieces of OpenAI's response bodies that both endpoints write: ids, usage, SSE, disconnects.

A streamed body is `data: {json}\\n\\n` events ending with `data: [DONE]\\n\\n`; an error after the
stream has started can only be sent as one more event (`data: {"error": ...}`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

from .errors import APIError

DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` once it is done, however it ends (even unsent)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def event_stream(events: AsyncIterator[str], on_close: Callable[[], None] = lambda: None) -> StreamingResponse:
    """An SSE response of `events`; a failure mid-stream becomes an error event, then [DONE]."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as e:
            yield sse(e.body())
            yield DONE
        except Exception as e:  # noqa: BLE001 (the status line is sent already: report it in the stream)
            yield sse(APIError(500, f"internal error while generating: {type(e).__name__}: {e}").body())
            yield DONE
        finally:
            with anyio.CancelScope(shield=True):  # a disconnect cancels us; the generation must still stop
                await events.aclose()  # type: ignore[attr-defined]

    return _EventStream(body(), on_close)


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """The result of `work`, or None after cancelling it when the client disconnects first.

    For replies that are not streamed: the body has been read, so the next ASGI message the server
    sends is `http.disconnect`, and only when the client leaves.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    finally:
        watcher.cancel()
        task.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def logprob_entry(vocabulary, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
    """One token of a chat reply's `logprobs.content`."""
    def one(token: int, value: float) -> dict[str, Any]:
        return {"token": vocabulary.token_string(token), "logprob": value,
                "bytes": list(vocabulary.token_bytes(token))}
    return {**one(token_id, logprob), "top_logprobs": [one(t, v) for t, v in top]}


async def collect_choices(service, run, choices) -> bool:
    """Feed every (choice index, delta) of `run()` to its choice's `take`; the stream is closed on exit."""
    async with aclosing(run()) as deltas:
        async for index, delta in deltas:
            choices[index].take(service, delta)
    return True
