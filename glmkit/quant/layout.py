"""How quantized tensors are laid out, in memory and in checkpoints (the two are the same).

int8 linear (N outputs, K inputs):
    weight  int8 (N, K)                  q, row-major
    scales  bfloat16 (N, groups)         zeros bfloat16 (N, groups), asymmetric only

int4 linear: blocks of 64 output rows, each stored input by input, two rows to a byte:
    weight  uint8 (ceil(N / 64), K, 32)  byte [b, k, j] = q[64b + j, k] | q[64b + 32 + j, k] << 4
    scales_and_zeros  bfloat16 (groups, N padded to 64, 2)   [..., 0] scale, [..., 1] zero
Rows past N (padding) hold q = 8 with scale and zero 0, so they are 0. This is the layout torch's int4
CPU kernel (`_weight_int4pack_mm_for_cpu`) reads on AVX-512 CPUs, so a checkpoint maps straight into it;
other kernels convert from it when the model is prepared (`kernels.py`). Symmetric int4 stores zeros of 0,
which the kernels read anyway.

int4 embedding rows (and the layout CUDA's int4 packing starts from): two inputs to a byte,
    weight  uint8 (N, K / 2)             byte [n, j] = q[n, 2j] << 4 | q[n, 2j + 1]
"""

from __future__ import annotations

import torch

BLOCK_N = 64  # output rows per int4 block


def padded_rows(n: int) -> int:
    return -(-n // BLOCK_N) * BLOCK_N


def pack_int4_blocked(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) with values 0..15 -> uint8 (ceil(N/64), K, 32), padding rows with 8 (= weight 0)."""
    N, K = q.shape
    q = q.to(torch.uint8)
    if N % BLOCK_N:
        q = torch.cat((q, q.new_full((padded_rows(N) - N, K), 8)))
    blocks = q.view(-1, BLOCK_N, K)  # (B, 64, K)
    return (blocks[:, :32] | (blocks[:, 32:] << 4)).transpose(1, 2).contiguous()


def unpack_int4_blocked(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """uint8 (B, K, 32) -> q (rows, K) uint8, the first `rows` of the 64 * B stored."""
    B, K, _ = packed.shape
    q = torch.cat((packed & 15, packed >> 4), dim=2)  # (B, K, 64): rows j and 32 + j of each block
    return q.transpose(1, 2).reshape(B * BLOCK_N, K)[:rows]


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) with values 0..15, K even -> uint8 (N, K/2), the even input in the high half of a byte."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 rows pack two inputs to a byte: {q.shape[-1]} inputs is odd")
    q = q.to(torch.uint8)
    return (q[..., 0::2] << 4) | q[..., 1::2]


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K/2) -> q (..., K) uint8."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).flatten(-2)


def merge_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """scales, zeros (N, G) -> (G, N padded to 64, 2), padding rows 0; zeros None means 0."""
    N, G = scales.shape
    out = scales.new_zeros(G, padded_rows(N), 2)
    out[:, :N, 0] = scales.t()
    if zeros is not None:
        out[:, :N, 1] = zeros.t()
    return out


def split_scales_and_zeros(merged: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, N_pad, 2) -> scales, zeros, each (rows, G)."""
    return merged[:, :rows, 0].t(), merged[:, :rows, 1].t()
