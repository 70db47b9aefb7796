"""Per-step work on the logits that the single-request generator does not do itself.

`generate_stream` asks its model for logits once per step and samples them. `HookedModel` stands
in for the model there and, on each step's last logits row, applies OpenAI's presence/frequency
penalties and the request's constraint, and keeps the raw row so the chosen token's logprob can be
read when its Delta arrives. What it knows of the reply it learns from the ids fed back: each step's
input is the token sampled the step before.
"""

from __future__ import annotations

import torch

from glmkit.sampling import apply_presence_frequency_penalty, token_logprobs

from .params import RequestParams


class HookedModel:
    """`model`, as generate_stream calls it, with `params`' penalties, constraint and logprobs."""

    def __init__(self, model, params: RequestParams, vocab_size: int):
        self.model = model
        self.params = params
        self.vocab_size = vocab_size
        self.generated: list[int] = []
        self._steps = 0
        self._raw: torch.Tensor | None = None  # (V,) the last step's logits before any change
        self._counts: torch.Tensor | None = None  # (1, V) occurrences of each id in `generated`
        self._penalties = params.presence_penalty != 0 or params.frequency_penalty != 0

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_kv_cache(self, batch_size: int, capacity: int):
        return self.model.new_kv_cache(batch_size, capacity)

    def __call__(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._steps:  # every step after the prompt feeds back the token sampled last
            self.generated.append(int(input_ids[0, -1]))
        self._steps += 1
        logits = self.model(input_ids, **kwargs)  # (1, T, V)
        row = logits[0, -1]
        if self.params.logprobs is not None:
            self._raw = row.clone()
        if self._penalties:
            if self._counts is None:
                self._counts = torch.zeros(1, row.shape[0], device=row.device)
            if self.generated:
                self._counts[0, self.generated[-1]] += 1
            penalty = torch.tensor([self.params.presence_penalty], device=row.device)
            frequency = torch.tensor([self.params.frequency_penalty], device=row.device)
            row.copy_(apply_presence_frequency_penalty(row[None], self._counts, penalty, frequency)[0])
        if self.params.constraint is not None:
            self.params.constraint.apply(row, self.generated)
        return logits

    def logprobs(self, token_id: int) -> tuple[float, list[tuple[int, float]]]:
        """The logprob of `token_id`, just sampled from the last step's logits, and the top alternatives."""
        if self._raw is None:
            raise RuntimeError("logprobs were not asked for (params.logprobs is None)")
        token = torch.tensor([token_id], device=self._raw.device)
        chosen, ids, values = token_logprobs(self._raw[None], token, self.params.logprobs, self.vocab_size)
        return float(chosen[0]), list(zip(ids[0].tolist(), values[0].tolist()))
