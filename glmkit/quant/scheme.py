"""How weights become integers: the quantization settings and the group-wise math.

A weight matrix W (N outputs, K inputs) is cut into groups of `group_size` consecutive inputs of one
output row (group size 0: one group per row, "per channel"). Each group has a scale s and a zero z, and

    W ~= (q - offset) * s + z

with q an integer: int8 q in [-128, 127] with offset 0; int4 q in [0, 15] with offset 8 (the convention of
torch's int4 kernels, which read exactly this formula). Symmetric: z = 0 and s = max|W| / qmax.
Asymmetric: s = (max - min) / (levels - 1) and z places min on the lowest level.

Scales and zeros are bfloat16, what the kernels read. A scale is rounded *up* to bfloat16 before q is
computed, so |W| / s never leaves the integer range: every weight of a symmetric group is within s/2 of
its dequantized value; an asymmetric group adds the rounding of z to bfloat16 (at most |z| * 2^-9).

This module is the math on plain (N, K) integer tensors; how they are laid out in memory and on disk
is `layout`, and the modules that multiply with them are `linear`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

MODES = ("int8", "int4")
LAYER_MODES = (*MODES, "none")  # the embedding and the output layer may also stay in floating point
GROUP_SIZES = (0, 32, 64, 128, 256)  # 0: one group per output row
DEFAULT_GROUP_SIZE = {"int8": 0, "int4": 128}
BITS = {"int8": 8, "int4": 4}
SCALE_DTYPE = torch.bfloat16
# Rows quantized at a time: bounds the float32 scratch of a large matrix (27392 x 4096) to ~64 MB.
_ROWS_PER_CHUNK = 4096


class QuantConfigError(ValueError):
    """Quantization settings glmkit cannot use, with the reason."""


@dataclass(frozen=True)
class Scheme:
    """How one tensor is quantized."""
    bits: int  # 8 or 4
    group_size: int  # 0: one group per row
    symmetric: bool

    @property
    def offset(self) -> int:
        return 8 if self.bits == 4 else 0

    @property
    def qmin(self) -> int:
        return 0 if self.bits == 4 else -128

    @property
    def qmax(self) -> int:
        return 15 if self.bits == 4 else 127

    def groups(self, in_features: int) -> int:
        """Groups per row; raises when the row does not split into whole groups."""
        if self.group_size == 0:
            return 1
        if in_features % self.group_size:
            raise QuantConfigError(f"a row of {in_features} inputs does not split into groups of "
                                   f"{self.group_size}; choose a group size that divides it")
        return in_features // self.group_size


@dataclass(frozen=True)
class QuantConfig:
    """The quantization of a whole model; written to config.json and the safetensors metadata.

    mode: the transformer blocks' linears, "int8" or "int4". group_size: inputs per scale (32, 64, 128,
    256, or 0 for one scale per output row); None means the mode's default (int8: 0, int4: 128).
    symmetric: zero points or not. embedding / output: how the input embedding and the output layer are
    stored, "int8", "int4" or "none" (the model's float dtype); they use the main group size when their
    mode is the main mode, else their own mode's default.
    """
    mode: str
    group_size: int | None = None
    symmetric: bool = True
    embedding: str = "int8"
    output: str = "int8"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QuantConfigError(f"quantization mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE[self.mode])
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise QuantConfigError(f"group size {self.group_size!r} is not supported; use one of "
                                   f"{', '.join(map(str, GROUP_SIZES[1:]))}, or 0 for one scale per output row")
        if self.mode == "int4" and self.group_size == 0:
            raise QuantConfigError("int4 needs groups (32, 64, 128 or 256 inputs per scale); one scale per "
                                   "output row is for int8")
        if not isinstance(self.symmetric, bool):
            raise QuantConfigError(f"symmetric={self.symmetric!r} must be true or false")
        for name in ("embedding", "output"):
            if getattr(self, name) not in LAYER_MODES:
                raise QuantConfigError(f"{name}={getattr(self, name)!r}; use one of {', '.join(LAYER_MODES)}")

    def scheme(self, layer_mode: str | None = None) -> Scheme | None:
        """The scheme of the blocks' linears, or of a layer stored as `layer_mode` (None for "none")."""
        mode = self.mode if layer_mode is None else layer_mode
        if mode == "none":
            return None
        group = self.group_size if mode == self.mode else DEFAULT_GROUP_SIZE[mode]
        return Scheme(BITS[mode], group, self.symmetric)

    def to_dict(self) -> dict[str, Any]:
        return {"format": 1, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Any) -> QuantConfig:
        if not isinstance(d, dict):
            raise QuantConfigError(f"quantization settings must be an object, got {type(d).__name__}")
        if d.get("format", 1) != 1:
            raise QuantConfigError(f"quantization format {d.get('format')!r} is newer than this glmkit (1)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"format"})
        if unknown:
            raise QuantConfigError(f"unknown quantization setting(s): {', '.join(unknown)}")
        if "mode" not in d:
            raise QuantConfigError("quantization settings lack the mode (int8 or int4)")
        return cls(**{k: v for k, v in d.items() if k in known})


def as_quant_config(quantize: QuantConfig | str | None) -> QuantConfig | None:
    """A QuantConfig from a mode name ("int8", "int4"), a QuantConfig, or None."""
    if quantize is None or isinstance(quantize, QuantConfig):
        return quantize
    if isinstance(quantize, str):
        return QuantConfig(quantize)
    raise TypeError(f"quantize must be 'int8', 'int4' or a QuantConfig, got {type(quantize).__name__}")


# ---- the math ----------------------------------------------------------------------------------------------

def quantize(weight: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, scales, zeros) of a float (N, K) weight: q (N, K) int8 (8 bits) or uint8 (4 bits, 0..15),
    scales and zeros (N, groups) bfloat16; zeros is None when symmetric. Computed in float32, rows in chunks."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize expects a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    N, K = weight.shape
    G = scheme.groups(K)
    q = torch.empty(N, K, dtype=torch.uint8 if scheme.bits == 4 else torch.int8, device=weight.device)
    scales = torch.empty(N, G, dtype=SCALE_DTYPE, device=weight.device)
    zeros = None if scheme.symmetric else torch.empty(N, G, dtype=SCALE_DTYPE, device=weight.device)
    for start in range(0, N, _ROWS_PER_CHUNK):
        rows = slice(start, min(N, start + _ROWS_PER_CHUNK))
        w = weight[rows].to(torch.float32, copy=True).view(-1, G, K // G)  # (n, G, group), scratch
        s, z, levels = _group_scales(w, scheme)
        scales[rows] = s
        if zeros is not None:
            zeros[rows] = z
        q[rows] = levels.view(-1, K).to(q.dtype)
    return q, scales, zeros


def _group_scales(w: torch.Tensor, scheme: Scheme):
    """Scales, zeros and integer levels of float32 groups w (n, G, group); w is overwritten."""
    lo, hi = torch.aminmax(w, dim=-1)  # (n, G)
    if scheme.symmetric:
        top = scheme.qmax - scheme.offset  # 7 or 127: symmetric grids stay within +-top
        scale = _round_up_bf16(torch.maximum(hi, -lo) / top)
        zero = None
    else:
        scale = _round_up_bf16((hi - lo) / (scheme.qmax - scheme.qmin))
        zero = (lo + (scheme.offset - scheme.qmin) * scale.float()).to(SCALE_DTYPE)  # puts lo on qmin
        w -= zero.float()[..., None]
    s = scale.float()
    inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))  # an all-equal group: q = offset
    levels = w.mul_(inverse[..., None]).round_().add_(scheme.offset).clamp_(scheme.qmin, scheme.qmax)
    return scale, zero, levels


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """x (float32, >= 0) as bfloat16, rounded towards +inf so that x <= result."""
    y = x.to(SCALE_DTYPE)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """The float32 (N, K) weight that (q, scales, zeros) stand for: (q - offset) * s + z per group."""
    N, K = q.shape
    G = scales.shape[-1]
    w = (q.float() - scheme.offset).view(N, G, K // G) * scales.float()[..., None]
    if zeros is not None:
        w += zeros.float()[..., None]
    return w.view(N, K)
