"""The CPU fast path for bfloat16 weights: linears whose weights are prepacked for oneDNN.

Why: on a CPU, decoding reads every weight once per token, so its speed is the memory bandwidth the
matrix-vector kernel reaches. torch's plain bf16 `F.linear` reaches about 60% of it; oneDNN with the
weight reordered once into its blocked layout (what inductor's weight freezing does) about 80-90%.

Several rows at once (prompts, batched decoding) are compute-bound. On CPUs with AMX (bfloat16 tile
units, e.g. Xeon 4th generation and later) oneDNN multiplies the packed weight on them: 2x glmkit's own
kernel at 16 rows, 6x at 256 rows (2 threads, the serving benchmark's shapes), so there every call of two
rows or more goes to oneDNN. Without AMX, the same CPUs multiply float32 about 1.5x faster than oneDNN's bf16
kernel, so the packed weight is also read a second way: on CPUs with AVX512-BF16, oneDNN's layout is
`AB16b64a2b` — blocks of 64 output features, each a (K/2, 64) table of pairs of bf16 inputs. Seen as int32,
a pair becomes two float32 values by two bit operations. glmkit's compiled kernel (`glmkit.cpu_kernels`,
csrc/bf16_linear.cpp) does exactly that in registers and multiplies in float32: 1.1-1.3x oneDNN's speed at
one row (where it is used with or without AMX), and without AMX 1.4-1.8x at 4-64 rows and 1.15-1.5x MKL's
float32 product at 128-256 rows. Without the compiled kernels, long inputs unpack a few blocks to float32
at a time for a batched float32 matmul (unless AMX is there), and short ones use oneDNN. The layout is
checked when the weight is packed; where it differs (another CPU, odd shapes), every input uses oneDNN's
kernel.

One copy of the weight exists: the packed one. This is a module swap (`pack_linears`), so the model
file does not change; `PackedLinear.forward` matches `F.linear` to bf16 rounding.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from . import cpu_kernels

# Without the compiled kernel: rows at or below this go through oneDNN's bf16 kernel; above it the
# float32 path is faster.
PACKED_MAX_ROWS = 48
# A layer's `kernel`: "auto" picks the fastest that applies; the others force one (tests, benchmarks).
KERNELS = ("auto", "compiled", "onednn", "float32")
# Output blocks (of 64 features) unpacked to float32 at a time: 4 blocks x K 4096 = 4 MB of scratch.
BLOCKS_PER_STEP = 4
_BLOCK_N, _BLOCK_K = 64, 32


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_has_amx() -> bool:
    """Whether oneDNN multiplies bf16 on AMX tiles here: the CPU has them and the OS lets this process use
    them (the permission request, as oneDNN's own, is what `_init_amx` makes)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.7
    if capabilities is None or not capabilities().get("amx_bf16"):
        return False
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    return bool(init_amx()) if init_amx is not None else True


def _blocked_pairs(packed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The packed weight's memory seen as (N/64, K/2, 64) int32 bf16 pairs, if it is `AB16b64a2b`.

    The view aliases the packed tensor's memory: whoever holds it must hold `packed` too.
    """
    N, K = weight.shape
    if N % _BLOCK_N or K % _BLOCK_K or torch.ops.mkldnn._nbytes(packed) != N * K * 2:
        return None
    words = N * K // 2
    raw = torch.frombuffer((ctypes.c_int32 * words).from_address(torch.ops.mkldnn.data_ptr(packed)),
                           dtype=torch.int32)
    pairs = raw.view(N // _BLOCK_N, K // 2, _BLOCK_N)
    # Check the layout on the first and last output blocks: (a, b) sits at [a/64][b/32][b%32/2][a%64][b%2].
    for block in (0, N // _BLOCK_N - 1):
        rows = weight[block * _BLOCK_N:(block + 1) * _BLOCK_N]  # (64, K)
        expected = rows.reshape(_BLOCK_N, K // 2, 2).contiguous().view(torch.int32).squeeze(-1).t()
        if not torch.equal(pairs[block], expected):
            return None
    return pairs


class PackedLinear(nn.Module):
    """`nn.Linear` for a bf16 weight on the CPU, held once, packed for oneDNN."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        if w.dtype != torch.bfloat16 or w.device.type != "cpu":
            raise ValueError(f"PackedLinear needs a bfloat16 CPU weight, got {w.dtype} on {w.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Opaque to autograd and state_dict: plain attributes, not parameters.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
        self.pairs = _blocked_pairs(self.packed, w)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.kernel = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        kernel = self.choose(x2.shape[0])
        if kernel == "compiled":
            out = torch.ops.glmkit_cpu.bf16_linear(x2, self.pairs)
        elif kernel == "onednn":
            out = torch.ops.mkldnn._linear_pointwise(x2.to(torch.bfloat16), self.packed, None, "none", [], "")
        else:
            out = self._float32_matmul(x2)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*shape, self.out_features)

    def choose(self, rows: int) -> str:
        """The kernel for `rows` input rows: the layer's `kernel` if set (and possible here), else the fastest."""
        if self.kernel == "auto":
            if rows > 1 and onednn_has_amx():
                return "onednn"
            if self.pairs is not None and cpu_kernels.available():
                return "compiled"
            return "onednn" if rows <= PACKED_MAX_ROWS or self.pairs is None else "float32"
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; use one of {', '.join(KERNELS)}")
        if self.kernel != "onednn" and self.pairs is None:
            raise ValueError(f"kernel {self.kernel!r} needs oneDNN's AB16b64a2b layout, which this weight lacks")
        if self.kernel == "compiled" and not cpu_kernels.available():
            raise ValueError("kernel 'compiled' needs glmkit's CPU kernels, which are not available here")
        return self.kernel

    def _float32_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ weight.T in float32 straight from the packed pairs; returns (M, N) bf16."""
        M, K = x.shape
        blocks = self.pairs.shape[0]
        # Pair p of a row holds inputs 2p (low half) and 2p+1 (high half): order x the same way.
        x_pairs = torch.cat((x[:, 0::2], x[:, 1::2]), dim=1).float()  # (M, K)
        out = torch.empty(blocks, M, _BLOCK_N)
        scratch = torch.empty(BLOCKS_PER_STEP, 2, K // 2, _BLOCK_N)  # float32 weights, (even; odd) inputs
        bits = scratch.view(torch.int32)
        for start in range(0, blocks, BLOCKS_PER_STEP):
            n = min(BLOCKS_PER_STEP, blocks - start)
            pairs = self.pairs[start:start + n]
            torch.bitwise_left_shift(pairs, 16, out=bits[:n, 0])  # low bf16 -> float32
            torch.bitwise_and(pairs, -65536, out=bits[:n, 1])  # high bf16 -> float32
            torch.matmul(x_pairs, scratch[:n].view(n, K, _BLOCK_N), out=out[start:start + n])
        return out.permute(1, 0, 2).reshape(M, blocks * _BLOCK_N).to(torch.bfloat16)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel} "
                f"(now: {self.choose(1)} for one row, {self.choose(PACKED_MAX_ROWS + 1)} for many)")


def pack_linears(model: nn.Module) -> nn.Module:
    """Swap every bf16 CPU `nn.Linear` of `model` for a `PackedLinear`, one at a time so that the peak
    memory grows by one weight, not by the model. Returns the model, now for inference only."""
    if not packing_available():
        return model
    # Hold parents only: a list holding the old linears would keep every unpacked weight alive.
    parents = [m for m in model.modules() if not isinstance(m, nn.Linear)]
    for parent in parents:
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 \
                    and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child))
    return model
