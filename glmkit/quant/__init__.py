"""int8 / int4 weight-only quantization: settings, layers, kernels, and quantized checkpoints.

    from glmkit.quant import QuantConfig, quantize_model
    model = quantize_model(float_model, QuantConfig("int4", group_size=128))

Two verbs, as in gpt-fast: a state-dict transform (float weight -> integer weight + bfloat16 scales) and a
module swap (`Int8Linear` / `Int4Linear` / `QuantizedEmbedding` for nn.Linear / nn.Embedding). The model
file does not change. Parts: `scheme` (settings and math), `layout` (memory and checkpoint layout),
`kernels` (the matrix products, glmkit.cpu_kernels' among them), `linear` (the layers),
`convert` (the model swap), `checkpoint` (writing and memory-mapping quantized checkpoints).
"""

from .convert import (
    QuantizedChatGLMForCausalLM,
    layer_schemes,
    quantize_model,
    quantized_skeleton,
)
from .linear import Int4Linear, Int8Linear, QuantizedEmbedding, quantized_tensors
from .scheme import (
    QuantConfig,
    QuantConfigError,
    Scheme,
    as_quant_config,
    dequantize,
    quantize,
)

__all__ = ["Int4Linear", "Int8Linear", "QuantConfig", "QuantConfigError", "QuantizedChatGLMForCausalLM",
           "QuantizedEmbedding", "Scheme", "as_quant_config", "dequantize", "layer_schemes", "quantize",
           "quantize_model", "quantized_skeleton", "quantized_tensors"]
