"""glmkit's VNNI CPU kernels: the activation rounding they document, their products, threads, fallback.

The kernels quantize each input row to int8 per block of 32 inputs (dx = max|x| / 127, xq = round(x / dx),
half to even) and then compute exactly sum_k W_k * dx * xq_k with W the dequantized weight; what remains is
float32 rounding. So they are checked in two steps: the rounding bit for bit against `quantize_rows` below,
and the product against x_int8 @ W.T in float64 within the float32 rounding of the terms they add: at most
K/32 + 2G + 16 roundings of 2^-24 each, on terms no larger than |x_int8| @ (|W| + 16 s + |z|) (the int4 kernel
sums q * s with q up to 15 and takes 8 s off, so it handles up to 16 s per weight): 2^-16 of that covers
every shape here (K <= 4096). A bfloat16 output adds its rounding, 2^-8 of the result (7 fraction bits).
The derived bound against the float linear (weight and activation rounding together) is in test_quant.py.
"""

from __future__ import annotations

import ctypes
import warnings

import pytest
import torch
import torch.nn.functional as F

from glmkit import cpu_kernels
from glmkit.quant import Int4Linear, Int8Linear, Scheme, kernels

SCHEMES = [Scheme(8, 0, True), Scheme(8, 0, False), Scheme(8, 32, True), Scheme(8, 64, False), Scheme(8, 128, True),
           Scheme(4, 32, True), Scheme(4, 64, False), Scheme(4, 128, True), Scheme(4, 32, False)]
# odd N, padded blocks, K % 64 == 32; K % 32 != 0 and K % 4 != 0 (int8 per row only; no tiles for the latter)
SHAPES = [(37, 128), (64, 256), (100, 192), (70, 160), (320, 128), (24, 100), (5, 38)]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented activation rounding: (xq (M, K padded to 64) int8, dx (M, blocks) float32), in float32
    arithmetic as the kernel does it (127 / max|x| is a division: torch's `127 / t` is a reciprocal times 127)."""
    M, K = x.shape
    blocks = F.pad(x.float(), (0, -K % 64)).view(M, -1, 32)
    amax = blocks.abs().amax(-1)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inverse[..., None]).to(torch.int8)
    return xq.view(M, -1), amax / 127


def dequantized_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: dx * xq, float64, (M, K)."""
    xq, dx = quantize_rows(x)
    M, K = x.shape
    return (xq.double().view(M, -1, 32) * dx.double()[..., None]).view(M, -1)[:, :K]


def layer_for(scheme: Scheme, n: int, k: int, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight[-1] += 0.1  # a row away from zero: the zero points matter
    return (Int8Linear if scheme.bits == 8 else Int4Linear).from_float(linear, scheme, dtype)


def scale_magnitude(layer) -> torch.Tensor:
    """(N, K): |W| + 16 s + |z| per weight, the largest terms the kernels' float arithmetic adds up."""
    from glmkit.quant.layout import split_scales_and_zeros

    if layer.bits == 8:
        scales, zeros = layer.scales, layer.zeros
    else:
        scales, zeros = split_scales_and_zeros(layer.scales_and_zeros, layer.out_features)
    k, groups = layer.in_features, scales.shape[1]
    total = 16 * scales.double()
    if zeros is not None:
        total = total + zeros.double().abs()
    return layer.dequantize().double().abs() + total.repeat_interleave(k // groups, dim=1)


def test_this_machine_builds_the_kernels_where_its_cpu_can_run_them():
    import shutil

    can = cpu_kernels.missing_cpu_features() is None and shutil.which("ninja") and shutil.which("c++")
    if can:
        assert cpu_kernels.available(), "the CPU has AVX-512 VNNI and a compiler is present, but the kernels did not load"
    else:  # then the layers must still work, on torch's kernels (test_fallback_* below)
        assert not cpu_kernels.available()


needs_vnni = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU lacks AVX-512 VNNI/VBMI, or no compiler")


@needs_vnni
@pytest.mark.parametrize("k", [32, 100, 160, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_are_quantized_exactly_as_documented(k, dtype):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(3, k, generator=g) * torch.rand(3, k, generator=g) * 4).to(dtype)
    x[0, :min(k, 32)] = 0  # an all-zero block: dx = 0, xq = 0
    x[1, k // 2] = 300.0  # an outlier: its block's others round to few levels
    x[2, :4] = torch.tensor([0.5, -0.5, 1.5, 127.0]).to(dtype)  # ties round half to even: 0, 0, 2 at dx = 1
    xq, dx = torch.ops.glmkit_cpu.quantize_rows(x)
    want_q, want_dx = quantize_rows(x)
    assert torch.equal(xq, want_q) and torch.equal(dx, want_dx)
    assert xq[2, :4].tolist() == [0, 0, 2, 127]


def run_kernel(layer, x: torch.Tensor) -> torch.Tensor:
    layer.kernel = "vnni"
    return layer(x)


@needs_vnni
@pytest.mark.parametrize("scheme, n, k", [(scheme, n, k) for scheme in SCHEMES for n, k in SHAPES
                                          if k % max(scheme.group_size, 1) == 0], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 5, 13])  # 13: the tiled kernels (8 rows and more)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_compute_the_product_with_the_quantized_activations(scheme, n, k, rows, dtype):
    layer = layer_for(scheme, n, k, dtype, seed=n * k + rows)
    x = (torch.randn(rows, k) * torch.rand(rows, k) * 3).to(dtype)
    got = run_kernel(layer, x)
    assert got.dtype == dtype and got.shape == (rows, n)
    xd = dequantized_rows(x)
    want = xd @ layer.dequantize().double().t()
    tolerance = 2**-16 * (xd.abs() @ scale_magnitude(layer).t())
    if dtype == torch.bfloat16:
        tolerance += 2**-8 * want.abs()
    assert ((got.double() - want).abs() <= tolerance + 1e-12).all()


def amx_tiles_or_skip() -> None:
    if not torch.ops.glmkit_cpu.amx_usable():
        pytest.skip("this CPU (or the OS) gives no AMX tiles: prompts use the AVX-512 paths here")


@needs_vnni
def test_amx_is_reported_as_the_cpu_has_it():
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    if not {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(flags):
        assert not torch.ops.glmkit_cpu.amx_usable()
    else:  # the CPU has them: usable when Linux hands out their state (arch_prctl ARCH_REQ_XCOMP_PERM, 5.16+)
        libc = ctypes.CDLL(None, use_errno=True)
        granted = libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl on x86-64, XFEATURE_XTILEDATA
        assert torch.ops.glmkit_cpu.amx_usable() == granted


@needs_vnni
@pytest.mark.parametrize("scheme, n, k", [(scheme, n, k) for scheme in SCHEMES for n, k in SHAPES
                                          if k % max(scheme.group_size, 1) == 0 and k % 4 == 0], ids=str)
def test_amx_tiles_compute_the_bfloat16_product(scheme, n, k):
    """Prompts of 64 rows or more on AMX tiles: x rounded to bfloat16 times the weight dequantized to bfloat16,
    summed in float32 (bounded here by 2^-12 of |x| @ |W|, as the weight's rounding may fall on either side of
    a tie), for every layout, partial tiles (97 rows) and both dtypes; a row's result is its own, whatever
    rows share its tiles."""
    amx_tiles_or_skip()
    layer = layer_for(scheme, n, k, torch.float32, seed=n + k)
    vnni = kernels.vnni_int8 if scheme.bits == 8 else kernels.vnni_int4
    w = layer.dequantize().bfloat16().double()
    for rows in (64, 97):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(rows, k) * torch.rand(rows, k) * 3).to(dtype)
            got = vnni(layer, x)
            assert got.dtype == dtype and got.shape == (rows, n)
            xb = x.bfloat16().double()
            want = xb @ w.t()
            tolerance = 2**-12 * (xb.abs() @ w.abs().t())
            if dtype == torch.bfloat16:
                tolerance += 2**-8 * want.abs()
            assert ((got.double() - want).abs() <= tolerance + 1e-12).all()
            assert not torch.equal(got, vnni(layer, x, amx=False))  # the int8-rounded inputs' path differs
        assert torch.equal(got[rows - 64:], vnni(layer, x[rows - 64:]))


@needs_vnni
@pytest.mark.parametrize("rows", [7, 19])  # streamed weights; tiles of 16 weight rows, 8 inputs at a time
def test_row_chunks_and_thread_counts_do_not_change_a_result(rows):
    """Outputs are split over threads, each computed by one thread in a fixed order: 1 and 2 threads agree
    bit for bit. The int4 kernels sum in the same order for any row count, so one row at a time agrees too;
    the int8 ones differ in float32 order between their streamed and tiled forms."""
    before = torch.get_num_threads()
    for scheme in (Scheme(8, 0, True), Scheme(4, 128, False)):
        layer = layer_for(scheme, 300, 256, torch.float32, seed=3)
        x = torch.randn(rows, 256)
        try:
            torch.set_num_threads(1)
            one = run_kernel(layer, x)
            torch.set_num_threads(2)
            two = run_kernel(layer, x)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(one, two)
        singles = torch.cat([run_kernel(layer, x[i:i + 1]) for i in range(rows)])
        if scheme.bits == 4:
            assert torch.equal(one, singles)
        else:
            torch.testing.assert_close(one, singles, rtol=1e-5, atol=1e-5)


@needs_vnni
def test_the_int4_kernel_reads_the_checkpoint_layout_in_place():
    layer = layer_for(Scheme(4, 32, True), 64, 128, torch.float32, seed=0)
    x = torch.randn(1, 128)
    before = run_kernel(layer, x)
    with torch.no_grad():
        layer.weight[0, :, 0] ^= 0x0F  # flip row 0's low nibbles in the stored bytes
    after = run_kernel(layer, x)
    assert not torch.equal(before[:, 0], after[:, 0]) and torch.equal(before[:, 1:], after[:, 1:])


@needs_vnni
def test_bad_inputs_are_clear_errors():
    layer = layer_for(Scheme(4, 32, True), 64, 128, torch.float32, seed=0)
    with pytest.raises(ValueError, match="expects 128 input features, got 64"):
        layer(torch.randn(2, 64))
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.glmkit_cpu.int4_linear(torch.randn(1, 96), layer.weight, layer.scales_and_zeros, 32, 64)
    with pytest.raises(RuntimeError, match="group size 48"):
        torch.ops.glmkit_cpu.int4_linear(torch.randn(1, 128), layer.weight, layer.scales_and_zeros, 48, 64)


@needs_vnni
def test_torch_compile_traces_through_the_kernels():
    """The ops have shape functions and the availability check is a constant: one graph, same result."""
    layer = layer_for(Scheme(4, 32, True), 40, 64, torch.bfloat16, seed=0)
    x = torch.randn(3, 64).bfloat16()
    compiled = torch.compile(lambda t: layer(t) * 2, backend="eager", fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's note that it looks through functools.cache
        assert torch.equal(compiled(x), layer(x) * 2)


# ---- fallback: no compiler, another CPU, opted out ----------------------------------------------------------

@pytest.fixture
def fresh_vnni():
    """`cpu_kernels.available()` decided anew in the test, and again after it."""
    cpu_kernels.available.cache_clear()
    yield
    cpu_kernels.available.cache_clear()


def layers_still_work():
    """With the kernels unavailable, auto picks torch's kernel and the result is right."""
    layer = layer_for(Scheme(4, 32, True), 64, 128, torch.bfloat16, seed=1)
    x = torch.randn(1, 128).bfloat16()
    assert kernels.choose(layer, x) is kernels.cpu_int4
    want = x.float() @ layer.dequantize().t()
    assert ((layer(x).float() - want).abs() <= 2**-7 * (x.float().abs() @ layer.dequantize().abs().t()) + 1e-6).all()
    layer.kernel = "vnni"
    with pytest.raises(ValueError, match="does not apply"):
        layer(x)


def test_fallback_when_the_build_fails_warns_once(fresh_vnni, monkeypatch):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(cpu_kernels, "missing_cpu_features", lambda: None)
    monkeypatch.setattr(cpu_kernels, "load", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_kernels.available() and not cpu_kernels.available()
        layers_still_work()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert ("runs on torch's slower CPU kernels: building vnni_linear.cpp, bf16_linear.cpp, layer_ops.cpp failed "
            "(RuntimeError: Ninja is required") in messages[0]


def test_fallback_on_a_cpu_without_vnni_does_not_compile(fresh_vnni, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_cpu_features", lambda: {"avx512_f", "avx512_bw", "avx512_vl"})
    monkeypatch.setattr(cpu_kernels, "load", lambda: pytest.fail("compiled for a CPU that cannot run it"))
    with pytest.warns(RuntimeWarning, match="this CPU lacks avx512_vnni, avx512_vbmi"):
        assert not cpu_kernels.available()
    layers_still_work()


def test_glmkit_cpu_kernels_0_turns_the_kernels_off_quietly(fresh_vnni, monkeypatch):
    monkeypatch.setenv("GLMKIT_CPU_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_kernels.available()
    layers_still_work()
