"""Load: 64 concurrent streaming clients on loopback all get whole, well-formed streams, and the
server answers afterwards. Runs on the backend `glmkit serve` picks by default."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from live_server import LiveServer
from tiny import tiny_model

from glmkit.server import create_app

CLIENTS = 64
MAX_TOKENS = 16


async def one_stream(client: httpx.AsyncClient, i: int) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"第{i}个问题: hello {i}?"}],
            "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = [line async for line in response.aiter_lines()]
    events = [line for line in raw if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length") and chunks[-2]["choices"][0]["finish_reason"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and 1 <= usage["completion_tokens"] <= MAX_TOKENS
    assert (finishes[0] == "length") == (usage["completion_tokens"] == MAX_TOKENS)
    return {"text": "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1]), "usage": usage,
            "finish": finishes[0]}


@pytest.mark.slow
def test_64_concurrent_streams_all_complete_and_the_server_still_answers(tok):
    model = tiny_model(seed=5)
    with LiveServer(create_app((model, tok), model_name="tiny")) as live:
        async def main():
            limits = httpx.Limits(max_connections=CLIENTS + 4)
            async with httpx.AsyncClient(base_url=live.url, limits=limits, timeout=120) as client:
                results = await asyncio.gather(*(one_stream(client, i) for i in range(CLIENTS)))
                after = await client.post("/v1/chat/completions", json={
                    "model": "tiny", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4})
                health = (await client.get("/health")).json()
                metrics = (await client.get("/metrics")).text
            return results, after, health, metrics

        started = time.monotonic()
        results, after, health, metrics = asyncio.run(asyncio.wait_for(main(), timeout=240))
        elapsed = time.monotonic() - started
    assert len(results) == CLIENTS  # no request lost
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1
    assert health["running"] == 0 and health["waiting"] == 0
    counted = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line and not line.startswith("#")}
    assert counted['glmkit_requests_total{endpoint="/v1/chat/completions",status="200"}'] == CLIENTS + 1
    assert counted["glmkit_time_to_first_token_seconds_count"] == CLIENTS + 1
    assert counted["glmkit_requests_aborted_total"] == 0 and counted["glmkit_requests_pending"] == 0
    print(f"\n{CLIENTS} streams of up to {MAX_TOKENS} tokens in {elapsed:.1f} s")
