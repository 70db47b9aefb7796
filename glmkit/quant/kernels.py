"""The matrix products of quantized linears: one interface, several kernels, a reference for all.

A kernel is a function (layer, x) -> y for x (M, K) and y (M, N), bias excluded. `choose` picks one by
device, row count and what the layer allows; a layer's `kernel` attribute overrides the choice (tests
and benchmarks use it). Every kernel is tested against `reference`, which dequantizes the whole weight
to float32 and multiplies: slow, obviously right, and the fallback wherever no kernel applies.

Measured on a 2-core AVX-512 CPU at ChatGLM3-6B's shapes (benchmarks/bench_quant.py kernels / rows):
- CPU, any number of rows: glmkit's VNNI kernels (`glmkit.cpu_kernels`, csrc/vnni_linear.cpp: inputs quantized to
  int8 per 32 values, integer dot products, the checkpoint layout read in place). One row (decode) runs at
  the memory bandwidth (int4 and int8 about 100% of a streaming read with one thread; torch's int4 kernel
  66%, its int8 kernel 80%); a 256-row prompt about 3x faster than the bfloat16 path (4608 x 4096, one
  thread: int8 24 ms, int4 26 ms, bfloat16 74 ms, the float32 paths below 78-82 ms) where the CPU has no AMX.
  On CPUs with AMX, 64 rows or more run on its tiles instead, as bfloat16 products of x and the weight
  dequantized tile by tile: 1.7-1.9x the integer path at 256-512 rows, near oneDNN's bfloat16 kernel on a
  bfloat16 weight (benchmarks/RESULTS.md).
- CPU without them (no compiler, no AVX-512 VNNI): few rows through torch's `_weight_int8pack_mm` /
  `_weight_int4pack_mm_for_cpu` with bfloat16 activations (float32 or float16 activations make those
  30-100x slower, so activations are cast); above `*_KERNEL_MAX_ROWS` rows the weight is dequantized to
  float32 a few blocks at a time and multiplied in float32 (as `glmkit.packed` does for bfloat16 weights).
- CUDA: torch's tinygemm int4 kernel (`_weight_int4pack_mm`, after `_convert_weight_to_int4pack`) and
  `_weight_int8pack_mm` where the build has it, else a dequantize-and-multiply in the activations' dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import cpu_kernels
from .layout import BLOCK_N, pack_int4_blocked, pack_int4_rows, unpack_int4_blocked

# Without the VNNI kernels: above these many rows, dequantizing to float32 blocks and multiplying beats
# torch's integer kernels (benchmarks/bench_quant.py rows: at 4096 x 4608, 1 thread, they cross between 32
# and 64 rows).
INT8_KERNEL_MAX_ROWS = 48
INT4_KERNEL_MAX_ROWS = 48
# Float32 weights the long-input path dequantizes at a time. Measured at 256 rows, 4096 x 4608, 2 threads:
# 1 / 2 / 4 / 8 MB -> int8 49 / 43 / 40 / 39 ms, int4 43 / 41 / 39 / 39 ms (bfloat16's path: 38 ms);
# larger steps make fewer, larger matrix products, smaller ones keep the scratch in L2.
FLOAT32_SCRATCH_BYTES = 8 * 2**20

KERNELS = ("auto", "reference", "vnni", "cpu", "float32", "cuda")

Kernel = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def reference(layer, x: torch.Tensor) -> torch.Tensor:
    """x @ dequantize(weight).T in float32, returned in x's dtype."""
    return F.linear(x.float(), layer.dequantize()).to(x.dtype)


def input_grad(layer, grad: torch.Tensor) -> torch.Tensor:
    """grad (M, N) @ W (N, K): the gradient of a quantized linear's input, W dequantized to float32 a few rows at
    a time (FLOAT32_SCRATCH_BYTES), so training over a large layer never holds its float copy."""
    N, K = layer.out_features, layer.in_features
    step = max(BLOCK_N, FLOAT32_SCRATCH_BYTES // (4 * K) // BLOCK_N * BLOCK_N)
    g = grad.float()
    out = torch.zeros(g.shape[0], K, dtype=torch.float32, device=grad.device)
    for start in range(0, N, step):
        stop = min(N, start + step)
        out.addmm_(g[:, start:stop], layer.dequantize_rows(start, stop))
    return out.to(grad.dtype)


# ---- CPU: glmkit's VNNI kernels ----------------------------------------------------------------------------

# (A decode step makes over a hundred of these calls: they skip what costs microseconds and does nothing.)

def vnni_int8(layer, x: torch.Tensor, amx: bool = True) -> torch.Tensor:
    """int8 weights (any group size) times x quantized to int8 per 32 inputs; reads the stored weight. Where the
    CPU has AMX (and `amx`), 64 rows or more multiply on its tiles instead: x in bfloat16 times the weight
    dequantized to bfloat16, a tile at a time."""
    y = torch.ops.glmkit_cpu.int8_linear(_vnni_input(x), layer.weight, layer.scales, layer.zeros, layer.group_size,
                                          amx)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def vnni_int4(layer, x: torch.Tensor, amx: bool = True) -> torch.Tensor:
    """int4 weights in the checkpoint's blocked layout times x quantized to int8 per 32 inputs (AMX: as int8)."""
    y = torch.ops.glmkit_cpu.int4_linear(_vnni_input(x), layer.weight, layer.scales_and_zeros, layer.group_size,
                                          layer.out_features, amx)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _vnni_input(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.bfloat16, torch.float32) else x.float()


def vnni_applies(layer) -> bool:
    """Every int8 / int4 layout on a CPU that runs the library (int4 groups are multiples of 32)."""
    return layer.weight.device.type == "cpu" and cpu_kernels.available()


# ---- CPU: torch's kernels -----------------------------------------------------------------------------------

@functools.cache
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
    weight = layer.weight
    if weight.data_ptr() % 64:  # the kernel reads it with aligned loads: an unaligned view would crash it
        weight = layer.prepared("cpu-aligned", lambda layer: layer.weight.clone())
    y = torch.ops.aten._weight_int8pack_mm(x16, weight, layer.scales.view(-1).to(torch.bfloat16))
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
    if y.shape[1] != layer.out_features:
        y = y[:, :layer.out_features]
    return y.to(x.dtype)


def _cpu_int4_weight(layer) -> torch.Tensor:
    if cpu_int4_layout_is_native():
        return layer.weight.view(-1, layer.in_features // 2)  # the same bytes: no copy
    q = unpack_int4_blocked(layer.weight, layer.weight.shape[0] * BLOCK_N).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # a second copy, kernel-shaped


def cpu_int4_applies(layer) -> bool:
    return _has_op("_weight_int4pack_mm_for_cpu") and layer.group_size in (32, 64, 128, 256)


def float32_int8(layer, x: torch.Tensor) -> torch.Tensor:
    """Long inputs: a few weight rows at a time converted to float32 (scaled per group, unless one scale
    covers the row, which then scales the product), multiplied in float32."""
    xf = x.float()
    M = x.shape[0]
    N, K = layer.weight.shape
    G = layer.groups
    step = max(32, FLOAT32_SCRATCH_BYTES // (4 * K) // 16 * 16)
    chunks = -(-N // step)
    out = torch.empty(chunks, M, step, dtype=torch.float32, device=x.device)
    w = torch.empty(step, K, dtype=torch.float32, device=x.device)
    for i in range(chunks):
        rows = slice(i * step, min(N, (i + 1) * step))
        n = rows.stop - rows.start
        if G == 1:
            w[:n].copy_(layer.weight[rows])
        else:  # (n, G, group) * (n, G, 1): the broadcast runs along the contiguous group
            torch.mul(layer.weight[rows].view(n, G, K // G), layer.scales[rows].float()[..., None],
                      out=w[:n].view(n, G, K // G))
        torch.matmul(xf, w[:n].t(), out=out[i, :, :n])
    y = out.permute(1, 0, 2).reshape(M, -1)[:, :N]
    if G == 1:
        y = y * layer.scales.view(1, N).float()
    if layer.zeros is not None:  # (q * s + z) . x = (q * s) . x + z . (the group sums of x)
        y = y + xf.view(M, G, K // G).sum(-1) @ layer.zeros.float().t()
    return y.to(x.dtype)


def float32_int4(layer, x: torch.Tensor) -> torch.Tensor:
    """Long inputs: dequantize a few 64-row blocks at a time (FLOAT32_SCRATCH_BYTES) and multiply in
    float32. Rows j and 32 + j of a block share bytes: the low nibbles give q, the high ones
    are read in place as 16 q with the scale divided by 16 (exact). The offset 8 and the zeros apply
    to the product instead: ((q - 8) s + z) . x = (q s) . x + (z - 8 s) . (the group sums of x)."""
    xf = x.float()
    M = x.shape[0]
    blocks, K, _ = layer.weight.shape
    sz = layer.scales_and_zeros.float()  # (G, N_pad, 2)
    G = sz.shape[0]
    group = K // G
    scales = sz[..., 0].view(G, blocks, 2, 32).permute(1, 2, 0, 3).unsqueeze(3).contiguous()  # (B, 2, G, 1, 32)
    scales[:, 1] /= 16
    step = max(1, FLOAT32_SCRATCH_BYTES // (4 * K * BLOCK_N))
    out = torch.empty(blocks * 2, M, 32, dtype=torch.float32, device=x.device)
    w = torch.empty(step, 2, K, 32, dtype=torch.float32, device=x.device)
    nibbles = torch.empty(step, K, 32, dtype=torch.uint8, device=x.device)
    for start in range(0, blocks, step):
        n = min(step, blocks - start)
        packed = layer.weight[start:start + n]  # (n, K, 32)
        for half, mask in ((0, 0x0F), (1, 0xF0)):
            torch.bitwise_and(packed, mask, out=nibbles[:n])
            torch.mul(nibbles[:n].view(n, G, group, 32), scales[start:start + n, half],
                      out=w[:n, half].view(n, G, group, 32))
        torch.matmul(xf, w[:n].view(2 * n, K, 32), out=out[2 * start:2 * (start + n)])
    y = out.permute(1, 0, 2).reshape(M, -1)
    y += xf.view(M, G, group).sum(-1) @ (sz[..., 1] - 8 * sz[..., 0])
    return y[:, :layer.out_features].to(x.dtype)


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
            and layer.in_features % 32 == 0 and _tinygemm_runs_on(layer.weight.device))


@functools.cache
def _tinygemm_runs_on(device: torch.device) -> bool:
    """torch's CUDA int4 kernel needs compute capability 8.0 (Ampere) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


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
    (8, "vnni"): vnni_int8, (4, "vnni"): vnni_int4,
    (8, "cpu"): cpu_int8, (4, "cpu"): cpu_int4,
    (8, "float32"): float32_int8, (4, "float32"): float32_int4,
    (8, "cuda"): cuda_int8, (4, "cuda"): cuda_int4,
}


_APPLIES = {(8, "vnni"): vnni_applies, (4, "vnni"): vnni_applies, (8, "cpu"): cpu_int8_applies,
            (4, "cpu"): cpu_int4_applies, (4, "cuda"): cuda_int4_applies}


def choose(layer, x: torch.Tensor) -> Kernel:
    """The kernel for `layer` and input rows x (M, K): the layer's `kernel` if set, else the fastest that
    applies."""
    bits, name = layer.bits, layer.kernel
    if name == "auto" and x.is_cpu and cpu_kernels.available():  # the common case first: the input's device is the layer's
        return _BY_NAME[bits, "vnni"]
    if name != "auto":
        if name not in KERNELS:
            raise ValueError(f"unknown kernel {name!r}; use one of {', '.join(KERNELS)}")
        if not _APPLIES.get((bits, name), lambda _: True)(layer):
            raise ValueError(f"kernel {name!r} does not apply to {layer}")
        return _BY_NAME[bits, name]
    if x.device.type == "cpu":
        if vnni_applies(layer):  # fastest at every row count; the first call loads (or builds) the library
            return _BY_NAME[bits, "vnni"]
        max_rows, applies = ((INT8_KERNEL_MAX_ROWS, cpu_int8_applies) if bits == 8
                             else (INT4_KERNEL_MAX_ROWS, cpu_int4_applies))
        if x.shape[0] <= max_rows and applies(layer):
            return _BY_NAME[bits, "cpu"]
        return _BY_NAME[bits, "float32"]
    if x.device.type == "cuda" and (bits == 8 or cuda_int4_applies(layer)):
        return _BY_NAME[bits, "cuda"]
    return reference
