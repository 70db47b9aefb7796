"""Quantizing a ChatGLM model: which layers, the state-dict transform, and the module swap.

The transformer blocks' four linears take the config's mode; the output layer and the input embedding
take theirs (`QuantConfig.output` / `.embedding`, int8 by default); norms, biases and a P-Tuning prefix
stay in floating point. The model file does not change: its linears and embedding are swapped for the
modules of `linear.py`, and the model's class for `QuantizedChatGLMForCausalLM`, whose `dtype` is the
activations' dtype (the embedding's weight, which `ChatGLMForCausalLM.dtype` reads, may be int8).

The same function (`quantized_tensors`) quantizes a weight whether it comes from a model in memory
(`quantize_model`), from a checkpoint being loaded (`QuantizingTransform`, used by the loader), or from
a checkpoint being converted (`glmkit quantize`), so all three give identical tensors.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import ModelConfig
from ..model import ChatGLMForCausalLM
from .checkpoint import with_quant_config
from .linear import Int4Linear, Int8Linear, QuantizedEmbedding, quantized_tensors
from .scheme import QuantConfig, Scheme

EMBEDDING = "transformer.embedding.word_embeddings"
OUTPUT = "transformer.output_layer"
_BLOCK_LINEAR = re.compile(r"transformer\.encoder\.layers\.\d+\.(self_attention\.(query_key_value|dense)|"
                           r"mlp\.(dense_h_to_4h|dense_4h_to_h))$")


class QuantizedChatGLMForCausalLM(ChatGLMForCausalLM):
    """A ChatGLMForCausalLM whose layers were swapped for quantized ones (`quantize_model`)."""
    compute_dtype: torch.dtype
    quant_config: QuantConfig

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype


def layer_schemes(model: ChatGLMForCausalLM, quant: QuantConfig) -> dict[str, Scheme]:
    """Module name -> scheme for every layer `quant` quantizes."""
    schemes = {}
    for name, _ in model.named_modules():
        if _BLOCK_LINEAR.match(name):
            schemes[name] = quant.scheme()
        elif name in (OUTPUT, EMBEDDING):
            scheme = quant.scheme(quant.output if name == OUTPUT else quant.embedding)
            if scheme is not None:
                schemes[name] = scheme
    return schemes


def _quantized_module(module: nn.Module, scheme: Scheme, dtype: torch.dtype) -> nn.Module:
    """The quantized counterpart of a float linear or embedding: on the meta device (shapes only) if the
    module is there, else quantized from its weights."""
    if isinstance(module, nn.Embedding):
        if module.weight.is_meta:
            return QuantizedEmbedding(module.num_embeddings, module.embedding_dim, scheme, dtype, device="meta")
        return QuantizedEmbedding.from_float(module, scheme, dtype)
    if type(module) is not nn.Linear:
        raise TypeError(f"cannot quantize a {type(module).__name__}: only nn.Linear and nn.Embedding")
    cls = Int8Linear if scheme.bits == 8 else Int4Linear
    if module.weight.is_meta:
        return cls(module.in_features, module.out_features, module.bias is not None, scheme, dtype, device="meta")
    return cls.from_float(module, scheme, dtype)


def quantize_model(model: ChatGLMForCausalLM, quant: QuantConfig,
                   dtype: torch.dtype | None = None) -> QuantizedChatGLMForCausalLM:
    """Swap `model`'s layers for quantized ones, in place, one at a time (each float weight is freed as
    its replacement is made, so memory falls as it goes). A model on the meta device gets empty quantized
    layers, ready for a quantized checkpoint's `load_state_dict(assign=True)`.

    dtype: the activations' (and biases') dtype; default the model's. Returns the model, for inference.
    """
    if isinstance(model, QuantizedChatGLMForCausalLM):
        raise ValueError(f"the model is already quantized ({model.quant_config.mode})")  # noqa: TRY004 (a state)
    dtype = dtype or model.dtype
    for name, scheme in layer_schemes(model, quant).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _quantized_module(getattr(parent, child), scheme, dtype))
    _cast_float_parts(model, dtype)
    model.__class__ = QuantizedChatGLMForCausalLM
    model.compute_dtype, model.quant_config = dtype, quant
    model.config = model.transformer.config = with_quant_config(model.config, quant)  # saved with the weights
    return model.eval()


def _cast_float_parts(model: nn.Module, dtype: torch.dtype) -> None:
    """What stays float (norms, biases, a prefix) computes in the activations' dtype; the scales of the
    quantized layers stay bfloat16, what the kernels read (so no `model.to(dtype)`)."""
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear, QuantizedEmbedding)):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                setattr(module, name, b.to(dtype))


def quantized_skeleton(config: ModelConfig, quant: QuantConfig, dtype: torch.dtype) -> QuantizedChatGLMForCausalLM:
    """A quantized model on the meta device: the shapes and dtypes a quantized checkpoint must hold."""
    with torch.device("meta"):
        model = ChatGLMForCausalLM(config)
    return quantize_model(model, quant, dtype)


class QuantizingTransform:
    """The state-dict transform, tensor by tensor, for a checkpoint read into `quantized_skeleton`:
    a float weight of a quantized layer becomes its quantized buffers; anything else passes untouched."""

    def __init__(self, model: QuantizedChatGLMForCausalLM):
        self.schemes = {f"{name}.weight": scheme for name, scheme in layer_schemes(model, model.quant_config).items()}
        self.embedding = f"{EMBEDDING}.weight"

    def handles(self, name: str) -> bool:
        return name in self.schemes

    def __call__(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix = name.removesuffix("weight")
        tensors = quantized_tensors(weight, self.schemes[name], embedding=name == self.embedding)
        return {prefix + suffix: t for suffix, t in tensors.items()}

