"""torch.distributed for training: who this process is, and wrapping the model for data parallelism.

Launched by `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK in the environment), `setup` joins the process
group: NCCL on GPUs, gloo on the CPU. Launched plainly, it is one process and no group is made, so
the same command runs either way. `wrap` replicates the model (DDP) or shards it (FSDP2,
`fully_shard` per transformer block, then the root) for models that do not fit one device.

Both wrappers average gradients over the processes; the loop relies on that (see loop.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | torch.device | None = None) -> DistContext:
    """This process's place in the run; joins the process group under torchrun (once)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return DistContext(rank, world_size, local_rank, device)


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext, fsdp: bool) -> nn.Module:
    """The module to run forward/backward on: `model` itself on one process, else DDP or FSDP2 around it."""
    if not ctx.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):  # one all-gather per block: only one block's weights are whole at a time
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def unwrap(wrapped: nn.Module) -> nn.Module:
    return getattr(wrapped, "module", wrapped)


@contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Let backward average gradients over the processes only when `enabled` (the last micro-batch)."""
    if hasattr(wrapped, "no_sync"):  # DDP
        with nullcontext() if enabled else wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum of `values` over all processes (a copy; `values` itself is left alone)."""
    values = values.detach().clone()
    if ctx.distributed:
        dist.all_reduce(values)
    return values


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def _blocks(model: nn.Module) -> list[nn.Module]:
    transformer = getattr(model, "transformer", None)
    encoder = getattr(transformer, "encoder", None)
    return list(getattr(encoder, "layers", []))
