"""The matrix products of quantized linears: one interface, several kernels, a reference for all.

A kernel is a function (layer, x) -> y for x (M, K) and y (M, N), bias excluded. `choose` picks one by
device, row count and what the layer allows; a layer's `kernel` attribute overrides the choice (tests
and benchmarks use it). Every kernel is tested against `reference`, which dequantizes the whole weight
to float32 and multiplies: slow, obviously right, and the fallback wherever no kernel applies.

Measured on a 2-core AVX-512 CPU at ChatGLM3-6B's shapes (benchmarks/bench_quant.py):
- one row (decode): torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` with bfloat16
  activations; float32 or float16 activations make them 30-100x slower, so activations are cast.
- many rows (prefill): these kernels multiply slower than float32 matmul; above `*_KERNEL_MAX_ROWS` rows
  the weight is dequantized to float32 a few output blocks at a time and multiplied in float32 (as
  `glmkit.packed` does for bfloat16 weights), which is never slower than the bfloat16 model's prefill.
- CUDA: torch's tinygemm int4 kernel (`_weight_int4pack_mm`, after `_convert_weight_to_int4pack`) and
  `_weight_int8pack_mm` where the build has it, else a dequantize-and-multiply in the activations' dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .layout import BLOCK_N, pack_int4_blocked, pack_int4_rows, unpack_int4_blocked

# Above these many rows, dequantizing to float32 blocks and multiplying beats the integer kernels.
INT8_KERNEL_MAX_ROWS = 16
INT4_KERNEL_MAX_ROWS = 16
# Output columns dequantized at a time by the float32 path: 256 x K 4096 x 4 bytes = 4 MB of scratch.
FLOAT32_COLUMNS_PER_STEP = 256

KERNELS = ("auto", "reference", "cpu", "float32", "cuda")

Kernel = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def reference(layer, x: torch.Tensor) -> torch.Tensor:
    """x @ dequantize(weight).T in float32, returned in x's dtype."""
    return F.linear(x.float(), layer.dequantize()).to(x.dtype)


# ---- CPU -------------------------------------------------------------------------------------------------

def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@functools.cache
def cpu_int4_layout_is_native() -> bool:
    """Whether torch's CPU int4 packing is glmkit's blocked layout on this CPU (it is on AVX-512): then a
    checkpoint's bytes go to the kernel as they are. Checked once by packing a probe."""
    if not _has_op("_convert_weight_to_int4pack_for_cpu"):
        return False
    q = torch.randint(0, 16, (BLOCK_N * 2, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    torch_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return torch.equal(torch_packed.view(-1), pack_int4_blocked(q).view(-1))


def cpu_int8(layer, x: torch.Tensor) -> torch.Tensor:
    """torch's weight-only int8 kernel: one scale per output row, bfloat16 activations."""
    x16 = x.to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(x16, layer.weight, layer.scales.view(-1).to(torch.bfloat16))
    if layer.zeros is not None:  # (q * s + z) . x = (q * s) . x + z * sum(x)
        y = y + x16.float().sum(-1, keepdim=True) * layer.zeros.view(1, -1).float()
    return y.to(x.dtype)


def cpu_int8_applies(layer) -> bool:
    # The kernel reads one scale per row; it returns garbage (or crashes) unless K is a multiple of 16.
    return _has_op("_weight_int8pack_mm") and layer.group_size == 0 and layer.in_features % 16 == 0


def cpu_int4(layer, x: torch.Tensor) -> torch.Tensor:
    """torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`), bfloat16 activations."""
    weight = layer.prepared("cpu", _cpu_int4_weight)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weight, layer.group_size,
                                                   layer.scales_and_zeros.to(torch.bfloat16))
    return y[:, :layer.out_features].to(x.dtype)


def _cpu_int4_weight(layer) -> torch.Tensor:
    if cpu_int4_layout_is_native():
        return layer.weight.view(-1, layer.in_features // 2)  # the same bytes: no copy
    q = unpack_int4_blocked(layer.weight, layer.weight.shape[0] * BLOCK_N).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # a second copy, kernel-shaped


def cpu_int4_applies(layer) -> bool:
    return _has_op("_weight_int4pack_mm_for_cpu") and layer.group_size in (32, 64, 128, 256)


def float32_int8(layer, x: torch.Tensor) -> torch.Tensor:
    """Long inputs: dequantize FLOAT32_COLUMNS_PER_STEP rows of the weight at a time, multiply in float32."""
    xf = x.float()
    N, K = layer.weight.shape
    G = layer.scales.shape[1]
    out = torch.empty(x.shape[0], N, dtype=torch.float32, device=x.device)
    for start in range(0, N, FLOAT32_COLUMNS_PER_STEP):
        rows = slice(start, min(N, start + FLOAT32_COLUMNS_PER_STEP))
        w = layer.weight[rows].float().view(-1, G, K // G)
        w *= layer.scales[rows].float()[..., None]
        if layer.zeros is not None:
            w += layer.zeros[rows].float()[..., None]
        torch.matmul(xf, w.view(-1, K).t(), out=out[:, rows])
    return out.to(x.dtype)


def float32_int4(layer, x: torch.Tensor) -> torch.Tensor:
    """Long inputs: dequantize a few 64-row blocks at a time straight from the blocked layout into float32
    (rows j and 32 + j of a block are the low and high halves of the same bytes), multiply in float32."""
    xf = x.float()
    blocks, K, _ = layer.weight.shape
    sz = layer.scales_and_zeros  # (G, N_pad, 2)
    G = sz.shape[0]
    step = max(1, FLOAT32_COLUMNS_PER_STEP // BLOCK_N)
    out = torch.empty(blocks, x.shape[0], BLOCK_N, dtype=torch.float32, device=x.device)
    w = torch.empty(step, K, BLOCK_N, dtype=torch.float32, device=x.device)
    for start in range(0, blocks, step):
        n = min(step, blocks - start)
        packed = layer.weight[start:start + n]  # (n, K, 32)
        w[:n, :, :32] = packed & 15
        w[:n, :, 32:] = packed >> 4
        cols = sz[:, start * BLOCK_N:(start + n) * BLOCK_N].float().view(G, n, BLOCK_N, 2).transpose(0, 1)
        scale, zero = cols[..., 0].unsqueeze(2), cols[..., 1].unsqueeze(2)  # (n, G, 1, 64)
        grouped = w[:n].view(n, G, K // G, BLOCK_N)
        grouped.sub_(8).mul_(scale).add_(zero)
        torch.matmul(xf, w[:n], out=out[start:start + n])
    return out.permute(1, 0, 2).reshape(x.shape[0], -1)[:, :layer.out_features].to(x.dtype)


# ---- CUDA ------------------------------------------------------------------------------------------------

def cuda_int4(layer, x: torch.Tensor) -> torch.Tensor:
    """torch's tinygemm int4 kernel; bfloat16 activations."""
    weight = layer.prepared("cuda", _cuda_int4_weight)
    y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), weight, layer.group_size,
                                           layer.scales_and_zeros.to(torch.bfloat16))
    return y[:, :layer.out_features].to(x.dtype)


def _cuda_int4_weight(layer) -> torch.Tensor:
    rows = layer.weight.shape[0] * BLOCK_N
    q = pack_int4_rows(unpack_int4_blocked(layer.weight, rows))  # (N_pad, K/2), even input in the high half
    return torch.ops.aten._convert_weight_to_int4pack(q, _inner_k_tiles(layer.in_features))


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def cuda_int4_applies(layer) -> bool:
    return (_has_op("_weight_int4pack_mm") and layer.group_size in (32, 64, 128, 256)
            and layer.in_features % 32 == 0)


def cuda_int8(layer, x: torch.Tensor) -> torch.Tensor:
    """Per-row scales: torch's `_weight_int8pack_mm` where this build has it for CUDA, else the weight
    converted to the activations' dtype and the scales applied to the product (exact: one scale per row)."""
    if layer.group_size != 0:
        return F.linear(x, layer.dequantize().to(x.dtype))
    if _cuda_int8pack_works(x.device):
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), layer.weight,
                                               layer.scales.view(-1).to(torch.bfloat16)).to(x.dtype)
    else:
        y = F.linear(x, layer.weight.to(x.dtype)) * layer.scales.view(-1).to(x.dtype)
    if layer.zeros is not None:
        y = y + x.sum(-1, keepdim=True) * layer.zeros.view(1, -1).to(x.dtype)
    return y


@functools.cache
def _cuda_int8pack_works(device: torch.device) -> bool:
    try:
        x = torch.ones(1, 32, dtype=torch.bfloat16, device=device)
        torch.ops.aten._weight_int8pack_mm(x, torch.ones(16, 32, dtype=torch.int8, device=device),
                                           torch.ones(16, dtype=torch.bfloat16, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


# ---- choosing --------------------------------------------------------------------------------------------

_BY_NAME: dict[tuple[int, str], Kernel] = {
    (8, "reference"): reference, (4, "reference"): reference,
    (8, "cpu"): cpu_int8, (4, "cpu"): cpu_int4,
    (8, "float32"): float32_int8, (4, "float32"): float32_int4,
    (8, "cuda"): cuda_int8, (4, "cuda"): cuda_int4,
}


_APPLIES = {(8, "cpu"): cpu_int8_applies, (4, "cpu"): cpu_int4_applies, (4, "cuda"): cuda_int4_applies}


def choose(layer, x: torch.Tensor) -> Kernel:
    """The kernel for `layer` and input rows x (M, K): the layer's `kernel` if set, else the fastest that
    applies."""
    bits, name = layer.bits, layer.kernel
    if name != "auto":
        if name not in KERNELS:
            raise ValueError(f"unknown kernel {name!r}; use one of {', '.join(KERNELS)}")
        if not _APPLIES.get((bits, name), lambda _: True)(layer):
            raise ValueError(f"kernel {name!r} does not apply to {layer}")
        return _BY_NAME[bits, name]
    if x.device.type == "cpu":
        max_rows, applies = ((INT8_KERNEL_MAX_ROWS, cpu_int8_applies) if bits == 8
                             else (INT4_KERNEL_MAX_ROWS, cpu_int4_applies))
        if x.shape[0] <= max_rows and applies(layer):
            return _BY_NAME[bits, "cpu"]
        return _BY_NAME[bits, "float32"]
    if x.device.type == "cuda" and (bits == 8 or cuda_int4_applies(layer)):
        return _BY_NAME[bits, "cuda"]
    return reference
