"""The GLM transformer of ChatGLM2/3, in plain PyTorch.

This file owns the architecture and nothing else: it knows no tokenizer, chat format, sampler or
server. Module names equal the official checkpoint's tensor names, so loading is `load_state_dict`.

Shapes: B batch, T new tokens, S keys attended (prefix + cache + new), H query heads, G KV groups,
D head dims. Activations are (B, T, hidden); attention works on (B, H, T, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .config import ModelConfig


def compiled_ops(x: torch.Tensor) -> bool:
    """Whether glmkit's compiled CPU ops (`glmkit.cpu_kernels`) take this call: inference, on a CPU that
    runs them, in float32 or bfloat16. They compute as the torch code beside them, faster at decode sizes."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype in (torch.bfloat16, torch.float32)
            and cpu_kernels.available())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computing in float32 and rounding once, as the official
        # `(weight * (x.float() * rsqrt(mean(x.float() ** 2) + eps))).to(x.dtype)` does.
        if compiled_ops(x):
            return torch.ops.glmkit_cpu.rms_norm(x, self.weight.to(x.dtype), self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


def rotary_cos_sin(config: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of each position's angles for `apply_rotary`, (B, T, 1, rotary_dim) each, computed in
    float32: each angle twice (the pair it turns), the sine negated where it multiplies the pair's second."""
    rd = config.rotary_dim
    inv_freq = 1.0 / config.rope_base ** (
        torch.arange(0, rd, 2, dtype=torch.float32, device=position_ids.device) / rd)
    angles = position_ids.float()[:, :, None, None] * inv_freq  # (B, T, 1, rd/2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return torch.stack((cos, cos), -1).flatten(-2), torch.stack((-sin, sin), -1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate, in place, interleaved pairs (x[2i], x[2i+1]) of the first rotary dims of each head of
    x (B, T, heads, D): (x1 cos - x2 sin, x2 cos + x1 sin), the official rounding; the other dims pass."""
    x_rot = x[..., :cos.shape[-1]]
    swapped = x_rot.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x2, x1) of each pair
    x_rot.copy_(x_rot * cos + swapped * sin)


class KVCache:
    """Preallocated keys and values of every layer, (L, B, G, capacity, D) each.

    `length` counts the positions filled, P-Tuning prefix included; `prefix_len` of them hold the
    prefix, whose keys carry no rotary and which every query may attend to.
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, prefix_len: int = 0):
        shape = (config.num_layers, batch_size, config.num_kv_groups, prefix_len + capacity, config.kv_channels)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.prefix_len = prefix_len
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3] - self.prefix_len

    @property
    def num_tokens(self) -> int:
        """Tokens cached, prefix excluded."""
        return self.length - self.prefix_len

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new (B, G, T, D) keys/values at `start`; return all keys/values so far."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """Store the new keys/values, then the attention of q (B, H, T, D) over everything cached, (B, T, H * D).
        A cache of another layout (the engine's paged pool) implements this method its own way."""
        keys, values = self.write(layer, start, k, v)
        return attention(q, keys, values, mask, is_causal)


def decode_kernel_takes(q: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> bool:
    """Whether glmkit's one-query attention kernel (`attention_decode`) computes this call."""
    return (q.shape[2] == 1 and not is_causal and q.shape[3] <= 256 and (mask is None or mask.dtype == torch.bool)
            and compiled_ops(q))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              is_causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v of q (B, H, T, D) over keys/values (B, G, S, D), each head over its group's,
    with SDPA's `mask` (B, 1, T, S) / `is_causal`; returned as (B, T, H * D)."""
    B, H, T, D = q.shape
    if decode_kernel_takes(q, mask, is_causal):
        return torch.ops.glmkit_cpu.attention_decode(q, k, v, mask)  # decoding: (B, 1, H * D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=k.shape[1] != H)
    return out.transpose(1, 2).reshape(B, T, H * D)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.num_heads, self.num_groups, self.head_dim = (
            config.num_attention_heads, config.num_kv_groups, config.kv_channels)
        self.query_key_value = nn.Linear(config.hidden_size, config.qkv_size, bias=True)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, kv_cache: KVCache | None, start: int, prefix_kv):
        B, T, _ = x.shape
        H, G, D = self.num_heads, self.num_groups, self.head_dim
        qkv = self.query_key_value(x)
        apply_rotary(qkv[..., :(H + G) * D].view(B, T, H + G, D), cos, sin)  # queries and keys at once
        q, k, v = qkv.split([H * D, G * D, G * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, G, D).transpose(1, 2)  # (B, G, T, D)
        v = v.view(B, T, G, D).transpose(1, 2)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer_number, start, q, k, v, mask, is_causal)
        else:
            if prefix_kv is not None:
                k = torch.cat((prefix_kv[0], k), dim=2)
                v = torch.cat((prefix_kv[1], v), dim=2)
            out = attention(q, k, v, mask, is_causal)
        return self.dense(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * b)


class GLMBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_number)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, is_causal, kv_cache, start, prefix_kv):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, mask, is_causal, kv_cache, start, prefix_kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)


class PrefixEncoder(nn.Module):
    """P-Tuning v2: learned past keys/values for every layer, (pre_seq_len, prefix_size) per row."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.pre_seq_len, config.prefix_size)
        if config.prefix_projection:
            self.trans = nn.Sequential(nn.Linear(config.prefix_size, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, config.prefix_size))
        else:
            self.trans = None

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        return self.trans(x) if self.trans is not None else x


class GLMModel(nn.Module):
    """The official `transformer` module: embedding, blocks, final norm, output layer, optional prefix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        if config.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(0.1)  # as the official model, active only in training

    def prefix_kv(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The prefix as past keys/values, (L, 2, B, G, P, D); None without P-Tuning."""
        if not self.config.pre_seq_len:
            return None
        c = self.config
        rows = self.prefix_dropout(self.prefix_encoder()).to(dtype)  # (P, L * 2 * G * D)
        kv = rows.view(c.pre_seq_len, c.num_layers, 2, c.num_kv_groups, c.kv_channels).permute(1, 2, 3, 0, 4)
        return kv.unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)


class ChatGLMForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = GLMModel(config)

    # Read from the embedding: linears may be swapped for quantized or packed modules.
    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.embedding.word_embeddings.weight.device

    def new_kv_cache(self, batch_size: int, capacity: int) -> KVCache:
        """A cache for `capacity` tokens per row, holding the P-Tuning prefix when the model has one."""
        prefix = self.transformer.prefix_kv(batch_size, self.dtype)
        cache = KVCache(self.config, batch_size, capacity, self.dtype, self.device,
                        prefix_len=0 if prefix is None else prefix.shape[-2])
        if prefix is not None:
            cache.k[:, :, :, :cache.prefix_len] = prefix[:, 0]
            cache.v[:, :, :, :cache.prefix_len] = prefix[:, 1]
            cache.length = cache.prefix_len
        return cache

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                last_only: bool = False, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); (B, 1, vocab) with `last_only`; (B, K, vocab) at the K indices `logits_at`.

        input_ids (B, T) are the new tokens. attention_mask (B, past + T), 1 for real tokens and 0 for
        padding, covers every token seen so far (prefix excluded); left padding works through it, and
        positions then count real tokens only. With `kv_cache`, the new keys/values are appended to it.
        attention_mask may instead be boolean (B, 1, T, prefix + past + T): the keys each new token
        sees, as given (e.g. several sequences packed in one row, each seeing only its own keys);
        position_ids are then required.
        """
        B, T = input_ids.shape
        transformer, config = self.transformer, self.config
        past = kv_cache.num_tokens if kv_cache is not None else 0
        if kv_cache is not None and past + T > kv_cache.capacity:
            raise ValueError(f"KV cache holds {kv_cache.capacity} tokens; {past} cached + {T} new do not fit")
        explicit_mask = attention_mask is not None and attention_mask.dim() == 4
        if explicit_mask and position_ids is None:
            raise ValueError("a (B, 1, T, keys) attention_mask needs position_ids")
        if attention_mask is not None and not explicit_mask and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"{(B, past + T)} (cached + new tokens)")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)

        x = transformer.embedding.word_embeddings(input_ids)
        cos, sin = rotary_cos_sin(config, position_ids, x.dtype)
        prefix_kv = None
        if kv_cache is not None:
            prefix_len, start = kv_cache.prefix_len, kv_cache.length
        else:
            prefix_kv = transformer.prefix_kv(B, x.dtype)
            prefix_len, start = (0 if prefix_kv is None else prefix_kv.shape[-2]), 0
        if explicit_mask:
            if attention_mask.shape != (B, 1, T, prefix_len + past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                 f"{(B, 1, T, prefix_len + past + T)} (prefix + cached + new keys)")
            mask, is_causal = attention_mask, False
        else:
            mask, is_causal = attention_bias(attention_mask, B, T, past, prefix_len, x.device)

        for i, layer in enumerate(transformer.encoder.layers):
            x = layer(x, cos, sin, mask, is_causal, kv_cache, start,
                      None if prefix_kv is None else prefix_kv[i])
        if kv_cache is not None:
            kv_cache.length = start + T
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[:, logits_at]
        return transformer.output_layer(transformer.encoder.final_layernorm(x))


def attention_bias(attention_mask: torch.Tensor | None, B: int, T: int, past: int, prefix_len: int,
                   device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """The boolean mask (B, 1, T, prefix + past + T) of keys each query may see, or SDPA's causal flag.

    Query i (absolute token position past + i) sees the prefix, every earlier real token, and itself:
    a padding query still sees itself, so no row is empty and no NaN reaches later layers.
    """
    if attention_mask is None and prefix_len == 0 and past == 0:
        return None, T > 1
    if attention_mask is None and T == 1:
        return None, False  # one new token sees everything cached
    q_pos = torch.arange(past, past + T, device=device)[:, None]
    k_pos = torch.arange(past + T, device=device)[None, :]
    allowed = (k_pos <= q_pos).expand(B, T, past + T)
    if attention_mask is not None:
        allowed = (allowed & attention_mask.bool()[:, None, :]) | (k_pos == q_pos)
    if prefix_len:
        allowed = torch.cat((torch.ones(B, T, prefix_len, dtype=torch.bool, device=device), allowed), dim=-1)
    return allowed[:, None], False
