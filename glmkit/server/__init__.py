"""The OpenAI-compatible HTTP server and its chat page: `glmkit serve`, or `create_app(chat_model)`.

Needs the `serve` extra (FastAPI, uvicorn). The modules, from the outside in: `app` (routes, auth,
errors, body limit), `chat_completions` and `completions` (the endpoints), `agent_completions` (chat
requests that ask the server to run tools or code: the agent loop, on a thread of `agent_thread`),
`server_tools` (what the server offers to run, opt-in), `openai_tools` (OpenAI messages and tools <->
ChatGLM3), `schemas` (request validation), `service` (admission, sampling, running choices),
`backend` (what generates), `metrics`, and `static/` (the page).
"""

from __future__ import annotations


def create_app(*args, **kwargs):
    """See `glmkit.server.app.create_app`; imported on use so `import glmkit.server` needs no FastAPI."""
    from .app import create_app as create

    return create(*args, **kwargs)
