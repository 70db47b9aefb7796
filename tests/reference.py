"""Independent references for glmkit's model, for the parity tests only.

Two references, neither of which shares code with glmkit:

* `build_reference(model)`: transformers' native `GlmForCausalLM` (the same architecture: partial
  rotary on the first half of each head in interleaved pairs, fused gate/up MLP, q/k/v with bias,
  grouped-query attention, RMSNorm, untied output layer) with glmkit's weights copied in. The fused
  QKV projection is split into q/k/v; every other tensor is a rename.
* `manual_forward(...)`: a direct float32 forward written from the ChatGLM3 description, one readable
  step at a time, with P-Tuning v2 prefixes. It reads glmkit's state dict by the official names.

glmkit itself never imports transformers; only these tests do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from glmkit.config import ModelConfig

# ---- transformers' GlmForCausalLM ---------------------------------------------------------------

def glm_config(config: ModelConfig, attn_implementation: str = "eager"):
    """The `GlmConfig` describing the same network as a glmkit `ModelConfig`."""
    from transformers import GlmConfig

    hf = GlmConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_kv_groups,
        head_dim=config.kv_channels,
        hidden_act="silu",
        rms_norm_eps=config.layernorm_epsilon,
        max_position_embeddings=config.seq_length,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * config.rope_ratio,
                         "partial_rotary_factor": 0.5},
        attention_bias=True,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    hf._attn_implementation = attn_implementation
    return hf


def to_glm_state_dict(state: dict[str, torch.Tensor], config: ModelConfig,
                      copy: bool = True) -> dict[str, torch.Tensor]:
    """Official ChatGLM3 tensor names -> transformers Glm names, QKV split into q, k, v.

    With copy=False the result shares storage with `state` (the benchmark's 6B weights fit only once)."""
    H, G, D = config.num_attention_heads, config.num_kv_groups, config.kv_channels
    out = {
        "model.embed_tokens.weight": state["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": state["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": state["transformer.output_layer.weight"],
    }
    for i in range(config.num_layers):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        q_w, k_w, v_w = state[src + "self_attention.query_key_value.weight"].split([H * D, G * D, G * D], dim=0)
        q_b, k_b, v_b = state[src + "self_attention.query_key_value.bias"].split([H * D, G * D, G * D], dim=0)
        out.update({
            dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q_w, dst + "self_attn.q_proj.bias": q_b,
            dst + "self_attn.k_proj.weight": k_w, dst + "self_attn.k_proj.bias": k_b,
            dst + "self_attn.v_proj.weight": v_w, dst + "self_attn.v_proj.bias": v_b,
            dst + "self_attn.o_proj.weight": state[src + "self_attention.dense.weight"],
            dst + "post_attention_layernorm.weight": state[src + "post_attention_layernorm.weight"],
            dst + "mlp.gate_up_proj.weight": state[src + "mlp.dense_h_to_4h.weight"],
            dst + "mlp.down_proj.weight": state[src + "mlp.dense_4h_to_h.weight"],
        })
    return {k: v.detach().clone() if copy else v.detach() for k, v in out.items()}


def build_reference(model, attn_implementation: str = "eager", rope_ratio: float | None = None):
    """A `GlmForCausalLM` holding `model`'s weights (float32, eval mode).

    `rope_ratio` overrides the config's, to show that a wrong rope base is noticed.
    """
    from transformers import GlmForCausalLM

    config = model.config
    if rope_ratio is not None:
        config = ModelConfig(**{**{k: getattr(config, k) for k in config.__dataclass_fields__ if k != "extra"},
                                "rope_ratio": rope_ratio})
    ref = GlmForCausalLM(glm_config(config, attn_implementation))
    state = to_glm_state_dict(model.state_dict(), config)
    # strict: every tensor of the reference is written, nothing is left at its random initialisation.
    ref.load_state_dict(state, strict=True)
    return ref.float().eval()


def prefix_cache(prefix: torch.Tensor, config: ModelConfig, batch_size: int):
    """A transformers `DynamicCache` prefilled with P-Tuning prefix keys/values.

    `prefix` is the prefix encoder's output (pre_seq_len, num_layers * 2 * G * D); layer i's past key
    is index 2i and its past value 2i+1 of the (pre_seq_len, num_layers * 2, G, D) view.
    """
    from transformers import DynamicCache

    P, G, D = prefix.shape[0], config.num_kv_groups, config.kv_channels
    kv = prefix.view(P, config.num_layers * 2, G, D)
    layers = []
    for i in range(config.num_layers):
        k = kv[:, 2 * i].permute(1, 0, 2)  # (G, P, D)
        v = kv[:, 2 * i + 1].permute(1, 0, 2)
        layers.append((k.unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous(),
                       v.unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()))
    return DynamicCache(layers)


# ---- a direct float32 forward -------------------------------------------------------------------

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, positions: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """x (B, heads, T, D); rotate pairs (x[2i], x[2i+1]) for i < D/4 by positions * base^(-4i/D)."""
    D = config.kv_channels
    rot = D // 2
    base = 10000.0 * config.rope_ratio
    # The official float32 formula: inverse frequencies base^(-2i/rot), angles = position * frequency.
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    out = x.clone()
    for i in range(rot // 2):
        theta = positions.float() * inv_freq[i]  # (B, T)
        c, s = torch.cos(theta)[:, None, :], torch.sin(theta)[:, None, :]
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * c - b * s
        out[..., 2 * i + 1] = b * c + a * s
    return out


def manual_forward(state: dict[str, torch.Tensor], config: ModelConfig, input_ids: torch.Tensor,
                   position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, vocab) of the ChatGLM3 network, computed directly in float32.

    attention_mask (B, T): 1 real, 0 padding. prefix: the P-Tuning prefix encoder's output
    (pre_seq_len, num_layers * 2 * G * D) or None; its keys carry no rotary, every query sees all of it,
    and token positions still start at 0.
    """
    s = {k: v.detach().float() for k, v in state.items()}
    B, T = input_ids.shape
    H, G, D, L = config.num_attention_heads, config.num_kv_groups, config.kv_channels, config.num_layers
    eps = config.layernorm_epsilon
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    P = 0 if prefix is None else prefix.shape[0]
    if prefix is not None:
        prefix_kv = prefix.float().view(P, L * 2, G, D)

    # Which keys each query sees: prefix always; among tokens, earlier-or-same real ones.
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    visible = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, T)
    visible = torch.cat((torch.ones(B, T, P, dtype=torch.bool), visible), dim=-1)

    x = s["transformer.embedding.word_embeddings.weight"][input_ids]
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        h = _rms_norm(x, s[p + "input_layernorm.weight"], eps)
        qkv = h @ s[p + "self_attention.query_key_value.weight"].T + s[p + "self_attention.query_key_value.bias"]
        q = qkv[..., :H * D].reshape(B, T, H, D).transpose(1, 2)
        k = qkv[..., H * D:(H + G) * D].reshape(B, T, G, D).transpose(1, 2)
        v = qkv[..., (H + G) * D:].reshape(B, T, G, D).transpose(1, 2)
        q, k = _rotate(q, position_ids, config), _rotate(k, position_ids, config)
        if prefix is not None:
            pk = prefix_kv[:, 2 * i].permute(1, 0, 2).expand(B, G, P, D)
            pv = prefix_kv[:, 2 * i + 1].permute(1, 0, 2).expand(B, G, P, D)
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
        heads = []
        for head in range(H):
            g = head // (H // G)  # consecutive query heads share a KV group
            scores = q[:, head] @ k[:, g].transpose(-1, -2) / math.sqrt(D)  # (B, T, P + T)
            scores = scores.masked_fill(~visible, float("-inf"))
            # A padding query sees nothing real; give it a uniform row (its output is never compared).
            scores = torch.where(visible.any(-1, keepdim=True), scores, torch.zeros_like(scores))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, g])
        attn = torch.stack(heads, dim=1).transpose(1, 2).reshape(B, T, H * D)
        x = x + attn @ s[p + "self_attention.dense.weight"].T
        h = _rms_norm(x, s[p + "post_attention_layernorm.weight"], eps)
        a, b = (h @ s[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(a) * b) @ s[p + "mlp.dense_4h_to_h.weight"].T
    x = _rms_norm(x, s["transformer.encoder.final_layernorm.weight"], eps)
    return x @ s["transformer.output_layer.weight"].T


def manual_prefix(state: dict[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """The P-Tuning v2 prefix encoder's output (pre_seq_len, num_layers * 2 * G * D), by the official formula:
    the embedding table, passed through Linear-Tanh-Linear when prefix_projection is set."""
    s = {k: v.detach().float() for k, v in state.items()}
    x = s["transformer.prefix_encoder.embedding.weight"]
    if config.prefix_projection:
        x = torch.tanh(x @ s["transformer.prefix_encoder.trans.0.weight"].T + s["transformer.prefix_encoder.trans.0.bias"])
        x = x @ s["transformer.prefix_encoder.trans.2.weight"].T + s["transformer.prefix_encoder.trans.2.bias"]
    return x


# ---- random weights -----------------------------------------------------------------------------

@torch.no_grad()
def randomize_(model, seed: int = 0):
    """Give every parameter a random value: norms around 1 (not 1), biases and prefixes non-zero."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight"):
            value = 0.5 + torch.rand(param.shape, generator=gen)  # in [0.5, 1.5)
        elif "word_embeddings" in name or "prefix_encoder.embedding" in name:
            value = torch.randn(param.shape, generator=gen)
        elif name.endswith(".bias"):
            value = 0.2 * torch.randn(param.shape, generator=gen)
        else:  # linear weights: keep activations of order 1
            value = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1]) * 1.5
        param.copy_(value.to(param.dtype))
    return model
