"""The one training loop: full fine-tuning, LoRA and P-Tuning v2 (and pretraining) differ only in
which parameters train (methods.py) and in their data.

Each optimizer step takes one global batch (batches.py). The loss is the mean cross-entropy over the
learned tokens of the whole global batch: each process sums its tokens' losses and divides by the
global count, times the number of processes because DDP and FSDP average gradients. So one process,
or N processes with the same global batch, or any split into micro-batches, compute the same step.

AdamW, linear warm-up then cosine decay, global-norm clipping, optional bf16 autocast, evaluation
every `eval_every` steps and at the end, checkpoints every `save_every` steps that resume exactly
(checkpoint.py), and at the end the method's output in `out_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from . import checkpoint, distributed, methods
from .batches import GlobalBatches, collate, learned_tokens, micro_batches, share
from .config import TrainConfig, TrainConfigError
from .data import IGNORE_INDEX
from .distributed import DistContext
from .progress import Progress, TrainLog

RUN_CONFIG = "train_config.json"


@dataclass
class TrainResult:
    steps: int  # optimizer steps done so far in the run (resumed steps included)
    total_steps: int
    # Of the steps this call ran (a resumed run starts after its checkpoint): step -> mean loss per learned token.
    train_loss: dict[int, float] = field(default_factory=dict)
    eval_loss: dict[int, float] = field(default_factory=dict)
    tokens: int = 0  # tokens trained on by this call, padding excluded
    seconds: float = 0.0  # spent in training steps by this call (evaluation and saving excluded)
    checkpoint: Path | None = None  # the last resumable checkpoint written
    output: Path | None = None  # what the finished run wrote: checkpoint, adapter or prefix

    @property
    def completed(self) -> bool:
        return self.steps >= self.total_steps

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train(model: nn.Module, train_data: Iterable[dict], eval_data: Iterable[dict] | None, config: TrainConfig,
          tokenizer=None, *, base_model: str | None = None) -> TrainResult:
    """Train `model` in place by `config.method`; return the losses and where the results are.

    Data are examples `{"input_ids", "labels"}` (labels -100 where no loss is taken; the model shifts
    them: label i is predicted from tokens 0..i-1). `tokenizer` gives the padding id and the
    tokenizer.model copied beside a full checkpoint; `base_model` is recorded in an adapter's config.
    Under torchrun, every process calls this with the same arguments.
    """
    ctx = distributed.setup(config.device)
    micro_size = _micro_batch_size(config, ctx)
    torch.manual_seed(config.seed)  # the method's new weights (LoRA, prefix) are the same on every process
    trainable = methods.prepare(model, config)
    model.to(ctx.device)
    wrapped = distributed.wrap(model, ctx, config.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP swaps them
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = GlobalBatches(train_data, config.batch_size, config.shuffle, config.seed)
    total = config.max_steps or batches.steps_for(config.epochs)
    scheduler = LambdaLR(optimizer, partial(lr_factor, warmup=config.warmup_steps, total=total,
                                            min_ratio=config.min_lr_ratio))
    eval_examples = _eval_list(eval_data)
    out = Path(config.out_dir) if config.out_dir is not None else None
    examples_per_epoch = len(batches) if batches.indexable else None

    start = 0
    if config.resume is None and out is not None and checkpoint.latest(out) is not None:
        raise ValueError(f"{out} holds checkpoints of an earlier run ({checkpoint.latest(out).name}): resume it, "
                         "or train into another folder")
    if config.resume is not None:
        folder = checkpoint.resolve(config.resume, out)
        start = checkpoint.load(folder, model, optimizer, scheduler, config, trainable, total,
                                examples_per_epoch, ctx).step
    else:
        torch.manual_seed(config.seed + ctx.rank)  # dropout masks differ between processes
    if ctx.is_main and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    log = TrainLog(out if ctx.is_main else None, fresh=start == 0)
    bar = Progress(total, start, config.progress and ctx.is_main)
    step_run = _StepRunner(wrapped, ctx, config, micro_size, pad_id=tokenizer.pad_id if tokenizer else 0)
    result = TrainResult(steps=start, total_steps=total)
    last = min(total, config.stop_after or total)
    try:
        for step in range(start + 1, last + 1):
            began = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss, tokens, grad_norm = step_run.step(batches.batch(step - 1), params)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - began
            result.steps, result.tokens, result.seconds = step, result.tokens + tokens, result.seconds + seconds
            result.train_loss[step] = loss
            bar.step(step, loss, tokens / seconds, lr)
            log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                       "tokens_per_s": tokens / seconds, "seconds": seconds})
            if eval_examples and (step == total or (config.eval_every and step % config.eval_every == 0)):
                result.eval_loss[step] = step_run.evaluate(eval_examples)
                bar.note(f"step {step}: eval loss {result.eval_loss[step]:.4f}")
                log.write({"step": step, "eval_loss": result.eval_loss[step]})
            if out is not None and ((config.save_every and step % config.save_every == 0)
                                    or (step == last and step < total)):
                state = checkpoint.TrainingState(step, total, examples_per_epoch, ctx.world_size,
                                                 checkpoint.run_settings(config), {})
                result.checkpoint = checkpoint.save(out, model, optimizer, scheduler, state, ctx,
                                                    config.keep_checkpoints)
    finally:
        bar.close()
    model.eval()
    if result.completed and out is not None:
        result.output = _save_output(model, config, out, ctx, tokenizer, base_model)
    return result


def lr_factor(i: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate of step i + 1 (of 1..total) as a fraction of the peak.

    Linear warm-up reaching the peak at step `warmup`, then a cosine from the peak (step warmup + 1)
    towards min_ratio, which it would reach one step after the last: no step runs with a zero rate.
    """
    step = i + 1
    if step <= warmup:
        return step / warmup
    progress = min(1.0, (step - warmup - 1) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each learned label given the tokens before it; logits (B, T, V), labels (B, T).

    The labels move left by one instead of the logits moving right: slicing (B, T, V) logits would copy
    them, and they are the largest tensor of a step (a 65024-token vocabulary).
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): position t predicts token t + 1
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


class _StepRunner:
    """Forward and backward of one global batch, and evaluation, on this process's share."""

    def __init__(self, wrapped: nn.Module, ctx: DistContext, config: TrainConfig, micro_size: int, pad_id: int):
        self.wrapped, self.ctx, self.config, self.micro_size, self.pad_id = wrapped, ctx, config, micro_size, pad_id
        bf16 = config.bf16 if config.bf16 is not None else ctx.device.type == "cuda"
        if bf16 and ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainConfigError(f"bf16 was asked for, but {torch.cuda.get_device_name(ctx.device)} does not "
                                   "support bfloat16")
        self.autocast = partial(torch.autocast, ctx.device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(self, global_batch: list[dict], params: list[nn.Parameter]) -> tuple[float, int, float]:
        """Accumulate the gradients of the global batch; return (mean loss, tokens, gradient norm before clipping)."""
        ctx, config = self.ctx, self.config
        learned = learned_tokens(global_batch)
        if learned == 0:
            raise ValueError("a global batch has no token to learn: every label is -100")
        self.wrapped.train()
        totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, tokens
        micros = micro_batches(share(global_batch, ctx.rank, ctx.world_size), config.grad_accum)
        for i, micro in enumerate(micros):
            input_ids, labels, tokens = collate(micro, self.pad_id, config.max_length, ctx.device)
            with distributed.gradient_sync(self.wrapped, enabled=i == len(micros) - 1):
                with self.autocast():
                    loss = token_loss_sum(self.wrapped(input_ids), labels)
                # DDP/FSDP average gradients over processes: this scale makes the average the global mean.
                (loss * (ctx.world_size / learned)).backward()
            totals += torch.stack((loss.detach().double(), torch.tensor(tokens, dtype=torch.float64,
                                                                        device=ctx.device)))
        max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        loss_sum, tokens = distributed.all_reduce_sum(totals, ctx).tolist()
        return loss_sum / learned, int(tokens), float(norm)

    @torch.no_grad()
    def evaluate(self, examples: list[dict]) -> float:
        """Mean loss per learned token over `examples`, shared out among the processes."""
        ctx = self.ctx
        self.wrapped.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, learned tokens
        chunk = self.micro_size * ctx.world_size
        for start in range(0, len(examples), chunk):
            mine = examples[start:start + chunk][ctx.rank * self.micro_size:(ctx.rank + 1) * self.micro_size]
            weight = 1.0
            if not mine:  # the last chunk may leave this process nothing: run one example anyway, uncounted,
                mine, weight = examples[start:start + 1], 0.0  # so FSDP's collectives stay in step
            input_ids, labels, _ = collate(mine, self.pad_id, self.config.max_length, ctx.device)
            with self.autocast():
                loss = token_loss_sum(self.wrapped(input_ids), labels)
            counted = (labels[:, 1:] != IGNORE_INDEX).sum()
            totals += weight * torch.stack((loss.double(), counted.double()))
        loss_sum, count = distributed.all_reduce_sum(totals, ctx).tolist()
        if count == 0:
            raise ValueError("the evaluation data has no token to learn: every label is -100")
        return loss_sum / count


def _micro_batch_size(config: TrainConfig, ctx: DistContext) -> int:
    per_step = ctx.world_size * config.grad_accum
    if config.batch_size % per_step:
        raise TrainConfigError(f"batch_size={config.batch_size} examples per step cannot be split evenly over "
                               f"{ctx.world_size} process(es) x grad_accum={config.grad_accum}; use a multiple of "
                               f"{per_step}")
    return config.batch_size // per_step


def _eval_list(eval_data: Iterable[dict] | None) -> list[dict]:
    if eval_data is None:
        return []
    examples = list(eval_data)
    if not examples:
        raise ValueError("the evaluation data holds no example (pass None for no evaluation)")
    return examples


def _save_output(model: nn.Module, config: TrainConfig, out: Path, ctx: DistContext, tokenizer,
                 base_model: str | None) -> Path:
    """The method's output, written by the first process from whole (unsharded) weights."""
    tokenizer_path = getattr(tokenizer, "path", None)
    if config.fsdp and ctx.distributed:
        model = _gathered_copy(model, config, ctx)
    if ctx.is_main:
        methods.save_output(model, config, out, tokenizer_path, base_model)
    distributed.barrier(ctx)
    return out


def _gathered_copy(model: nn.Module, config: TrainConfig, ctx: DistContext) -> nn.Module | None:
    """On the first process, a plain copy of a sharded model with whole weights on the CPU; None elsewhere."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from glmkit.model import ChatGLMForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    with torch.device("meta"):
        copy = ChatGLMForCausalLM(dataclasses.replace(model.config, pre_seq_len=None))
        methods.prepare(copy, config)  # the same structure: adapters or prefix
    copy.load_state_dict(state, assign=True)
    return copy.eval()
