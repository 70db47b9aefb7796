"""The server's numbers, in the Prometheus text format (version 0.0.4), written by hand.

Counters and histograms are updated by the request handlers, all on the server's event loop (so no
locks); gauges (queue depth, KV-cache use) are read from the backend's `stats()` when scraped.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence

PREFIX = "glmkit"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Histogram:
    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {total}"]
        return out


class Metrics:
    """What /metrics reports; `render(stats)` writes it, with the backend's current `stats()`."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.rejected: dict[str, int] = defaultdict(int)  # reason -> count
        self.aborted = 0  # requests whose client left before the end
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.time_to_first_token = Histogram()
        self.inter_token_latency = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.request_duration = Histogram()

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def render(self, stats: dict[str, int], pending: int, limit: int) -> str:
        p = PREFIX
        lines = [f"# HELP {p}_requests_total HTTP requests answered, by endpoint and status code.",
                 f"# TYPE {p}_requests_total counter"]
        lines += [f'{p}_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
        lines += [f"# HELP {p}_requests_rejected_total Requests refused before generating, by reason.",
                  f"# TYPE {p}_requests_rejected_total counter"]
        lines += [f'{p}_requests_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejected.items())]
        lines += self._counter("requests_aborted_total", "Generations stopped because the client left.", self.aborted)
        lines += self._counter("prompt_tokens_total", "Prompt tokens of answered requests.", self.prompt_tokens)
        lines += self._counter("generation_tokens_total", "Tokens generated for answered requests.",
                               self.completion_tokens)
        lines += self._gauge("requests_running", "Generations in the running batch.", stats.get("running", 0))
        lines += self._gauge("requests_waiting", "Generations queued for a place in the batch.",
                             stats.get("waiting", 0))
        lines += self._gauge("requests_pending", "Generations admitted and not finished (running + waiting).", pending)
        lines += self._gauge("requests_pending_limit", "Admitted generations beyond which requests get 503.", limit)
        total, used = stats.get("kv_blocks_total", 0), stats.get("kv_blocks_used", 0)
        lines += self._gauge("kv_cache_blocks_total", "KV-cache blocks.", total)
        lines += self._gauge("kv_cache_blocks_used", "KV-cache blocks in use.", used)
        lines += self._gauge("kv_cache_usage_ratio", "Fraction of the KV cache in use.", used / total if total else 0.0)
        if "prefix_cache_hit_tokens" in stats:  # the batched engine's own counters
            lines += self._counter("prefix_cache_hit_tokens_total", "Prompt tokens whose keys/values were reused.",
                                   stats["prefix_cache_hit_tokens"])
        if "preemptions" in stats:
            lines += self._counter("preemptions_total", "Sequences preempted for lack of KV cache (recomputed later).",
                                   stats["preemptions"])
        for name, help_, histogram in (
                ("time_to_first_token_seconds", "From a request's arrival to its first generated token.",
                 self.time_to_first_token),
                ("inter_token_latency_seconds", "Between consecutive tokens of a generation.",
                 self.inter_token_latency),
                ("request_duration_seconds", "From a request's arrival to its last token.", self.request_duration)):
            lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} histogram"]
            lines += histogram.lines(f"{p}_{name}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _counter(name: str, help_: str, value: float) -> list[str]:
        return [f"# HELP {PREFIX}_{name} {help_}", f"# TYPE {PREFIX}_{name} counter", f"{PREFIX}_{name} {value}"]

    @staticmethod
    def _gauge(name: str, help_: str, value: float) -> list[str]:
        return [f"# HELP {PREFIX}_{name} {help_}", f"# TYPE {PREFIX}_{name} gauge", f"{PREFIX}_{name} {value}"]
