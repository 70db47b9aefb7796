"""What a run shows and records as it goes: a progress bar and `train_log.jsonl`.

The bar (tqdm, the `train` extra; plain lines on stderr without it) shows the loss, tokens/s, the
learning rate and the time left. The log holds one JSON object per step and per evaluation, so a run
can be plotted or compared after the fact; a resumed run appends to it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

LOG_NAME = "train_log.jsonl"
PLAIN_EVERY_S = 10.0  # without tqdm: a line at most this often


class Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self._bar = None
        self._last_line = 0.0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # the bar is a nicety: fall back to lines
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="training")
        self._start_time, self._start_step = time.perf_counter(), start

    def step(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        if not self.enabled:
            return
        shown = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}", "lr": f"{lr:.2e}"}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
            return
        now = time.perf_counter()
        if now - self._last_line >= PLAIN_EVERY_S or step == self.total:
            self._last_line = now
            rate = (step - self._start_step) / max(now - self._start_time, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            fields = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {step}/{self.total} {fields} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class TrainLog:
    """Appends records to `<out_dir>/train_log.jsonl`; a fresh run starts the file over."""

    def __init__(self, out_dir: Path | None, fresh: bool):
        self.path = out_dir / LOG_NAME if out_dir is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                self.path.write_text("", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_log(out_dir: Path) -> list[dict[str, Any]]:
    """The records of `<out_dir>/train_log.jsonl`."""
    lines = (out_dir / LOG_NAME).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
