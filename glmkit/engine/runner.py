"""The model side of the engine, and the only part that touches torch: a paged KV pool, the model
calls of a step, one batched sample over the sequences that get a token.

The pool holds every layer's keys and values in slots, (layers, slots, groups, head dims), one slot
per cached token: slot `base + block * block_size + offset` (see `block_manager`). Before the blocks
come the P-Tuning prefix's slots (when the model has one; every sequence attends to them) and one
padding slot, all zeros, that the masked padding columns of a batch read.

A step's sequences run in order, in groups of one model call each: first the ones feeding one token
(the generating ones, all together), then prompts (whole or chunks) packed up to
`PACKED_CALL_TOKENS` new tokens per call. Two layouts of a call, both with `model.forward`'s own
arguments:
- rows (every sequence of the call feeds the same number T of tokens: decode steps, prompts of one
  length): row b holds its sequence's T new tokens, and its keys at the right end of S columns
  (S = the longest sequence), with an attention mask marking the real ones — the left-padded layout
  of batched generation, positions following from the mask. Rows all of one length need no mask.
- packed (prompts of several lengths): every new token in one row, with an explicit
  (1, 1, N, keys) mask in which each token sees only its own sequence's keys, explicit positions, and
  logits at each sequence's last token. No padding, so the linears do only the real tokens' work; and
  attention runs sequence by sequence (`_Segment`), each over its own keys, so it too does only the
  work of one request alone, not of every token against every key of the call.
`_StepCache` is the cache object the model hands its attention to: in each layer it scatters the new
keys/values into their slots, then attends. Decode steps read the pool in place through each row's
slots (the compiled `attention_decode`); other calls gather their keys/values first. No model code
knows the cache is paged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmkit.model import attention, decode_kernel_takes
from glmkit.sampling import (
    apply_presence_frequency_penalty,
    make_generator,
    sample,
    token_logprobs,
)

from .sequence import Sequence

Scores = tuple[float, list[tuple[int, float]]]  # the chosen token's logprob; (id, logprob) of the best ones

# New tokens per packed call: 16 prompts of ~64 tokens, on the serving benchmark's model with AMX and
# 2 threads, prefill as fast in calls of 512 tokens as in one call of 2048, and slower in calls of 128
# (the linears are less efficient on fewer rows). Calls this size bound a step's activations.
PACKED_CALL_TOKENS = 512


class _StepCache:
    """One step's view of the pool, with the attributes and `attend` that `model.forward` uses of a
    `glmkit.model.KVCache`: `past` cached columns before the T new ones, S = past + T in all."""

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, read_slots: torch.Tensor,
                 write_slots: torch.Tensor, past: int, total: int, prefix_len: int,
                 segments: list[_Segment] | None = None):
        self.k_pool, self.v_pool = k_pool, v_pool
        self.read_slots = read_slots  # (B, prefix + S) the slots of each row's keys, in order
        self.write_slots = write_slots  # (B * T,) where each new token's keys/values go
        self.segments = segments  # packed calls: each sequence's queries and keys
        self.prefix_len = prefix_len
        self.length = prefix_len + past
        self.num_tokens = past
        self.capacity = total  # S: the model checks that past + T fit

    def attend(self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """Store the new (B, G, T, D) keys/values in their slots; return the attention of q (B, H, T, D) over
        each row's keys (each sequence's, in a packed call), (B, T, H * D)."""
        B, G, T, D = k.shape
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]  # (slots, G, D)
        k_pool.index_copy_(0, self.write_slots, k.transpose(1, 2).reshape(B * T, G, D))
        v_pool.index_copy_(0, self.write_slots, v.transpose(1, 2).reshape(B * T, G, D))
        if self.segments is not None:
            return torch.cat([attention(q[:, :, s.queries], *self._gather(k_pool, v_pool, s.slots[None]), s.mask,
                                        s.mask is None) for s in self.segments], dim=1)
        if decode_kernel_takes(q, mask, is_causal):  # reads the pool in place
            return torch.ops.glmkit_cpu.attention_decode(q, k_pool, v_pool, mask, self.read_slots)
        return attention(q, *self._gather(k_pool, v_pool, self.read_slots), mask, is_causal)

    @staticmethod
    def _gather(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `slots` (B, S), as (B, G, S, D) each."""
        B, G, D = slots.shape[0], k_pool.shape[1], k_pool.shape[2]
        flat = slots.flatten()
        return (k_pool.index_select(0, flat).view(B, -1, G, D).transpose(1, 2),
                v_pool.index_select(0, flat).view(B, -1, G, D).transpose(1, 2))


@dataclass
class _Segment:
    """One sequence of a packed call: its new tokens' columns, its keys' slots (prefix first), and which keys
    each of its new tokens sees ((1, 1, T, keys) bool; None when causal from the first key)."""
    queries: slice
    slots: torch.Tensor
    mask: torch.Tensor | None


class ModelRunner:
    """Runs steps of a model over a paged KV pool of `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, model, num_blocks: int, block_size: int, pad_id: int, vocab_size: int):
        config = model.config
        self.model = model
        self.block_size = block_size
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.device = model.device
        with torch.inference_mode():
            prefix = model.transformer.prefix_kv(1, model.dtype)  # (L, 2, 1, G, P, D) or None
        self.prefix_len = 0 if prefix is None else prefix.shape[-2]
        self.padding_slot = self.prefix_len  # stays zero: what masked padding columns read
        self.base = self.prefix_len + 1
        shape = (config.num_layers, self.base + num_blocks * block_size, config.num_kv_groups, config.kv_channels)
        self.k_pool = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=model.dtype, device=self.device)
        if prefix is not None:
            self.k_pool[:, :self.prefix_len] = prefix[:, 0, 0].transpose(1, 2)  # (L, P, G, D)
            self.v_pool[:, :self.prefix_len] = prefix[:, 1, 0].transpose(1, 2)
        self.generators: dict[str, torch.Generator | None] = {}  # request id -> its seeded generator

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.k_pool.numel() * self.k_pool.element_size()

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> tuple[list[int], list[Scores | None]]:
        """Feed each sequence's scheduled tokens; return the next token of each one whose step reaches
        its last token (`Sequence.feeds_last_token`), in order, and its logprobs when asked for (see
        `sample`)."""
        logits = self.forward(seqs)
        return self.sample([seq for seq in seqs if seq.feeds_last_token], logits)

    def forward(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits (B', V) of the last token of each sequence whose step reaches it, in order; every
        scheduled token's keys/values are in the pool afterwards."""
        logits = [self._forward_call(group) for group in self._calls(seqs)]
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    @staticmethod
    def _calls(seqs: list[Sequence]) -> list[list[Sequence]]:
        """The step's sequences split, in order, into model calls: the leading one-token sequences
        together, then the rest packed up to PACKED_CALL_TOKENS new tokens (a longer one alone)."""
        first = 0
        while first < len(seqs) and seqs[first].num_scheduled_tokens == 1:
            first += 1
        calls = [seqs[:first]] if first else []
        call, tokens = [], 0
        for seq in seqs[first:]:
            if call and tokens + seq.num_scheduled_tokens > PACKED_CALL_TOKENS:
                calls.append(call)
                call, tokens = [], 0
            call.append(seq)
            tokens += seq.num_scheduled_tokens
        return calls + [call] if call else calls

    def _forward_call(self, seqs: list[Sequence]) -> torch.Tensor:
        if len({seq.num_scheduled_tokens for seq in seqs}) == 1:
            return self._forward_rows(seqs)
        return self._forward_packed(seqs)

    def _forward_rows(self, seqs: list[Sequence]) -> torch.Tensor:
        """One row per sequence, each with the same number T of new tokens: decode steps (T = 1),
        one sequence's prompt (or chunk), or prompts of one length."""
        device = self.device
        lengths = [seq.num_cached_tokens + seq.num_scheduled_tokens for seq in seqs]  # tokens up to the last fed
        input_ids = torch.tensor([seq.scheduled_ids for seq in seqs], device=device)  # (B, T)
        S, T = max(lengths), input_ids.shape[1]
        # Column j of row b holds token j - (S - n_b) of its sequence: negative means padding.
        n = torch.tensor(lengths, device=device)
        token = torch.arange(S, device=device)[None, :] - (S - n)[:, None]  # (B, S)
        real = token >= 0
        slots = self._slots(self._tables(seqs), token.clamp(min=0)).masked_fill(~real, self.padding_slot)
        cache = _StepCache(self.k_pool, self.v_pool, self._with_prefix(slots), slots[:, S - T:].flatten(), S - T, S,
                           self.prefix_len)
        # Rows all of one length need no mask: the model then uses the same kernels as one request.
        mask = None if min(lengths) == S else real
        sampled = [seq.feeds_last_token for seq in seqs]
        if not any(sampled):  # chunks of prompts: no logits wanted, the output layer is skipped
            empty = torch.empty(0, dtype=torch.long, device=device)
            return self.model(input_ids, attention_mask=mask, kv_cache=cache, logits_at=empty).flatten(0, 1)
        logits = self.model(input_ids, attention_mask=mask, kv_cache=cache, last_only=True)[:, -1]
        return logits if all(sampled) else logits[torch.tensor(sampled, device=device)]

    def _forward_packed(self, seqs: list[Sequence]) -> torch.Tensor:
        """All sequences' new tokens in one row, each seeing only its own keys: prompts of different
        lengths without padding, so the linears do exactly the work of the real tokens."""
        device = self.device
        rows = torch.arange(len(seqs), device=device)
        cached = torch.tensor([seq.num_cached_tokens for seq in seqs], device=device)
        new = torch.tensor([seq.num_scheduled_tokens for seq in seqs], device=device)
        n = cached + new  # tokens up to the last one fed
        tables = self._tables(seqs)
        # Keys: every token of every sequence up to its last fed one, in order; queries: the fed tokens.
        key_seq = rows.repeat_interleave(n)  # (K,) the sequence of each key
        key_token = torch.arange(len(key_seq), device=device) - (n.cumsum(0) - n)[key_seq]
        query_seq = rows.repeat_interleave(new)  # (N,)
        ends = new.cumsum(0)
        query_token = torch.arange(len(query_seq), device=device) - (ends - new)[query_seq] + cached[query_seq]
        visible = (query_seq[:, None] == key_seq[None, :]) & (key_token[None, :] <= query_token[:, None])  # (N, K)
        if self.prefix_len:
            visible = torch.cat((visible.new_ones(len(query_seq), self.prefix_len), visible), dim=1)
        key_slots = self._slots(tables[key_seq], key_token[:, None]).squeeze(1)
        write_slots = self._slots(tables[query_seq], query_token[:, None]).squeeze(1)
        cache = _StepCache(self.k_pool, self.v_pool, self._with_prefix(key_slots[None]), write_slots,
                           len(key_seq) - len(query_seq), len(key_seq), self.prefix_len,
                           self._segments(seqs, key_slots))
        input_ids = torch.tensor([[t for seq in seqs for t in seq.scheduled_ids]], device=device)
        sampled = torch.tensor([seq.feeds_last_token for seq in seqs], device=device)
        return self.model(input_ids, position_ids=query_token[None], attention_mask=visible[None, None],
                          kv_cache=cache, logits_at=(ends - 1)[sampled])[0]

    def _segments(self, seqs: list[Sequence], key_slots: torch.Tensor) -> list[_Segment]:
        """Each sequence of a packed call with its keys (`key_slots`: every sequence's, in order), so that its
        attention reads only its own keys, as one request alone would."""
        segments, query, key = [], 0, 0
        P = self.prefix_len
        for seq in seqs:
            cached, new = seq.num_cached_tokens, seq.num_scheduled_tokens
            slots = self._with_prefix(key_slots[None, key:key + cached + new])[0]
            mask = None
            if P or cached:  # the new tokens see the prefix, the cached tokens and the new ones up to themselves
                seen = torch.arange(P + cached + new, device=self.device)[None, :]
                mask = (seen <= torch.arange(P + cached, P + cached + new, device=self.device)[:, None])[None, None]
            segments.append(_Segment(slice(query, query + new), slots, mask))
            query, key = query + new, key + cached + new
        return segments

    def _tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """The block tables, (B, most blocks), padded with block 0 (never read through)."""
        widest = max(len(seq.block_table) for seq in seqs)
        return torch.tensor([seq.block_table + [0] * (widest - len(seq.block_table)) for seq in seqs],
                            device=self.device)

    def _slots(self, tables: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """The pool slot of token index `token` (B, J) of each row's sequence, by its block table (B, blocks)."""
        bs = self.block_size
        return tables.gather(1, token // bs) * bs + token % bs + self.base

    def _with_prefix(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, J) slots with the P-Tuning prefix's slots put in front of each row."""
        if not self.prefix_len:
            return slots
        prefix = torch.arange(self.prefix_len, device=self.device).expand(slots.shape[0], -1)
        return torch.cat((prefix, slots), dim=1)

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[Scores | None]]:
        """The next token of each sequence, in one `glmkit.sampling.sample` call, and for the sequences
        whose params ask for logprobs, the chosen token's logprob and the best alternatives."""
        params = [seq.params for seq in seqs]
        raw = logits
        logits = apply_request_rules(seqs, logits)
        generators = None
        if any(p.seed is not None for p in params):
            generators = [self._generator(seq) for seq in seqs]
        seen = None
        if any(p.repetition_penalty != 1 for p in params):
            seen = [seq.token_ids if seq.params.repetition_penalty != 1 else [] for seq in seqs]
        tokens = sample(logits, params, generators=generators, seen=seen, vocab_size=self.vocab_size)
        wanted = [getattr(p, "logprobs", None) for p in params]
        if all(k is None for k in wanted):
            return tokens.tolist(), [None] * len(seqs)
        # Under the model's own distribution: before penalties, constraints and temperature.
        chosen, top_ids, top_values = token_logprobs(raw, tokens, max(k for k in wanted if k is not None),
                                                     self.vocab_size)
        chosen, top_ids, top_values = chosen.tolist(), top_ids.tolist(), top_values.tolist()
        scores = [None if k is None else (chosen[i], list(zip(top_ids[i][:k], top_values[i][:k])))
                  for i, k in enumerate(wanted)]
        return tokens.tolist(), scores

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        """A seeded sequence's generator, made on its first step and kept across preemptions."""
        if seq.request_id not in self.generators:
            self.generators[seq.request_id] = make_generator(seq.params.seed, self.device)
        return self.generators[seq.request_id]

    def release(self, seq: Sequence) -> None:
        """Forget what the runner kept for `seq` (its generator); its blocks are the manager's."""
        self.generators.pop(seq.request_id, None)


def apply_request_rules(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
    """The logits (B, V) after what some requests ask beyond `SamplingParams`, read from their params
    when present: OpenAI's `presence_penalty` / `frequency_penalty` (over the generated tokens), then
    a `constraint` (an object whose `apply(row, generated)` sets forbidden tokens to -inf in place).
    The order and meaning are those of the server's single-request path. Untouched rows stay as given."""
    params = [seq.params for seq in seqs]
    presence = [getattr(p, "presence_penalty", 0.0) or 0.0 for p in params]
    frequency = [getattr(p, "frequency_penalty", 0.0) or 0.0 for p in params]
    penalised = [i for i in range(len(seqs)) if presence[i] or frequency[i]]
    constrained = [i for i, p in enumerate(params) if getattr(p, "constraint", None) is not None]
    if not penalised and not constrained:
        return logits
    logits = logits.to(torch.float32, copy=True)
    if penalised:
        V, device = logits.shape[1], logits.device
        counts = torch.stack([torch.bincount(torch.tensor(seqs[i].output_ids, dtype=torch.long, device=device),
                                             minlength=V) for i in penalised])  # (rows, V)
        logits[penalised] = apply_presence_frequency_penalty(
            logits[penalised], counts, torch.tensor([presence[i] for i in penalised], device=device),
            torch.tensor([frequency[i] for i in penalised], device=device))
    for i in constrained:
        params[i].constraint.apply(logits[i], seqs[i].output_ids)
    return logits
