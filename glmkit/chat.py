"""The Python facade: `load()` a model, then `chat()` / `stream_chat()` like the official ChatGLM3 API.

    import glmkit.chat
    model = glmkit.chat.load("THUDM/chatglm3-6b")
    response, history = model.chat("你好")
    for response, history in model.stream_chat("再说一遍", history):
        ...

Differences from the official API, on purpose: the tokenizer lives inside the ChatModel (no
`tokenizer` argument); the caller's `history` list is never modified; an over-long conversation
raises a clear error (or, with `truncate="drop_oldest"`, drops whole old exchanges and warns)
instead of being cut silently; a malformed tool call from the model does not crash the call.

This module speaks messages; token ids stay below it, in `chat_format` and `generate`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .chat_format import ASSISTANT_TOKEN, ToolCallError, parse_reply, render_messages
from .config import ModelConfig
from .generate import check_context, generate_stream
from .packed import pack_linears
from .sampling import SamplingParams

# The official chat()/stream_chat() defaults: do_sample=True, temperature=0.8, top_p=0.8.
CHAT_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_p": 0.8}
TRUNCATE_MODES = ("error", "drop_oldest")
# Below this many parameters a model runs in float32 on a CPU by default (small, and fp32 is exact).
FLOAT32_CPU_MAX_PARAMETERS = 1_000_000_000

Response = str | dict[str, Any]
History = list[dict[str, Any]]


def load(name_or_path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
         prefix: str | Path | None = None, adapter: str | Path | None = None, quantize=None,
         threads: int | None = None) -> ChatModel:
    """Load a checkpoint (local folder or Hub id) and its tokenizer, ready to chat.

    device None: CUDA when available, else the CPU. dtype None: float32 on a CPU for models under
    1e9 parameters, else bfloat16 (always bfloat16 for quantized weights, what their kernels take).
    prefix: a P-Tuning v2 checkpoint folder to apply. adapter: a LoRA adapter folder (glmkit.lora, PEFT
    layout), merged into the weights. quantize: "int8", "int4" or a glmkit.quant.QuantConfig, to
    quantize a float checkpoint while loading it (glmkit.quant; a quantized checkpoint needs none).
    threads: CPU threads for the matrix products (default: torch's, one per core).
    """
    from .loader import load_model, resolve_model_dir
    from .tokenizer import load_tokenizer

    model_dir = Path(resolve_model_dir(name_or_path))
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} must be a positive integer")
        torch.set_num_threads(threads)
    config = ModelConfig.from_json(model_dir / "config.json")
    if dtype is None:
        from .quant.checkpoint import CONFIG_KEY

        quantized = quantize is not None or CONFIG_KEY in config.extra
        dtype = torch.bfloat16 if quantized else default_dtype(config, device)
    tokenizer = load_tokenizer(model_dir)
    # An adapter merges into float weights: then the model is quantized after the merge.
    model = load_model(model_dir, dtype=dtype, device=device, prefix=prefix,
                       quantize=quantize if adapter is None else None)
    if adapter is not None:
        from .lora import load_adapter, merge_lora

        model = merge_lora(load_adapter(model, adapter))  # merged: inference runs the plain model
        if quantize is not None:
            from .quant import as_quant_config, quantize_model

            model = quantize_model(model, as_quant_config(quantize))
    if model.dtype == torch.bfloat16 and device.type == "cpu":
        pack_linears(model)  # the CPU fast path for bf16 weights: inference only, hence here, not in the loader
    return ChatModel(model, tokenizer)


def default_dtype(config: ModelConfig, device: torch.device | str) -> torch.dtype:
    small = config.num_parameters() < FLOAT32_CPU_MAX_PARAMETERS
    return torch.float32 if torch.device(device).type == "cpu" and small else torch.bfloat16


def sampling_params(defaults: Mapping[str, Any] | None = None, prompt_tokens: int | None = None,
                    **kwargs: Any) -> SamplingParams:
    """SamplingParams from keyword arguments, with the official ones understood too.

    `do_sample=False` means greedy (temperature 0). `max_length` is the official total length,
    prompt included (`prompt_tokens`); it becomes max_new_tokens. Unknown names raise TypeError.
    """
    kwargs = {**(defaults or {}), **kwargs}
    if kwargs.pop("do_sample", True) is False:
        kwargs["temperature"] = 0.0
    max_length = kwargs.pop("max_length", None)
    if max_length is not None:
        if kwargs.get("max_new_tokens") is not None:
            raise TypeError("give max_new_tokens or max_length, not both")
        if prompt_tokens is None:
            raise TypeError("max_length needs a known prompt length; use max_new_tokens")
        if max_length <= prompt_tokens:
            raise ValueError(f"max_length={max_length} leaves no room: the prompt alone is {prompt_tokens} tokens")
        kwargs["max_new_tokens"] = max_length - prompt_tokens
    known = list(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {', '.join(unknown)}; known: {', '.join(known)}, "
                        "do_sample, max_length")
    return SamplingParams(**kwargs)


class ChatModel:
    """A model and its tokenizer, with the official chat API."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    # ---- chat ------------------------------------------------------------------------------------
    def chat(self, query: str, history: Sequence[Mapping[str, Any]] | None = None, role: str = "user", *,
             truncate: str = "error", **sampling: Any) -> tuple[Response, History]:
        """Reply to `query`: (response, history with the query and the assistant message(s)).

        response is a str, or a dict `{"name", "parameters"}` when the model calls a declared tool
        (`{"name": "interpreter", "content": code}` for code). Sampling arguments: temperature
        (0 = greedy), top_p, top_k, repetition_penalty, seed, max_new_tokens, stop, stop_token_ids,
        and the official do_sample and max_length; the defaults are the official 0.8 / 0.8.
        """
        messages, tools_declared, deltas = self._start(query, history, role, truncate, sampling)
        text = "".join(delta.text for delta in deltas)
        response, reply_messages = self._parse(text, tools_declared, final=True)
        return response, messages + reply_messages

    def stream_chat(self, query: str, history: Sequence[Mapping[str, Any]] | None = None, role: str = "user", *,
                    truncate: str = "error", **sampling: Any) -> Iterator[tuple[Response, History]]:
        """Like `chat`, yielding (partial response, history) as the text grows.

        The last item equals what `chat` returns with the same arguments and seed. A turn is shown
        once its first (metadata) line is complete, so a tool's name never shows as text; while a
        tool call is still being written, the partial response is `{"name", "content": text so far}`.
        """
        messages, tools_declared, deltas = self._start(query, history, role, truncate, sampling)
        text, shown = "", None
        for delta in deltas:
            text += delta.text
            final = delta.finish_reason is not None
            if not final and (not delta.text or "\n" not in text.rsplit(ASSISTANT_TOKEN, 1)[-1]):
                continue  # a turn shows once its metadata line is complete: a tool's name is not text
            response, reply_messages = self._parse(text, tools_declared, final=final)
            # Yield what changed; at the end, also an unchanged or empty reply if nothing was yielded.
            if response != shown and (response or final) or (final and shown is None):
                shown = response
                yield response, messages + reply_messages

    def _start(self, query: str, history, role: str, truncate: str, sampling: dict[str, Any]):
        """Validate, build the conversation, fit it to the context, and start generating."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if truncate not in TRUNCATE_MODES:
            raise ValueError(f"truncate={truncate!r}; use one of {', '.join(TRUNCATE_MODES)}")
        messages: History = copy.deepcopy(list(history or []))  # never touch the caller's history
        messages.append({"role": role, "content": query})
        # The reply's room is known before the prompt only with max_new_tokens (max_length needs the prompt).
        reserve = sampling.get("max_new_tokens") or 1
        sampling_params(CHAT_DEFAULTS, prompt_tokens=0, **sampling)  # bad arguments fail before any work
        messages, ids = self._fit(messages, truncate, reserve)
        params = sampling_params(CHAT_DEFAULTS, prompt_tokens=len(ids), **sampling)
        tools_declared = any(m.get("role") == "system" and "tools" in m for m in messages)
        return messages, tools_declared, generate_stream(self.model, self.tokenizer, ids, params)

    def _fit(self, messages: History, truncate: str, reserve: int) -> tuple[History, list[int]]:
        """The messages and their prompt ids, leaving `reserve` positions for the reply if it can.

        "error": only a prompt with no room at all raises (ContextLengthError, with the overflow).
        "drop_oldest": whole old exchanges (a user message with the replies and observations after
        it) are dropped, oldest first, until the prompt fits; system messages and the exchange of
        the current query are never dropped.
        """
        window = self.model.config.seq_length
        ids = render_messages(self.tokenizer, messages)
        dropped = 0
        if truncate == "drop_oldest":
            while len(ids) + reserve > window:
                shorter = drop_oldest_exchange(messages)
                if shorter is None:
                    break
                dropped += len(messages) - len(shorter)
                messages, ids = shorter, render_messages(self.tokenizer, shorter)
        check_context(len(ids), window)  # still too long: the current exchange alone overflows
        if dropped:
            warnings.warn(f"the conversation did not fit the context window of {window} tokens: dropped the "
                          f"{dropped} oldest message(s); the prompt is now {len(ids)} tokens", stacklevel=4)
        return messages, ids

    def _parse(self, text: str, tools_declared: bool, final: bool) -> tuple[Response, History]:
        try:
            reply = parse_reply(text, tools_declared)
        except ToolCallError as e:
            # A call still being written, or (at the end) a malformed one: keep its text, don't crash.
            if final:
                warnings.warn(f"the model's tool call could not be parsed ({e}); returning it as text "
                              "in {'name', 'content'}", stacklevel=3)
            reply = parse_reply(text, tools_declared=False)
        return reply.response, reply.messages

    # ---- raw text --------------------------------------------------------------------------------
    def generate(self, prompt: str, **sampling: Any) -> str:
        """Complete a raw text prompt (no chat roles), encoded as `[gMASK] sop` + the text."""
        return "".join(self.stream_generate(prompt, **sampling))

    def stream_generate(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Like `generate`, yielding the text as it comes."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        tok = self.tokenizer
        ids = [tok.token_id("[gMASK]"), tok.token_id("sop")] + tok.encode(prompt)
        params = sampling_params(CHAT_DEFAULTS, prompt_tokens=len(ids), **sampling)
        for delta in generate_stream(self.model, tok, ids, params):
            if delta.text:
                yield delta.text


def drop_oldest_exchange(messages: History) -> History | None:
    """`messages` without its oldest exchange, or None when only system messages and the current
    exchange (from the last user message on) are left."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    current = users[-1] if users else len(messages) - 1
    droppable = [i for i in range(current) if messages[i].get("role") != "system"]
    if not droppable:
        return None
    first = droppable[0]
    end = next((i for i in users if first < i), current)  # the next exchange starts at the next user message
    return [m for i, m in enumerate(messages) if not (first <= i < end and m.get("role") != "system")]
