"""TrainConfig: every setting of a training run, checked once before any work starts.

Batch sizes count examples over the whole run, whatever the number of processes: `batch_size`
examples make one optimizer step (the global batch); each of the N processes takes a disjoint
1/N of them and splits its share into `grad_accum` micro-batches. So the same config trains the same
model on one process or on eight, and a checkpoint resumes on either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmkit.lora import DEFAULT_TARGETS

from .data import OVERLONG_RULES

METHODS = ("full", "lora", "ptuning")
# Learning rates that suit each method when none is given (the official P-Tuning v2 recipe uses 2e-2).
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "ptuning": 2e-2}
# Settings that decide the numbers a run computes: a resumed run must have the same ones.
RUN_DEFINING = ("method", "lr", "warmup_steps", "min_lr_ratio", "batch_size", "weight_decay", "seed", "shuffle",
                "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "pre_seq_len", "prefix_projection", "bf16")


class TrainConfigError(ValueError):
    """A training setting that cannot work, named."""


@dataclass
class TrainConfig:
    method: str = "full"  # full | lora | ptuning
    lr: float | None = None  # peak learning rate; None: DEFAULT_LR[method]
    warmup_steps: int = 0  # linear warm-up from 0, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    max_steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 8  # examples per optimizer step, over all processes
    grad_accum: int = 1  # micro-batches each process splits its share of a step into
    max_grad_norm: float | None = 1.0  # clip the gradient's global norm; None: no clipping
    weight_decay: float = 0.0
    shuffle: bool = True  # a fresh seeded order of the examples each epoch
    eval_every: int | None = None  # steps between evaluations (and one at the end); None: only at the end
    save_every: int | None = None  # steps between resumable checkpoints (and one at the end/stop)
    keep_checkpoints: int = 2  # the newest ones kept; 0: keep all
    seed: int = 0
    out_dir: str | Path | None = None  # checkpoints, train_log.jsonl and the outputs; None: write nothing
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    pre_seq_len: int = 128  # P-Tuning v2 prefix length (official default)
    prefix_projection: bool = False
    bf16: bool | None = None  # bfloat16 autocast; None: on for CUDA, off on CPU (exact float32)
    max_length: int | None = None  # longest example accepted; data loaders apply `overlong` before
    overlong: str = "truncate"  # truncate | drop: what conversation loaders do with longer examples
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of replicating (DDP)
    device: str | None = None  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    resume: str | Path | None = None  # a checkpoint folder, or "latest" (the newest under out_dir)
    stop_after: int | None = None  # stop (with a checkpoint) after this step; the schedule still spans max_steps
    progress: bool = True  # a progress bar on the first process

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrainConfigError(f"method={self.method!r}; use one of {', '.join(METHODS)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        self.lora_targets = tuple([self.lora_targets] if isinstance(self.lora_targets, str) else self.lora_targets)
        for name in ("batch_size", "grad_accum", "lora_r", "pre_seq_len"):
            _positive_int(name, getattr(self, name))
        for name in ("max_steps", "eval_every", "save_every", "stop_after", "max_length"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TrainConfigError(f"{name}={value!r} must be a non-negative integer")
        if not self.lr > 0:
            raise TrainConfigError(f"lr={self.lr!r} must be positive")
        if not self.epochs > 0:
            raise TrainConfigError(f"epochs={self.epochs!r} must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise TrainConfigError(f"max_grad_norm={self.max_grad_norm!r} must be positive (None: no clipping)")
        if not self.weight_decay >= 0:
            raise TrainConfigError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if not 0 <= self.lora_dropout < 1:
            raise TrainConfigError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.overlong not in OVERLONG_RULES:
            raise TrainConfigError(f"overlong={self.overlong!r}; use one of {', '.join(OVERLONG_RULES)}")
        if (self.save_every or self.stop_after or self.resume) and self.out_dir is None:
            raise TrainConfigError("checkpoints (save_every, stop_after, resume) need an out_dir")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TrainConfigError(f"{name}={value!r} must be a positive integer")
