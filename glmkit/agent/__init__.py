"""Agents: tools the model calls, a sandboxed code interpreter, and the loop that runs them.

    tools.py         @tool, Tool, ToolRegistry: JSON schemas from type hints, checked and timed calls
    schema.py        type hints -> JSON schema; checking values against a schema
    docstrings.py    a docstring's description and parameter descriptions
    interpreter.py   InterpreterSession: one sandboxed Jupyter kernel per conversation
    kernel_launcher.py  what runs first inside that kernel: limits and the file guard
    observation.py   the truncation rule and the ```result fence of observations
    loop.py          Agent: reply -> tool call or code -> observation -> reply, streamed as events

The names below are imported on first use: tools need no extra packages, the interpreter needs
jupyter_client and ipykernel (`pip install 'glmkit[agent]'`).
"""

from importlib import import_module

_EXPORTS = {
    "tool": "glmkit.agent.tools", "Tool": "glmkit.agent.tools", "ToolRegistry": "glmkit.agent.tools",
    "ToolOutcome": "glmkit.agent.tools",
    "InterpreterSession": "glmkit.agent.interpreter", "SandboxLimits": "glmkit.agent.interpreter",
    "Execution": "glmkit.agent.interpreter", "Output": "glmkit.agent.interpreter",
    "InterpreterError": "glmkit.agent.interpreter",
    "truncate": "glmkit.agent.observation", "result_block": "glmkit.agent.observation",
    "Agent": "glmkit.agent.loop", "AgentResult": "glmkit.agent.loop", "AgentEvent": "glmkit.agent.loop",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'glmkit.agent' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
