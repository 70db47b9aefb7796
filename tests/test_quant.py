"""glmkit.quant: the math, the layers, every kernel against the reference, checkpoints, errors, the CLI.

Tolerances are derived, not tuned: a dequantized weight is within s/2 of the float one (plus the
bfloat16 rounding of an asymmetric zero, |z| * 2^-8), so a product with x is within sum |x| * that bound;
a bfloat16 kernel adds the rounding of its inputs and output, at most 2^-7 of |x| @ |W|. The VNNI kernels
also quantize x to int8 per block of 32 inputs: each x is within dx/2 of dx * round(x / dx), dx = max|x| / 127
of its block (plus 2^-10 of dx for float32 reciprocal rounding), so they add at most |W| @ (dx / 2) to the
product (`activation_bound`; tests/test_quant_vnni.py checks the kernels against that rounding exactly).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny import make_tiny_checkpoint, tiny_model

from glmkit.config import ModelConfig
from glmkit.loader import CheckpointError, load_model, save_model
from glmkit.model import ChatGLMForCausalLM
from glmkit.quant import (
    Int4Linear,
    Int8Linear,
    QuantConfig,
    QuantConfigError,
    QuantizedChatGLMForCausalLM,
    QuantizedEmbedding,
    Scheme,
    dequantize,
    kernels,
    layer_schemes,
    quantize,
    quantize_model,
)
from glmkit.quant.layout import pack_int4_blocked, unpack_int4_blocked

INT4_TINY = QuantConfig("int4", group_size=32)  # the tiny model's rows (64, 160 inputs) split into 32s
SCHEMES = [Scheme(8, 0, True), Scheme(8, 0, False), Scheme(8, 32, True), Scheme(8, 64, False),
           Scheme(4, 32, True), Scheme(4, 64, False), Scheme(4, 128, True), Scheme(4, 128, False)]
IDS = torch.tensor([[64790, 64792, 5, 17, 3, 99, 42, 7, 64, 1]])


def error_bound(scales: torch.Tensor, zeros: torch.Tensor | None, k: int) -> torch.Tensor:
    """Per-weight bound (N, K) on |W - dequantize(quantize(W))|."""
    bound = scales.float() / 2
    if zeros is not None:
        bound = bound + zeros.float().abs() * 2**-8
    return bound.repeat_interleave(k // scales.shape[1], dim=1) * (1 + 1e-6) + 1e-12


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = 0  # an all-zero group
    w[min(1, n - 1), 3] = 2.0  # an outlier
    w[-1] += 0.3  # a row far from zero: what zero points are for
    return w


# ---- the math ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_round_trip_error_is_within_half_a_scale(scheme):
    w = random_weight(96, 256, seed=scheme.group_size)
    q, scales, zeros = quantize(w, scheme)
    assert scales.dtype == torch.bfloat16 and (zeros is None) == scheme.symmetric
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    back = dequantize(q, scales, zeros, scheme)
    assert ((back - w).abs() <= error_bound(scales, zeros, 256)).all()
    if scheme.group_size == 32:
        assert torch.equal(back[0, :32], torch.zeros(32))  # an all-zero group stays exactly zero
    if scheme.bits == 8:  # and int8 is close: s/2 <= max|w| / 254 per group (s rounded up to bfloat16)
        assert (back - w).abs().max() <= 2.0 / 254 * (1 + 2**-7)


def test_group_size_and_config_errors():
    with pytest.raises(QuantConfigError, match="does not split into groups of 64"):
        quantize(torch.randn(4, 96), Scheme(4, 64, True))
    with pytest.raises(QuantConfigError, match="int4 needs groups"):
        QuantConfig("int4", group_size=0)
    with pytest.raises(QuantConfigError, match="mode 'int3'"):
        QuantConfig("int3")
    with pytest.raises(QuantConfigError, match="group size 48"):
        QuantConfig("int8", group_size=48)
    with pytest.raises(QuantConfigError, match="embedding='fp8'"):
        QuantConfig("int8", embedding="fp8")
    assert QuantConfig("int4").group_size == 128 and QuantConfig("int8").group_size == 0
    config = QuantConfig("int4", 64, symmetric=False, output="none")
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(QuantConfigError, match="unknown quantization setting"):
        QuantConfig.from_dict({"mode": "int8", "bits": 8})


def test_int4_blocked_layout_round_trips_and_pads_with_zero_weights():
    q = torch.randint(0, 16, (100, 64), dtype=torch.uint8)
    packed = pack_int4_blocked(q)
    assert packed.shape == (2, 64, 32)
    assert torch.equal(unpack_int4_blocked(packed, 100), q)
    assert (unpack_int4_blocked(packed, 128)[100:] == 8).all()  # (8 - 8) * s + z, with s = z = 0: zero


# ---- the layers against the float linear -----------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_quantized_linear_is_within_the_scales_of_the_float_linear(scheme):
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 100)
    layer = (Int8Linear if scheme.bits == 8 else Int4Linear).from_float(linear, scheme, torch.float32)
    layer.kernel = "reference"
    x = torch.randn(5, 256)
    q, scales, zeros = quantize(linear.weight.detach(), scheme)
    bound = x.abs() @ error_bound(scales, zeros, 256).t()  # (5, 100): sum_k |x_k| * |W - dq|_k
    assert ((layer(x) - linear(x)).abs() <= bound + 1e-5).all()
    assert torch.equal(layer.dequantize(), dequantize(q, scales, zeros, scheme))


# ---- every kernel path equals the reference -----------------------------------------------------------------

def kernel_names(device: str) -> list[str]:
    return ["vnni", "cpu", "float32"] if device == "cpu" else ["cuda"]


def activation_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(M, N) bound on |(x - x_int8) @ W.T| for x (M, K) quantized to int8 per block of 32 inputs."""
    M, K = x.shape
    padded = F.pad(x.float().abs(), (0, -K % 32)).view(M, -1, 32)
    dx = padded.amax(-1, keepdim=True).expand(-1, -1, 32).reshape(M, -1)[:, :K] / 127
    return (dx * (0.5 + 2**-10)) @ weight.abs().t()


def check_kernels_match_reference(device: str, scheme: Scheme, n: int, k: int, rows: int) -> None:
    torch.manual_seed(n * k + rows)
    linear = torch.nn.Linear(k, n, bias=n % 2 == 0)
    layer = (Int8Linear if scheme.bits == 8 else Int4Linear).from_float(linear, scheme, torch.bfloat16).to(device)
    x = torch.randn(rows, k, device=device).bfloat16()
    layer.kernel = "reference"
    want = layer(x).float()
    magnitude = x.float().abs() @ layer.dequantize().abs().t()  # |x| @ |W|
    if layer.bias is not None:
        magnitude += layer.bias.float().abs()
    tolerance = {name: 2**-7 * magnitude + 1e-6 for name in kernel_names(device)}
    if "vnni" in tolerance:
        tolerance["vnni"] = tolerance["vnni"] + activation_bound(x, layer.dequantize())
    for name in kernel_names(device):
        layer.kernel = name
        try:
            got = layer(x)
        except ValueError as e:  # the kernel does not take this layer: it must say so, and auto must not pick it
            assert "does not apply" in str(e)
            continue
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert ((got.float() - want).abs() <= tolerance[name]).all(), name
    layer.kernel = "auto"
    chosen = "vnni" if kernels.choose(layer, x) in (kernels.vnni_int8, kernels.vnni_int4) else kernel_names(device)[-1]
    assert ((layer(x).float() - want).abs() <= tolerance[chosen]).all()


SHAPES = [(37, 128), (64, 256), (100, 64 * 3), (320, 128)]  # odd and padded output counts


@pytest.mark.parametrize("scheme, n, k", [(scheme, n, k) for scheme in SCHEMES for n, k in SHAPES
                                          if k % max(scheme.group_size, 1) == 0], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 17, kernels.INT4_KERNEL_MAX_ROWS + 1])
def test_cpu_kernels_equal_the_reference(scheme, n, k, rows):
    check_kernels_match_reference("cpu", scheme, n, k, rows)


def test_auto_uses_the_vnni_kernels_else_torchs_for_few_rows_and_float32_for_many(monkeypatch):
    layer = Int4Linear.from_float(torch.nn.Linear(128, 64), Scheme(4, 32, True))
    grouped_int8 = Int8Linear.from_float(torch.nn.Linear(128, 64), Scheme(8, 32, True))
    if kernels.cpu_kernels.available():  # glmkit's kernels take every row count of every layout
        for rows in (1, 300):
            assert kernels.choose(layer, torch.zeros(rows, 128)) is kernels.vnni_int4
            assert kernels.choose(grouped_int8, torch.zeros(rows, 128)) is kernels.vnni_int8
    monkeypatch.setattr(kernels.cpu_kernels, "available", lambda: False)  # as on a CPU without them
    assert kernels.choose(layer, torch.zeros(1, 128)) is kernels.cpu_int4
    assert kernels.choose(layer, torch.zeros(kernels.INT4_KERNEL_MAX_ROWS + 1, 128)) is kernels.float32_int4
    assert kernels.choose(grouped_int8, torch.zeros(1, 128)) is kernels.float32_int8  # torch's int8 kernel: rows only
    layer.kernel = "nonsense"
    with pytest.raises(ValueError, match="unknown kernel"):
        layer(torch.zeros(1, 128))


def test_the_cpu_int4_kernel_reads_the_checkpoint_layout_without_a_copy():
    layer = Int4Linear.from_float(torch.nn.Linear(128, 64), Scheme(4, 32, True))
    weight = layer.prepared("cpu", kernels._cpu_int4_weight)
    if kernels.cpu_int4_layout_is_native():
        assert weight.data_ptr() == layer.weight.data_ptr()
    q = unpack_int4_blocked(layer.weight, 64).to(torch.int32)
    assert torch.equal(weight.view(-1), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).view(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("n, k, rows", [(37, 128, 1), (320, 256, 3), (64, 128, 40)])
def test_cuda_kernels_equal_the_reference(scheme, n, k, rows):
    check_kernels_match_reference("cuda", scheme, n, k, rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantized_model_runs_on_cuda():
    model = quantize_model(tiny_model(0), INT4_TINY, torch.bfloat16)
    reference = model(IDS).float()
    model.to("cuda")
    got = model(IDS.cuda()).float().cpu()
    assert (got - reference).abs().max() <= 0.05 * reference.abs().max()


# ---- the model ---------------------------------------------------------------------------------------------

def dequantized_twin(model: QuantizedChatGLMForCausalLM, config: ModelConfig) -> ChatGLMForCausalLM:
    """A float32 model whose weights are exactly the quantized model's dequantized ones."""
    twin = ChatGLMForCausalLM(dataclasses.replace(config, extra={})).eval()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear, QuantizedEmbedding)):
            state[f"{name}.weight"] = module.dequantize()
    for name, t in model.state_dict().items():
        if name not in state and name in twin.state_dict():
            state[name] = t.float()
    twin.load_state_dict(state)
    return twin


def set_kernel(model, name: str) -> None:
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            module.kernel = name


def greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decoding with the KV cache: the token ids chosen."""
    cache, out = model.new_kv_cache(1, ids.shape[1] + new_tokens), []
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = model(ids, kv_cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            out.append(int(ids))
    return out


@pytest.mark.parametrize("quant", [QuantConfig("int8"), INT4_TINY,
                                   QuantConfig("int4", 32, symmetric=False, embedding="int4", output="int4")],
                         ids=["int8", "int4", "int4-asym-all"])
def test_quantized_tiny_model_decodes_as_its_dequantized_float_twin(quant):
    small_vocab = {"padded_vocab_size": 1024}
    model = quantize_model(tiny_model(0, **small_vocab), quant, torch.float32)
    twin = dequantized_twin(model, model.config)
    set_kernel(model, "reference")
    prompt = torch.tensor([[1000, 1001, 5, 17, 3, 99, 42, 7]])
    assert greedy(model, prompt, 12) == greedy(twin, prompt, 12)
    if kernels.cpu_kernels.available():  # activations rounded to int8 per 32 inputs: the same tokens still
        set_kernel(model, "vnni")
        assert greedy(model, prompt, 12) == greedy(twin, prompt, 12)
    # The fast kernels, in bfloat16, stay close to the float32 twin.
    fast = quantize_model(tiny_model(0, **small_vocab), quant, torch.bfloat16)
    with torch.no_grad():
        got, want = fast(prompt).float(), twin(prompt)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_quantize_model_swaps_the_right_layers_and_keeps_the_model_api():
    model = quantize_model(tiny_model(0), QuantConfig("int8", output="none"), torch.bfloat16)
    names = layer_schemes(model, model.quant_config)
    assert "transformer.output_layer" not in names and "transformer.embedding.word_embeddings" in names
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * model.config.num_layers
    assert isinstance(model.transformer.output_layer, torch.nn.Linear)
    assert model.dtype == torch.bfloat16 and model.new_kv_cache(1, 4).k.dtype == torch.bfloat16
    assert model.transformer.encoder.final_layernorm.weight.dtype == torch.bfloat16
    assert model.config.extra["quantization"]["mode"] == "int8"
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, QuantConfig("int4"))


def test_quantized_embedding_dequantizes_the_rows_it_reads():
    emb = torch.nn.Embedding(300, 64)
    for scheme in (Scheme(8, 0, True), Scheme(4, 32, False)):
        layer = QuantizedEmbedding.from_float(emb, scheme, torch.float32)
        ids = torch.tensor([[0, 299, 5], [7, 7, 1]])
        assert torch.equal(layer(ids), F.embedding(ids, layer.dequantize()))


# ---- checkpoints -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("float"))


@pytest.fixture(scope="module")
def int4_checkpoint(float_checkpoint, tmp_path_factory) -> Path:
    model = load_model(float_checkpoint, dtype=torch.bfloat16, quantize=INT4_TINY)
    return save_model(model, tmp_path_factory.mktemp("int4"), tokenizer_path=float_checkpoint)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("quant", [QuantConfig("int8"), QuantConfig("int8", 32, symmetric=False), INT4_TINY],
                         ids=["int8", "int8-g32-asym", "int4"])
def test_quantized_checkpoint_round_trips_and_equals_on_the_fly_quantization(quant, float_checkpoint, tmp_path):
    on_the_fly = load_model(float_checkpoint, dtype=torch.bfloat16, quantize=quant)
    in_memory = quantize_model(load_model(float_checkpoint, dtype=torch.float32), quant, torch.bfloat16)
    out = save_model(on_the_fly, tmp_path / "q", max_shard_bytes=2_000_000)  # several shards
    assert len(list(out.glob("model-*.safetensors"))) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == quant.to_dict() and config["torch_dtype"] == "bfloat16"
    loaded = load_model(out)
    assert isinstance(loaded, QuantizedChatGLMForCausalLM) and loaded.quant_config == quant
    states = [m.state_dict() for m in (on_the_fly, in_memory, loaded)]
    assert set(states[0]) == set(states[1]) == set(states[2])
    for name, t in states[0].items():
        assert torch.equal(t, states[1][name]) and torch.equal(t, states[2][name]), name
    with torch.no_grad():
        assert torch.equal(on_the_fly(IDS), loaded(IDS))


def test_safetensors_files_record_the_quantization(int4_checkpoint):
    from safetensors import safe_open

    with safe_open(str(int4_checkpoint / "model.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["glmkit.quantization"])
    assert QuantConfig.from_dict(recorded) == INT4_TINY


def test_loading_as_another_mode_is_a_clear_error(int4_checkpoint):
    with pytest.raises(CheckpointError, match="already quantized: int4.*cannot be loaded as 'int8'"):
        load_model(int4_checkpoint, quantize="int8")
    assert isinstance(load_model(int4_checkpoint, quantize="int4"), QuantizedChatGLMForCausalLM)


def test_metadata_that_disagrees_with_config_json_is_a_clear_error(int4_checkpoint, tmp_path):
    folder = copy_checkpoint(int4_checkpoint, tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config["quantization"]["symmetric"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="holds int4 \\(group size 32, symmetric.*config.json says int4 "
                                              "\\(group size 32, asymmetric"):
        load_model(folder)


def test_tensors_of_another_mode_are_a_clear_error(int4_checkpoint, tmp_path):
    folder = copy_checkpoint(int4_checkpoint, tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config["quantization"]["mode"], config["quantization"]["group_size"] = "int8", 32
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    save_file(tensors, folder / "model.safetensors", metadata={
        "format": "pt", "glmkit.quantization": json.dumps(config["quantization"])})
    with pytest.raises(CheckpointError, match="another quantization mode than config.json says"):
        load_model(folder)


@pytest.mark.parametrize("value, message", [(float("nan"), "NaN or infinite"), (-1.0, "negative scales")])
def test_a_corrupt_scale_tensor_is_a_clear_error(int4_checkpoint, tmp_path, value, message):
    from safetensors import safe_open

    folder = copy_checkpoint(int4_checkpoint, tmp_path / "ck")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(folder / "model.safetensors")
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.scales_and_zeros"
    tensors[name][0, 5, 0] = value
    save_file(tensors, folder / "model.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=f"{name} holds {message}"):
        load_model(folder)


def test_missing_metadata_and_truncated_files_are_clear_errors(int4_checkpoint, tmp_path):
    folder = copy_checkpoint(int4_checkpoint, tmp_path / "ck")
    save_file(load_file(folder / "model.safetensors"), folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no 'glmkit.quantization' metadata"):
        load_model(folder)
    data = (int4_checkpoint / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="do not fit its shape"):
        load_model(folder)


def anonymous_memory() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
def test_quantized_checkpoint_weights_are_memory_mapped_not_copied(int4_checkpoint):
    load_model(int4_checkpoint)  # warm up: imports and allocator pools
    before = anonymous_memory()
    model = load_model(int4_checkpoint)
    grown = anonymous_memory() - before
    weights = model.transformer.output_layer.weight.nbytes + model.transformer.embedding.word_embeddings.weight.nbytes
    assert grown < weights / 2  # the int8 embedding and output layer (8 MB) were not copied into the process


# ---- the Python API and the CLI ----------------------------------------------------------------------------

def run_cli(monkeypatch, capsys, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """`glmkit ARGS` in this process (quicker than a subprocess): exit status, stdout, stderr."""
    import io

    from glmkit.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_command_writes_a_checkpoint_that_chat_loads(float_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "int4"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "quantize", "--model", str(float_checkpoint), "--mode",
                                   "int4", "--group-size", "32", "--out", str(out))
    assert code == 0, stderr
    assert "int4 (group size 32, symmetric" in stdout
    assert (out / "tokenizer.model").is_file()
    offline = load_model(out).state_dict()
    on_the_fly = load_model(float_checkpoint, quantize=INT4_TINY).state_dict()
    assert set(offline) == set(on_the_fly) and all(torch.equal(offline[n], on_the_fly[n]) for n in on_the_fly)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "chat", "--model", str(out), "--temperature", "0",
                                   "--max-new-tokens", "4", stdin="hello\n")
    assert code == 0, stderr
    assert stdout.endswith("\n")


def test_quantize_command_errors(float_checkpoint, int4_checkpoint, tmp_path, monkeypatch, capsys):
    args = ["quantize", "--model", str(float_checkpoint), "--out", str(tmp_path / "x")]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--mode", "int4")
    assert code == 2 and "does not split into groups of 128" in err
    code, _, err = run_cli(monkeypatch, capsys, *args, "--mode", "int4", "--group-size", "channel")
    assert code == 2 and "int4 needs groups" in err
    code, _, err = run_cli(monkeypatch, capsys, "quantize", "--model", str(int4_checkpoint), "--mode", "int8",
                           "--out", str(tmp_path / "y"))
    assert code == 2 and "already quantized" in err


def test_load_quantizes_on_the_fly_in_bfloat16_and_sets_threads(float_checkpoint):
    import glmkit

    before = torch.get_num_threads()
    try:
        model = glmkit.load(float_checkpoint, device="cpu", quantize="int8", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert isinstance(model.model, QuantizedChatGLMForCausalLM) and model.model.dtype == torch.bfloat16
    assert isinstance(model.generate("Hello", temperature=0, max_new_tokens=4), str)
    with pytest.raises(ValueError, match="threads=0"):
        glmkit.load(float_checkpoint, threads=0)


def test_generate_command_takes_quantize_and_threads(float_checkpoint, monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", str(float_checkpoint), "--quantize",
                               "int8", "--threads", "1", "--temperature", "0", "--max-new-tokens", "4", "Hello")
    finally:
        torch.set_num_threads(before)
    assert code == 0, err
