"""SamplingParams plus what the OpenAI API asks of a generation beyond them.

`RequestParams` is a `SamplingParams` (any backend can run it) with three more wishes: OpenAI's
presence/frequency penalties, logprobs, and a constraint on the next token (see `constraints`).
A backend declares which of these it carries out in `features`; the server never sends a wish to a
backend that would ignore it (see `needed_features`).

A backend that implements "logprobs" yields Deltas with two more attributes: `logprob` (float, the
chosen token's log-probability under the model, before penalties and temperature) and
`top_logprobs` (list of (token id, logprob), most likely first, `logprobs` of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glmkit.sampling import SamplingParams

FEATURES = ("penalties", "logprobs", "constraints")


@dataclass
class RequestParams(SamplingParams):
    """presence_penalty, frequency_penalty: OpenAI's, in [-2, 2] (0 = off); see
    `glmkit.sampling.apply_presence_frequency_penalty`.
    logprobs: None = none; k >= 0 = each token's logprob and its k most likely alternatives.
    constraint: a `constraints.Constraint` for this request, or None.
    """

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    constraint: Any = field(default=None, compare=False, repr=False)

    def validate(self) -> None:
        super().validate()
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise ValueError(f"RequestParams.{name}={value!r}: must be a number in [-2, 2]")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or self.logprobs < 0):
            raise ValueError(f"RequestParams.logprobs={self.logprobs!r}: must be None or an integer >= 0")


def needed_features(params: SamplingParams) -> set[str]:
    """The backend features that running `params` faithfully needs."""
    if not isinstance(params, RequestParams):
        return set()
    needed = set()
    if params.presence_penalty or params.frequency_penalty:
        needed.add("penalties")
    if params.logprobs is not None:
        needed.add("logprobs")
    if params.constraint is not None:
        needed.add("constraints")
    return needed
