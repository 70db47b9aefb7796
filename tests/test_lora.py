"""LoRA injected by a function: exact at start, merged == unmerged, PEFT-layout files, any linear-like base."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_model
from torch import nn

from glmkit.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from glmkit.packed import pack_linears, packing_available

VOCAB = 256  # a small vocabulary keeps these tests quick; the adapters do not touch it
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give lora_B non-zero weights, as training would (it starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def test_apply_lora_wraps_the_targets_and_freezes_the_rest():
    base = tiny_model(0, padded_vocab_size=VOCAB)
    expected = base(IDS)
    model = apply_lora(tiny_model(0, padded_vocab_size=VOCAB), r=4, alpha=8)
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    layer = "transformer.encoder.layers.{}."
    assert wrapped == sorted(layer.format(i) + suffix for i in range(2) for suffix in (
        "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{ab}.weight" for name in wrapped for ab in "AB"}
    assert torch.equal(model(IDS), expected)  # lora_B starts at zero: exactly the base model


def test_merged_equals_unmerged_and_restores_the_plain_model():
    model = apply_lora(tiny_model(0, padded_vocab_size=VOCAB), r=4, alpha=8, dropout=0.1).eval()
    randomize_adapters(model)
    unmerged = model(IDS)
    assert not torch.allclose(unmerged, tiny_model(0, padded_vocab_size=VOCAB)(IDS), atol=1e-3)  # adapters matter
    merged_model = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert set(merged_model.state_dict()) == set(tiny_model(0, padded_vocab_size=VOCAB).state_dict())
    torch.testing.assert_close(merged_model(IDS), unmerged, atol=1e-5, rtol=1e-5)


def test_adapter_files_use_the_peft_layout_and_reload_exactly(tmp_path):
    model = apply_lora(tiny_model(0, padded_vocab_size=VOCAB), targets=["query_key_value", "dense"], r=2, alpha=4)
    randomize_adapters(model)
    save_adapter(model, tmp_path, base_model="THUDM/chatglm3-6b")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (2, 4, ["dense", "query_key_value"])
    assert config["base_model_name_or_path"] == "THUDM/chatglm3-6b"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight" in names
    assert len(names) == 2 * 2 * 2  # 2 layers x 2 targets x (A, B)

    reloaded = load_adapter(tiny_model(0, padded_vocab_size=VOCAB), tmp_path)
    for name, tensor in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(reloaded)[name], tensor)
    assert torch.equal(reloaded(IDS), model(IDS))


def test_an_adapter_for_another_shape_is_refused_by_name(tmp_path):
    save_adapter(apply_lora(tiny_model(0, padded_vocab_size=VOCAB, hidden_size=32, kv_channels=8), r=2), tmp_path)
    with pytest.raises(ValueError, match="wrong shape .*query_key_value.lora_A.weight is \\[2, 32\\], expected \\[2, 64\\]"):
        load_adapter(tiny_model(0, padded_vocab_size=VOCAB), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model(0, padded_vocab_size=VOCAB), tmp_path / "nowhere")


def test_targets_must_exist_and_be_linear():
    with pytest.raises(ValueError, match="no module named query"):
        apply_lora(tiny_model(0, padded_vocab_size=VOCAB), targets=["query"])
    with pytest.raises(ValueError, match="must be linear layers.*self_attention"):
        apply_lora(tiny_model(0, padded_vocab_size=VOCAB), targets=["self_attention"])


class Int8Linear(nn.Module):
    """A weight-only int8 linear as a quantizer writes one: no float weight to merge into."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(linear.weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.qweight.float() * self.scale, self.bias)


def test_lora_trains_on_a_quantized_base_and_refuses_to_merge_into_it():
    model = tiny_model(0, padded_vocab_size=VOCAB)
    for layer in model.transformer.encoder.layers:
        layer.self_attention.query_key_value = Int8Linear(layer.self_attention.query_key_value)
    apply_lora(model, targets=["query_key_value"], r=4)
    randomize_adapters(model)
    logits = model(IDS)
    logits.float().pow(2).mean().backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in name for name in grads)
    with pytest.raises(ValueError, match="cannot merge the LoRA adapter of .*query_key_value into its Int8Linear"):
        merge_lora(model)


@pytest.mark.skipif(not packing_available(), reason="oneDNN weight packing is not available in this torch build")
def test_lora_wraps_packed_bf16_linears():
    model = pack_linears(tiny_model(0, padded_vocab_size=VOCAB).to(torch.bfloat16))
    base = model(IDS)
    apply_lora(model, r=4)
    assert torch.equal(model(IDS), base)
    randomize_adapters(model)
    assert not torch.equal(model(IDS), base)
