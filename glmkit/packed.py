"""The CPU fast path for bfloat16 weights: linears whose weights are prepacked for oneDNN.

Why: on a CPU, decoding reads every weight once per token, so its speed is the memory bandwidth that
the matrix-vector kernel reaches. torch's plain bf16 `F.linear` reaches about 60% of it; oneDNN with
weights reordered once into its blocked layout (what inductor's weight freezing does) about 80%.
For prompts (many rows at once) the same CPU multiplies float32 faster than bf16, so a long input
unpacks one column block of the weight at a time to float32 and multiplies in float32.

One copy of the weight exists: the packed blocks. This is a module swap (`pack_linears`), so the
model file does not change; `PackedLinear.forward` matches `F.linear` to bf16 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows at or below this go through the packed bf16 kernel; above it the float32 path is faster.
PACKED_MAX_ROWS = 32
# Output features per packed block: small enough that one block unpacked to float32 stays modest.
BLOCK_OUT_FEATURES = 4096


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`nn.Linear` for bf16 weights on CPU, weights held as oneDNN-packed column blocks."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        if w.dtype != torch.bfloat16 or w.device.type != "cpu":
            raise ValueError(f"PackedLinear needs a bfloat16 CPU weight, got {w.dtype} on {w.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Packed tensors are opaque to autograd and state_dict: keep them as plain attributes.
        self.blocks = [torch.ops.mkldnn._reorder_linear_weight(b.contiguous(), 1)
                       for b in w.split(BLOCK_OUT_FEATURES)]
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= PACKED_MAX_ROWS:
            x2 = x2.to(torch.bfloat16)
            outs = [torch.ops.mkldnn._linear_pointwise(x2, b, None, "none", [], "") for b in self.blocks]
        else:
            x2 = x2.float()
            outs = [F.linear(x2, b.to_dense(torch.float32)) for b in self.blocks]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={len(self.blocks)}"


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
