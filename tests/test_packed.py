"""The CPU fast path for bf16 weights: every path of PackedLinear against F.linear in float32."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from glmkit import packed
from glmkit.config import ModelConfig
from glmkit.model import ChatGLMForCausalLM
from glmkit.packed import PackedLinear, pack_linears
from glmkit import cpu_kernels

pytestmark = pytest.mark.skipif(not packed.packing_available(), reason="torch was built without oneDNN")


def reference(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)


@pytest.mark.parametrize("out_features, in_features, bias", [
    (128, 64, True),     # blocked layout: multiples of 64 outputs and 32 inputs
    (4608, 256, True),   # the QKV shape's output width, with its bias
    (320, 96, False),
    (100, 64, True),     # odd width: the packed kernel serves long inputs too
    (64, 40, False),
])
@pytest.mark.parametrize("rows", [1, 7, packed.PACKED_MAX_ROWS, packed.PACKED_MAX_ROWS + 1, 130])
@pytest.mark.parametrize("kernel", packed.KERNELS)
def test_packed_linear_matches_float32_reference(out_features, in_features, bias, rows, kernel):
    torch.manual_seed(out_features + rows)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).bfloat16()
    layer = PackedLinear(linear)
    layer.kernel = kernel
    if kernel in ("compiled", "float32") and layer.pairs is None:
        with pytest.raises(ValueError, match="AB16b64a2b"):
            layer(torch.randn(rows, in_features).bfloat16())
        return
    if kernel == "compiled" and not cpu_kernels.available():
        pytest.skip("glmkit's CPU kernels need AVX-512 and a compiler")
    x = torch.randn(rows, in_features).bfloat16()
    want = reference(x, linear)
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # bf16 output rounding (2^-8 relative) plus accumulation-order differences
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()


def test_blocked_layout_is_recognised_or_refused_by_shape():
    linear = torch.nn.Linear(64, 100).bfloat16()
    assert PackedLinear(linear).pairs is None  # 100 outputs are not whole blocks of 64
    linear = torch.nn.Linear(64, 128).bfloat16()
    layer = PackedLinear(linear)
    if layer.pairs is not None:  # oneDNN chose the AB16b64a2b layout on this CPU: its view must be exact
        w = linear.weight.detach()
        pairs = w.reshape(2, 64, 32, 2).contiguous().view(torch.int32).squeeze(-1).transpose(1, 2)
        assert torch.equal(layer.pairs, pairs)


@pytest.mark.parametrize("amx", [True, False])
def test_every_kernel_agrees_and_auto_takes_the_fastest(amx, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512).bfloat16()
    layer = PackedLinear(linear)
    if layer.pairs is None:
        pytest.skip("oneDNN chose another layout on this CPU; only its kernel is used here")
    x = torch.randn(80, 256).bfloat16()
    outputs = {}
    for kernel in ("onednn", "float32") + (("compiled",) if cpu_kernels.available() else ()):
        layer.kernel = kernel
        outputs[kernel] = layer(x).float()
    for out in outputs.values():
        assert (out - outputs["onednn"]).abs().max() <= 1e-2 * outputs["onednn"].abs().max()
    layer.kernel = "auto"
    monkeypatch.setattr(packed, "onednn_has_amx", lambda: amx)  # as on a CPU with / without AMX tiles
    one_row = "compiled" if cpu_kernels.available() else "onednn"
    if amx:  # oneDNN's AMX kernel from two rows on
        assert (layer.choose(1), layer.choose(2), layer.choose(80)) == (one_row, "onednn", "onednn")
    else:
        assert (layer.choose(1), layer.choose(80)) == (one_row, one_row if cpu_kernels.available() else "float32")
    layer.kernel = "mkl"
    with pytest.raises(ValueError, match="unknown kernel 'mkl'"):
        layer(x)


def test_amx_is_reported_as_onednn_finds_it():
    """`onednn_has_amx` agrees with the instruction set oneDNN itself reports (its verbose log, in a fresh
    process since the log is set up once)."""
    code = ("import torch; from glmkit import packed; "
            "torch.nn.functional.linear(torch.ones(4, 64).bfloat16(), torch.ones(64, 64).bfloat16()); "
            "print('AMX', packed.onednn_has_amx())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"})
    assert run.returncode == 0, run.stderr
    isa = next(line for line in run.stdout.splitlines() if ",isa:" in line)
    assert run.stdout.strip().endswith(f"AMX {'Intel AMX with bfloat16' in isa}")


def test_compiled_kernel_rows_do_not_depend_on_each_other():
    """Each output is a float32 sum in a fixed order: a row gives the same bits alone or in any batch, so
    where this kernel takes every row count (CPUs without AMX), batched decoding reproduces one request's
    greedy tokens exactly."""
    if not cpu_kernels.available():
        pytest.skip("glmkit's CPU kernels need AVX-512 and a compiler")
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 192).bfloat16()
    layer = PackedLinear(linear)
    if layer.pairs is None:
        pytest.skip("oneDNN chose another layout on this CPU")
    x = torch.randn(13, 96).bfloat16()  # two full passes of 6 rows and a partial one
    batched = layer(x)
    for i in range(13):
        assert torch.equal(layer(x[i:i + 1]), batched[i:i + 1])
    assert torch.equal(layer(x[5:9]), batched[5:9])
    # Float32 inputs are used as they are (no rounding to bfloat16 first): closer to the float32 product.
    xf = torch.randn(4, 96)
    exact = xf.double() @ linear.weight.double().t() + linear.bias.double()
    assert (layer(xf).double() - exact).abs().max() <= 1e-2 * exact.abs().max()


def test_batched_input_shape_and_other_dtypes():
    linear = torch.nn.Linear(64, 128).bfloat16()
    layer = PackedLinear(linear)
    x = torch.randn(2, 3, 64)
    out = layer(x)  # float32 input: cast for the kernel, returned as float32
    assert out.shape == (2, 3, 128) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="bfloat16 CPU weight"):
        PackedLinear(torch.nn.Linear(4, 4))


def test_packed_model_matches_unpacked_and_frees_the_plain_weights():
    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig.preset("tiny"), padded_vocab_size=512)
    model = ChatGLMForCausalLM(config).bfloat16().eval()
    ids = torch.randint(0, 512, (2, 70))
    with torch.no_grad():
        want = model.float()(ids)
        model.bfloat16()
        plain_linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
        pack_linears(model)
        assert not [m for m in model.modules() if type(m) is torch.nn.Linear]
        assert len([m for m in model.modules() if isinstance(m, PackedLinear)]) == len(plain_linears)
        prompt = model(ids)  # long input: float32 path
        cache = model.new_kv_cache(2, 80)
        model(ids[:, :-1], kv_cache=cache)
        step = model(ids[:, -1:], kv_cache=cache)  # one row each: packed kernel
    scale = want.abs().max()
    assert (prompt.float() - want).abs().max() <= 0.05 * scale
    assert (step[:, -1].float() - want[:, -1]).abs().max() <= 0.05 * scale
