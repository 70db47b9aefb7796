"""glmkit's model agrees numerically with independent implementations.

The main reference is transformers' native `GlmForCausalLM` (tests/reference.py maps the weights); the
P-Tuning v2 prefix is also checked against a direct float32 forward written from the official
semantics. Tiny random configs, every parameter random (RMSNorm weights and the QKV bias included),
float32, logits to 1e-4 absolute, greedy ids exact.
"""

from __future__ import annotations

import pytest
import torch

from glmkit.config import ModelConfig
from glmkit.model import ChatGLMForCausalLM

try:  # tests/ is not a package; either import style finds the helper
    from reference import (
        build_reference,
        manual_forward,
        manual_prefix,
        prefix_cache,
        randomize_,
    )
except ImportError:  # pragma: no cover
    from tests.reference import (
        build_reference,
        manual_forward,
        manual_prefix,
        prefix_cache,
        randomize_,
    )

ATOL = 1e-4
VOCAB = 512

BASE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, kv_channels=16,
            multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=VOCAB, seq_length=1024)

# Attention layouts: 2 KV groups (ChatGLM3's), 1 group, one group per head (multi_query_attention off),
# and heads * head_dim != hidden with 3 groups and 3 layers.
CONFIGS = {
    "G2": {},
    "G1": dict(multi_query_group_num=1),
    "GH": dict(multi_query_attention=False),
    "G3-wide": dict(num_layers=3, hidden_size=40, num_attention_heads=6, kv_channels=8, multi_query_group_num=3),
}


def make_model(seed: int = 0, **overrides) -> ChatGLMForCausalLM:
    torch.manual_seed(seed)
    model = ChatGLMForCausalLM(ModelConfig(**{**BASE, **overrides}))
    return randomize_(model, seed).eval()


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padding_mask(lengths: list[int], T: int) -> torch.Tensor:
    """(B, T) mask, 1 on the last `length` columns of each row."""
    return torch.stack([torch.arange(T) >= T - n for n in lengths]).long()


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


OBSERVED: dict[str, float] = {}


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = ATOL) -> float:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.float() - want.float()).abs().max().item()
    OBSERVED[what] = max(err, OBSERVED.get(what, 0.0))
    assert err <= atol, f"{what}: max |diff| {err:.3g} > {atol}"
    return err


def hf(ref, ids, **kwargs) -> torch.Tensor:
    return ref(input_ids=ids, **kwargs).logits


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if OBSERVED:
        width = max(map(len, OBSERVED))
        print("\nmax |diff| observed:")
        for what, err in sorted(OBSERVED.items()):
            print(f"  {what:<{width}}  {err:.2e}")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is the test-only reference")


# ---- 1 and 5: full-sequence logits, for every attention layout ---------------------------------

@pytest.mark.parametrize("layout", CONFIGS)
def test_full_sequence_logits_match_transformers(transformers, layout):
    model = make_model(**CONFIGS[layout])
    if layout == "GH":
        assert model.config.num_kv_groups == model.config.num_attention_heads
    ref = build_reference(model)
    ids = random_ids(2, 19)
    got = model(ids)
    assert got.shape == (2, 19, VOCAB)
    assert_close(got, hf(ref, ids), f"full[{layout}] vs transformers")
    assert_close(got, manual_forward(model.state_dict(), model.config, ids), f"full[{layout}] vs manual")
    assert torch.equal(got.argmax(-1), hf(ref, ids).argmax(-1))
    assert_close(model(ids, last_only=True), got[:, -1:], f"last_only[{layout}]")
    # SDPA in the reference too, to rule out a quirk of its eager path.
    assert_close(got, hf(build_reference(model, "sdpa"), ids), f"full[{layout}] vs transformers sdpa")


@pytest.mark.parametrize("layout", ["G2"])
def test_every_parameter_matters(transformers, layout):
    """Perturbing any one tensor moves glmkit's logits and the reference's equally: the mapping is complete
    and no weight is silently unused (norm weights, the QKV bias, the final norm included)."""
    model = make_model(**CONFIGS[layout])
    ids = random_ids(1, 9)
    base = model(ids)
    for name, param in model.named_parameters():
        saved = param.detach().clone()
        param.add_(0.5 * torch.randn_like(param))
        got = model(ids)
        assert (got - base).abs().max() > 1e-3, f"perturbing {name} does not change the logits"
        assert_close(got, hf(build_reference(model), ids), f"perturbed[{layout}] vs transformers")
        param.copy_(saved)


# ---- 2: decode with the KV cache ----------------------------------------------------------------

def run_chunks(model, ids: torch.Tensor, chunks: list[int], capacity: int):
    cache = model.new_kv_cache(ids.shape[0], capacity)
    out, start = [], 0
    for n in chunks:
        out.append(model(ids[:, start:start + n], kv_cache=cache))
        start += n
    assert start == ids.shape[1] and cache.num_tokens == start
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("layout", CONFIGS)
@pytest.mark.parametrize("chunks", [[10] + [1] * 10, [5, 1, 4, 3, 7]], ids=["prefill-decode", "chunks"])
def test_kv_cache_matches_full_forward(layout, chunks):
    model = make_model(**CONFIGS[layout])
    ids = random_ids(2, 20)
    full = model(ids)  # itself checked against transformers above
    assert_close(run_chunks(model, ids, chunks, capacity=24), full, f"cache[{layout}] vs full")


@pytest.mark.parametrize("layout", ["G2", "GH"])
def test_kv_cache_chunks_match_transformers_cache(transformers, layout):
    from transformers import DynamicCache
    model = make_model(**CONFIGS[layout])
    ref, cache, ids = build_reference(model), DynamicCache(), random_ids(2, 20)
    want, start = [], 0
    for n in [5, 1, 4, 3, 7]:
        want.append(hf(ref, ids[:, start:start + n], past_key_values=cache, use_cache=True))
        start += n
    got = run_chunks(model, ids, [5, 1, 4, 3, 7], capacity=20)
    assert_close(got, torch.cat(want, dim=1), f"cache[{layout}] vs transformers cache")


def greedy_glmkit(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    cache = model.new_kv_cache(prompt.shape[0], prompt.shape[1] + steps)
    logits, out = model(prompt, kv_cache=cache, last_only=True), []
    for _ in range(steps):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = model(out[-1], kv_cache=cache)
    return torch.cat(out, dim=1)


def greedy_reference(ref, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    from transformers import DynamicCache
    cache = DynamicCache()
    logits, out = hf(ref, prompt, past_key_values=cache, use_cache=True), []
    for _ in range(steps):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = hf(ref, out[-1], past_key_values=cache, use_cache=True)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("layout", ["G2", "GH"])
def test_greedy_ids_equal(transformers, layout):
    model = make_model(**CONFIGS[layout])
    prompt = random_ids(3, 8)
    got = greedy_glmkit(model, prompt, 12)
    assert torch.equal(got, greedy_reference(build_reference(model), prompt, 12))
    assert len(set(got.flatten().tolist())) > 3, "degenerate generation proves little"


def test_kv_cache_overflow_is_an_error():
    model = make_model()
    cache = model.new_kv_cache(1, 4)
    model(random_ids(1, 3), kv_cache=cache)
    with pytest.raises(ValueError, match="cache"):
        model(random_ids(1, 2), kv_cache=cache)


# ---- 3: left padding ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["G2", "GH", "G3-wide"])
def test_left_padding_matches_reference(transformers, layout):
    model = make_model(**CONFIGS[layout])
    ref = build_reference(model)
    lengths, T = [10, 7, 4], 10
    ids = random_ids(3, T)
    mask = left_padding_mask(lengths, T)
    ids = ids.masked_fill(mask == 0, 0)  # <unk> as padding, as the official tokenizer pads
    pos = positions_from_mask(mask)
    real = mask.bool()

    got = model(ids, attention_mask=mask)
    want = hf(ref, ids, attention_mask=mask, position_ids=pos)
    assert_close(got[real], want[real], f"left-pad[{layout}] vs transformers")
    assert_close(model(ids, attention_mask=mask, position_ids=pos)[real], got[real], f"left-pad[{layout}] explicit pos")
    # Padding is invisible: each row equals that row run alone without padding.
    for b, n in enumerate(lengths):
        alone = model(ids[b:b + 1, T - n:])
        assert_close(got[b, T - n:], alone[0], f"left-pad[{layout}] vs unpadded row")

    # Decode after the left-padded prefill: the mask grows by one column a step, positions continue
    # from each row's real length; then one 3-token chunk.
    from transformers import DynamicCache
    cache, ref_cache = model.new_kv_cache(3, T + 8), DynamicCache()
    assert_close(model(ids, attention_mask=mask, kv_cache=cache)[real], want[real], f"left-pad[{layout}] cache prefill")
    hf(ref, ids, attention_mask=mask, position_ids=pos, past_key_values=ref_cache, use_cache=True)
    seq, new_ids = ids, random_ids(3, 5, seed=7)
    for step, n in enumerate([1, 1, 3]):
        chunk = new_ids[:, :n]
        new_ids = new_ids[:, n:]
        mask = torch.cat((mask, torch.ones(3, n, dtype=torch.long)), dim=1)
        seq = torch.cat((seq, chunk), dim=1)
        pos = positions_from_mask(mask)[:, -n:]
        got = model(chunk, attention_mask=mask, kv_cache=cache)
        assert_close(got, hf(ref, chunk, attention_mask=mask, position_ids=pos, past_key_values=ref_cache,
                              use_cache=True), f"left-pad[{layout}] decode vs transformers")
        for b, length in enumerate(lengths):
            alone = model(seq[b:b + 1, T - length:])[0, -n:]
            assert_close(got[b], alone, f"left-pad[{layout}] decode vs unpadded row")


def test_left_padded_greedy_ids_equal_unpadded():
    model = make_model()
    lengths, T = [9, 5], 9
    mask = left_padding_mask(lengths, T)
    ids = random_ids(2, T).masked_fill(mask == 0, 0)
    cache = model.new_kv_cache(2, T + 10)
    logits, out = model(ids, attention_mask=mask, kv_cache=cache, last_only=True), []
    for _ in range(10):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
        logits = model(out[-1], attention_mask=mask, kv_cache=cache)
    got = torch.cat(out, dim=1)
    for b, n in enumerate(lengths):
        assert torch.equal(got[b:b + 1], greedy_glmkit(model, ids[b:b + 1, T - n:], 10))


# ---- 4: rope_ratio at long positions ------------------------------------------------------------

@pytest.mark.parametrize("rope_ratio", [1, 50, 500])
def test_rope_ratio_long_positions(transformers, rope_ratio):
    model = make_model(rope_ratio=rope_ratio)
    assert model.config.rope_base == 10000.0 * rope_ratio
    ref = build_reference(model)
    ids = random_ids(1, 320)
    full = model(ids)
    assert_close(full, hf(ref, ids), f"rope_ratio={rope_ratio} 320 tokens vs transformers")
    # Decode past position 300 with the cache.
    assert_close(run_chunks(model, ids, [310] + [1] * 10, capacity=320)[:, 310:], full[:, 310:],
                 f"rope_ratio={rope_ratio} decode vs full")
    # Far positions through explicit position_ids.
    short = random_ids(2, 12, seed=3)
    pos = torch.stack([torch.arange(1000, 1012), torch.arange(5000, 5012)])
    assert_close(model(short, position_ids=pos), hf(ref, short, position_ids=pos),
                 f"rope_ratio={rope_ratio} positions 1000+ vs transformers")


def test_rope_ratio_changes_results(transformers):
    """The rope tests can fail: a wrong rope base moves the logits far beyond the tolerance."""
    model = make_model(rope_ratio=50)
    ids = random_ids(1, 320)
    got = model(ids)[:, 300:]
    wrong_ref = hf(build_reference(model, rope_ratio=1), ids)[:, 300:]
    assert (got - wrong_ref).abs().max() > 100 * ATOL
    base_model = make_model(rope_ratio=1)  # same seed, same weights
    assert (got - base_model(ids)[:, 300:]).abs().max() > 100 * ATOL
    # ... and glmkit reads the ratio from config.json.
    cfg = ModelConfig.from_dict({**BASE, "rope_ratio": 50})
    assert cfg.rope_base == 500000.0


# ---- 6: P-Tuning v2 prefix ----------------------------------------------------------------------

PREFIX_CASES = {
    "plain-G2": dict(pre_seq_len=5),
    "proj-G2": dict(pre_seq_len=5, prefix_projection=True),
    "plain-G1": dict(pre_seq_len=3, multi_query_group_num=1),
    "proj-G3-wide": dict(pre_seq_len=4, prefix_projection=True, **CONFIGS["G3-wide"]),
}


@pytest.mark.parametrize("case", PREFIX_CASES)
def test_prefix_matches_references(transformers, case):
    model = make_model(**PREFIX_CASES[case])
    config, state = model.config, model.state_dict()
    P = config.pre_seq_len
    prefix = manual_prefix(state, config)  # (P, L * 2 * G * D), hand-computed from the weights
    assert prefix.shape == (P, config.prefix_size)
    assert_close(model.transformer.prefix_encoder(), prefix, f"prefix[{case}] encoder")

    B, T = 2, 11
    ids = random_ids(B, T)
    pos = torch.arange(T).expand(B, T)  # token positions start at 0 whatever the prefix
    ref = build_reference(model)
    cache = prefix_cache(prefix, config, B)
    want = hf(ref, ids, attention_mask=torch.ones(B, P + T, dtype=torch.long), position_ids=pos,
              past_key_values=cache, use_cache=True)
    # transformers left the prefix keys as given: no rotary on them.
    kv = prefix.view(P, config.num_layers * 2, config.num_kv_groups, config.kv_channels)
    for i in range(config.num_layers):
        assert torch.equal(cache.layers[i].keys[:, :, :P], kv[:, 2 * i].permute(1, 0, 2).expand(B, -1, -1, -1))
    manual = manual_forward(state, config, ids, prefix=prefix)
    assert_close(manual, want, f"prefix[{case}] manual vs transformers")

    got = model(ids)
    assert_close(got, want, f"prefix[{case}] no-cache vs transformers")
    assert_close(got, manual, f"prefix[{case}] no-cache vs manual")
    for chunks in ([4] + [1] * 7, [3, 5, 1, 2]):
        assert_close(run_chunks(model, ids, chunks, capacity=T), want, f"prefix[{case}] cache vs transformers")

    # The cache holds the prefix unrotated, then the tokens.
    kv_cache = model.new_kv_cache(B, T)
    assert kv_cache.prefix_len == P and kv_cache.num_tokens == 0
    for i in range(config.num_layers):
        assert_close(kv_cache.k[i, :, :, :P], kv[:, 2 * i].permute(1, 0, 2).expand(B, -1, -1, -1), f"prefix[{case}] cached keys")
        assert_close(kv_cache.v[i, :, :, :P], kv[:, 2 * i + 1].permute(1, 0, 2).expand(B, -1, -1, -1), f"prefix[{case}] cached values")


def test_prefix_with_left_padding(transformers):
    model = make_model(pre_seq_len=4, prefix_projection=True)
    config = model.config
    P, T, lengths = 4, 9, [9, 5]
    mask = left_padding_mask(lengths, T)
    ids = random_ids(2, T).masked_fill(mask == 0, 0)
    real = mask.bool()
    prefix = manual_prefix(model.state_dict(), config)
    ref = build_reference(model)
    full_mask = torch.cat((torch.ones(2, P, dtype=torch.long), mask), dim=1)
    want = hf(ref, ids, attention_mask=full_mask, position_ids=positions_from_mask(mask),
              past_key_values=prefix_cache(prefix, config, 2), use_cache=True)
    assert_close(model(ids, attention_mask=mask)[real], want[real], "prefix left-pad no-cache vs transformers")
    cache = model.new_kv_cache(2, T + 3)
    assert_close(model(ids, attention_mask=mask, kv_cache=cache)[real], want[real], "prefix left-pad cache vs transformers")
    # Decode: each row equals that row alone, unpadded.
    step = random_ids(2, 1, seed=5)
    mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
    got = model(step, attention_mask=mask, kv_cache=cache)
    for b, n in enumerate(lengths):
        alone = model(torch.cat((ids[b:b + 1, T - n:], step[b:b + 1]), dim=1))[:, -1]
        assert_close(got[b], alone, "prefix left-pad decode vs unpadded row")


def test_prefix_reference_discriminates():
    """The prefix tests can fail: the prefix changes the logits, and a reference with keys and values
    swapped, or with token positions shifted past the prefix, disagrees with glmkit."""
    model = make_model(pre_seq_len=5)
    config, P, T = model.config, 5, 8
    ids = random_ids(1, T)
    got = model(ids)
    prefix = manual_prefix(model.state_dict(), config)
    state = {k: v for k, v in model.state_dict().items() if "prefix_encoder" not in k}
    no_prefix = ChatGLMForCausalLM(ModelConfig(**BASE)).eval()
    no_prefix.load_state_dict(state, strict=True)
    assert (got - no_prefix(ids)).abs().max() > 100 * ATOL

    swapped = prefix.view(P, config.num_layers, 2, -1).flip(2).reshape(P, -1)
    assert (got - manual_forward(model.state_dict(), config, ids, prefix=swapped)).abs().max() > 100 * ATOL
    shifted = torch.arange(P, P + T)[None]
    assert (got - manual_forward(model.state_dict(), config, ids, position_ids=shifted, prefix=prefix)).abs().max() > 100 * ATOL


# ---- 7: half precision --------------------------------------------------------------------------

# Loose, relative to the largest float32 logit (about 6.5 here): bfloat16 keeps 8 mantissa bits,
# float16 11. Observed: bfloat16 ~3% of the scale, float16 ~0.5%.
HALF_TOLERANCE = {torch.bfloat16: 0.08, torch.float16: 0.02}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_close_to_float32(dtype):
    model = make_model(pre_seq_len=3)
    ids = random_ids(2, 16)
    want = model(ids)
    half = make_model(pre_seq_len=3).to(dtype)  # the same weights, rounded
    got = half(ids)
    assert got.dtype == dtype
    atol = HALF_TOLERANCE[dtype] * want.abs().max().item()
    name = str(dtype).removeprefix("torch.")
    assert assert_close(got, want, f"{name} vs float32", atol=atol) > 0  # it did run in lower precision
    cache = half.new_kv_cache(2, 16)
    assert cache.k.dtype == dtype
    cached = torch.cat([half(ids[:, a:b], kv_cache=cache) for a, b in [(0, 10), (10, 11), (11, 12), (12, 16)]], 1)
    assert cached.dtype == dtype
    assert_close(cached, want, f"{name} cache vs float32", atol=atol)


# ---- 8: official tensor names -------------------------------------------------------------------

OFFICIAL_2_LAYER_KEYS = [
    "transformer.embedding.word_embeddings.weight",
    "transformer.encoder.layers.0.input_layernorm.weight",
    "transformer.encoder.layers.0.self_attention.query_key_value.weight",
    "transformer.encoder.layers.0.self_attention.query_key_value.bias",
    "transformer.encoder.layers.0.self_attention.dense.weight",
    "transformer.encoder.layers.0.post_attention_layernorm.weight",
    "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight",
    "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight",
    "transformer.encoder.layers.1.input_layernorm.weight",
    "transformer.encoder.layers.1.self_attention.query_key_value.weight",
    "transformer.encoder.layers.1.self_attention.query_key_value.bias",
    "transformer.encoder.layers.1.self_attention.dense.weight",
    "transformer.encoder.layers.1.post_attention_layernorm.weight",
    "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight",
    "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight",
    "transformer.encoder.final_layernorm.weight",
    "transformer.output_layer.weight",
]


def test_state_dict_has_official_names_and_shapes():
    model = ChatGLMForCausalLM(ModelConfig(**BASE))
    state = model.state_dict()
    assert sorted(state) == sorted(OFFICIAL_2_LAYER_KEYS)
    h, f, H, G, D, V = 64, 96, 4, 2, 16, VOCAB
    layer = "transformer.encoder.layers.1."
    shapes = {
        "transformer.embedding.word_embeddings.weight": (V, h),
        layer + "input_layernorm.weight": (h,),
        layer + "self_attention.query_key_value.weight": ((H + 2 * G) * D, h),
        layer + "self_attention.query_key_value.bias": ((H + 2 * G) * D,),
        layer + "self_attention.dense.weight": (h, H * D),
        layer + "post_attention_layernorm.weight": (h,),
        layer + "mlp.dense_h_to_4h.weight": (2 * f, h),
        layer + "mlp.dense_4h_to_h.weight": (h, f),
        "transformer.encoder.final_layernorm.weight": (h,),
        "transformer.output_layer.weight": (V, h),
    }
    for name, shape in shapes.items():
        assert tuple(state[name].shape) == shape, name


@pytest.mark.parametrize("projection", [False, True])
def test_state_dict_prefix_names(projection):
    model = ChatGLMForCausalLM(ModelConfig(**BASE, pre_seq_len=6, prefix_projection=projection))
    state = model.state_dict()
    extra = sorted(set(state) - set(OFFICIAL_2_LAYER_KEYS))
    kv_size = 2 * 2 * 2 * 16  # num_layers * 2 * multi_query_group_num * kv_channels
    want = {"transformer.prefix_encoder.embedding.weight": (6, kv_size)}
    if projection:
        want.update({"transformer.prefix_encoder.trans.0.weight": (64, kv_size),
                     "transformer.prefix_encoder.trans.0.bias": (64,),
                     "transformer.prefix_encoder.trans.2.weight": (kv_size, 64),
                     "transformer.prefix_encoder.trans.2.bias": (kv_size,)})
    assert extra == sorted(want)
    assert set(OFFICIAL_2_LAYER_KEYS) <= set(state)
    for name, shape in want.items():
        assert tuple(state[name].shape) == shape, name
