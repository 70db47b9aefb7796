"""LoRA over quantized base weights: the input gradient of Int8Linear / Int4Linear, and adapters that train.

The quantized weights are frozen buffers; a quantized linear passes its input's gradient through the
dequantized weight (grad @ W), whichever kernel ran forward. So the gradient equals that of F.linear with
the dequantized weight, up to float32 summation order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

from glmkit.lora import LoRALinear, apply_lora, lora_state_dict
from glmkit.quant import (
    Int4Linear,
    Int8Linear,
    QuantConfig,
    Scheme,
    kernels,
    quantize_model,
)

VOCAB = 256


@pytest.mark.parametrize("scheme", [Scheme(8, 0, True), Scheme(8, 32, False), Scheme(4, 32, True),
                                    Scheme(4, 64, False)], ids=str)
@pytest.mark.parametrize("rows", [1, kernels.INT4_KERNEL_MAX_ROWS + 1])  # integer kernels and the float32 path
def test_input_gradient_is_that_of_the_dequantized_weight(scheme, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 100)
    layer = (Int8Linear if scheme.bits == 8 else Int4Linear).from_float(linear, scheme, torch.float32)
    x = torch.randn(rows, 192, requires_grad=True)
    grad_out = torch.randn(rows, 100)
    layer(x).backward(grad_out)
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, layer.dequantize(), layer.bias).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert all(not b.requires_grad for b in layer.buffers())


@pytest.mark.parametrize("quant", [QuantConfig("int8"), QuantConfig("int4", 32)], ids=["int8", "int4"])
def test_lora_adapters_train_on_a_quantized_model(quant):
    model = quantize_model(tiny_model(0, padded_vocab_size=VOCAB), quant, torch.float32)
    frozen = {name: t.clone() for name, t in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8).train()
    assert all(isinstance(m.base_layer, (Int8Linear, Int4Linear)) for m in model.modules() if isinstance(m, LoRALinear))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(6):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    # only the adapters changed: the quantized weights and scales are as they were
    after = {name.replace(".base_layer", ""): t for name, t in model.state_dict().items() if ".lora_" not in name}
    assert set(after) == set(frozen) and all(torch.equal(after[name], t) for name, t in frozen.items())
    assert all(t.abs().sum() > 0 for name, t in lora_state_dict(model).items() if "lora_B" in name)
