"""Int8Linear, Int4Linear and QuantizedEmbedding: quantized layers that look like nn.Linear / nn.Embedding.

Each holds its quantized tensors as buffers named as in the checkpoint (`layout.py`), so a quantized
checkpoint loads with `load_state_dict` and `state_dict()` writes it back unchanged. `from_float`
quantizes a float layer (the state-dict transform of one layer, `quantized_tensors`, plus the swap).
Forward picks a kernel per call (`kernels.choose`); `kernel = "reference"` forces the dequantize path.
The quantized weights are frozen buffers, but an input that requires grad gets one (through the dequantized
weight), so adapters (glmkit.lora) train on top of quantized layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .layout import (
    BLOCK_N,
    merge_scales_and_zeros,
    pack_int4_blocked,
    pack_int4_rows,
    padded_rows,
    split_scales_and_zeros,
    unpack_int4_blocked,
    unpack_int4_rows,
)
from .scheme import SCALE_DTYPE, Scheme, dequantize, quantize


def quantized_tensors(weight: torch.Tensor, scheme: Scheme, embedding: bool = False) -> dict[str, torch.Tensor]:
    """The buffers (suffix -> tensor) that stand for a float weight (N, K) of a linear (or an embedding)."""
    q, scales, zeros = quantize(weight, scheme)
    if scheme.bits == 8:
        tensors = {"weight": q, "scales": scales}
    elif embedding:
        tensors = {"weight": pack_int4_rows(q), "scales": scales}
    else:
        return {"weight": pack_int4_blocked(q), "scales_and_zeros": merge_scales_and_zeros(scales, zeros)}
    if zeros is not None:
        tensors["zeros"] = zeros
    return tensors


class _QuantizedLinear(nn.Module):
    bits: int

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Scheme,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        if scheme.bits != self.bits:
            raise ValueError(f"{type(self).__name__} stores {self.bits}-bit weights, not {scheme.bits}-bit")
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.groups = scheme.groups(in_features)  # raises unless rows split into whole groups
        self.kernel = "auto"  # or a name in kernels.KERNELS: forces that kernel
        self._prepared: dict[str, tuple[int, torch.Tensor]] = {}
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @property
    def group_size(self) -> int:
        return self.scheme.group_size

    @property
    def symmetric(self) -> bool:
        return self.scheme.symmetric

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: Scheme, dtype: torch.dtype | None = None) -> _QuantizedLinear:
        """A quantized copy of `linear` (on its device); the bias is kept in `dtype` (default: its own)."""
        bias = linear.bias
        dtype = dtype or (bias.dtype if bias is not None else torch.bfloat16)
        layer = cls(linear.in_features, linear.out_features, bias is not None, scheme, dtype, device="meta")
        state = quantized_tensors(linear.weight.detach(), scheme)
        if bias is not None:
            state["bias"] = bias.detach().to(dtype)
        layer.load_state_dict(state, assign=True)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects {self.in_features} input features, got {x.shape[-1]}")
        x2 = x.reshape(-1, self.in_features)
        if x2.requires_grad and torch.is_grad_enabled():
            y = _InputGrad.apply(x2, self)
        else:
            y = kernels.choose(self, x2)(self, x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def prepared(self, key: str, make: Callable[[_QuantizedLinear], torch.Tensor]) -> torch.Tensor:
        """A kernel's form of the weight, made once and remade if the weight buffer is replaced."""
        ptr = self.weight.data_ptr()
        held = self._prepared.get(key)
        if held is None or held[0] != ptr:
            self._prepared[key] = held = (ptr, make(self))
        return held[1]

    def _apply(self, fn, recurse=True):
        self._prepared.clear()  # a kernel's form of the weight goes with the weight it was made from
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        group = "per row" if self.group_size == 0 else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{group}, symmetric={self.symmetric}")


class _InputGrad(torch.autograd.Function):
    """y = kernel(x) forward (autograd off: kernels write into `out=` buffers); backward, the input's gradient
    grad @ W with W the dequantized weight. The weight and bias are buffers: they get none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: _QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return kernels.choose(layer, x)(layer, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return kernels.input_grad(ctx.layer, grad), None


class Int8Linear(_QuantizedLinear):
    """nn.Linear with int8 weights: W = q * scale (+ zero) per group; weight (N, K) int8, scales (N, G)."""
    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Scheme,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, scheme, dtype, device)
        shape = (out_features, self.groups)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(shape, dtype=SCALE_DTYPE, device=device))
        zeros = None if scheme.symmetric else torch.empty(shape, dtype=SCALE_DTYPE, device=device)
        self.register_buffer("zeros", zeros)

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) weight this layer stands for."""
        return self.dequantize_rows(0, self.out_features)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the float32 weight."""
        zeros = None if self.zeros is None else self.zeros[start:stop]
        return dequantize(self.weight[start:stop], self.scales[start:stop], zeros, self.scheme)


class Int4Linear(_QuantizedLinear):
    """nn.Linear with int4 weights: W = (q - 8) * scale + zero per group, in the blocked layout of
    `layout.py`: weight (ceil(N/64), K, 32) uint8, scales_and_zeros (G, N padded, 2)."""
    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Scheme,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, scheme, dtype, device)
        if in_features % 2:
            raise ValueError(f"int4 packs two inputs to a byte: in_features={in_features} is odd")
        blocks = padded_rows(out_features) // BLOCK_N
        self.register_buffer("weight", torch.empty(blocks, in_features, BLOCK_N // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales_and_zeros", torch.empty(self.groups, blocks * BLOCK_N, 2, dtype=SCALE_DTYPE,
                                                             device=device))

    @property
    def zeros(self) -> None:
        return None  # part of scales_and_zeros

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) weight this layer stands for."""
        return self.dequantize_rows(0, self.out_features)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the float32 weight (unpacking only the 64-row blocks that hold them)."""
        first, last = start // BLOCK_N, -(-stop // BLOCK_N)
        q = unpack_int4_blocked(self.weight[first:last], (last - first) * BLOCK_N)
        q = q[start - first * BLOCK_N:stop - first * BLOCK_N]
        scales, zeros = split_scales_and_zeros(self.scales_and_zeros, self.out_features)
        return dequantize(q, scales[start:stop], zeros[start:stop], self.scheme)


class QuantizedEmbedding(nn.Module):
    """nn.Embedding with int8 or int4 rows; a lookup dequantizes only the rows it reads, into `dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.scheme, self.dtype = scheme, dtype
        groups = scheme.groups(embedding_dim)
        width = embedding_dim if scheme.bits == 8 else embedding_dim // 2
        qtype = torch.int8 if scheme.bits == 8 else torch.uint8
        if scheme.bits == 4 and embedding_dim % 2:
            raise ValueError(f"int4 packs two values to a byte: embedding_dim={embedding_dim} is odd")
        self.register_buffer("weight", torch.empty(num_embeddings, width, dtype=qtype, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", None if scheme.symmetric else
                             torch.empty(num_embeddings, groups, dtype=SCALE_DTYPE, device=device))

    @classmethod
    def from_float(cls, embedding: nn.Embedding, scheme: Scheme,
                   dtype: torch.dtype | None = None) -> QuantizedEmbedding:
        weight = embedding.weight.detach()
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, scheme, dtype or weight.dtype, device="meta")
        layer.load_state_dict(quantized_tensors(weight, scheme, embedding=True), assign=True)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids.reshape(-1), self.weight)
        q = unpack_int4_rows(rows) if self.scheme.bits == 4 else rows
        zeros = None if self.zeros is None else F.embedding(ids.reshape(-1), self.zeros)
        w = dequantize(q, F.embedding(ids.reshape(-1), self.scales), zeros, self.scheme)
        return w.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def dequantize(self) -> torch.Tensor:
        q = unpack_int4_rows(self.weight) if self.scheme.bits == 4 else self.weight
        return dequantize(q, self.scales, self.zeros, self.scheme)

    def extra_repr(self) -> str:
        group = "per row" if self.scheme.group_size == 0 else f"group_size={self.scheme.group_size}"
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.scheme.bits}, {group}"
