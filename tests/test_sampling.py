"""sample(): greedy, top-k, top-p, temperature, repetition penalty, seeds, per-row params, validation."""

from __future__ import annotations

import math

import pytest
import torch

from glmkit.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    argmax_rows,
    make_generator,
    presence_mask,
    sample,
)

GREEDY = SamplingParams(temperature=0.0)


def draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0, **kw) -> torch.Tensor:
    """n independent draws from one row of logits, as one batch of n identical rows."""
    torch.manual_seed(seed)
    return sample(logits.expand(n, -1), [params] * n, **kw)


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, [GREEDY] * 5), logits.argmax(-1))


def test_top_k_1_is_greedy():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.5, top_k=1)] * 8
    assert torch.equal(sample(logits, params), logits.argmax(-1))


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 2.8]])
    ids = draw(logits, SamplingParams(temperature=10.0, top_k=3), 2000)
    assert set(ids.tolist()) == {1, 3, 5}


def test_top_p_keeps_the_minimal_nucleus():
    # probabilities 0.5, 0.25, 0.15, 0.1 (in a shuffled order)
    probs = torch.tensor([0.15, 0.5, 0.1, 0.25])
    logits = probs.log()[None]
    # 0.5 < 0.6: the second token is needed; 0.75 >= 0.6: the third is not.
    assert set(draw(logits, SamplingParams(top_p=0.6), 2000).tolist()) == {1, 3}
    # Exactly the most likely token when it alone reaches top_p.
    assert set(draw(logits, SamplingParams(top_p=0.45), 500).tolist()) == {1}
    # 0.75 < 0.8: three tokens; the least likely (0.1) is out.
    assert set(draw(logits, SamplingParams(top_p=0.8), 3000).tolist()) == {0, 1, 3}
    # Off: every token.
    assert set(draw(logits, SamplingParams(top_p=1.0), 3000).tolist()) == {0, 1, 2, 3}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    ids = draw(probs.log()[None], SamplingParams(), 20000)
    freq = torch.bincount(ids, minlength=3).float() / ids.numel()
    assert torch.allclose(freq, probs, atol=0.02)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])

    def share_of_best(t: float) -> float:
        ids = draw(logits, SamplingParams(temperature=t), 20000)
        return (ids == 0).float().mean().item()

    expected = {t: torch.softmax(logits[0] / t, -1)[0].item() for t in (0.5, 1.0, 2.0)}
    for t, p in expected.items():
        assert share_of_best(t) == pytest.approx(p, abs=0.02)
    assert expected[0.5] > expected[1.0] > expected[2.0]


def test_repetition_penalty_as_hf():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    # seen positive logit divided, seen negative multiplied, unseen untouched
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]

    # Through sample(): token 0 (seen, 2 / 4) drops below token 2, so greedy switches to it.
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    assert sample(logits, [params], seen=[[0, 1]]).tolist() == [2]
    assert sample(logits, [params], seen=seen).tolist() == [2]
    assert sample(logits, [GREEDY], seen=[[0, 1]]).tolist() == [0]  # penalty 1: no effect


def test_repetition_penalty_needs_seen_tokens():
    with pytest.raises(ValueError, match="seen"):
        sample(torch.zeros(1, 4), [SamplingParams(repetition_penalty=1.2)])


def test_presence_mask():
    mask = presence_mask([[1, 3, 3], []], 5)
    assert mask.tolist() == [[False, True, False, True, False], [False] * 5]


def test_per_row_params_in_one_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 50, generator=gen)
    logits[2] = torch.tensor([5.0, 4.9] + [-10.0] * 48)
    params = [
        GREEDY,
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=0.0, repetition_penalty=3.0),
    ]
    seen = [[], [], [], [int(logits[3].argmax())]]
    for seed in range(8):
        torch.manual_seed(seed)
        ids = sample(logits, params, seen=seen)
        assert ids[0] == logits[0].argmax()
        assert ids[1] == logits[1].argmax()
        assert ids[2] in (0, 1)
        assert ids[3] == apply_repetition_penalty(logits[3:], presence_mask(seen[3:], 50), torch.tensor([3.0])).argmax()
    torch.manual_seed(0)
    row2 = {int(sample(logits, params, seen=seen)[2]) for _ in range(60)}
    assert row2 == {0, 1}  # row 2 really samples while rows 0, 1, 3 are greedy


def test_same_seed_same_tokens_whatever_the_batch():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=1.0, seed=7)] * 3

    def run(rows):
        gens = [make_generator(7, "cpu") for _ in rows]
        return [sample(logits[rows], [params[0]] * len(rows), generators=gens).tolist() for _ in range(5)]

    assert run([0, 1, 2]) == run([0, 1, 2])
    alone = run([1])
    together = run([0, 1, 2])
    assert [step[0] for step in alone] == [step[1] for step in together]
    # A different seed draws differently (five draws over 1000 tokens: equal only by a fluke).
    gen = make_generator(8, "cpu")
    other = [sample(logits[[1]], [params[0]], generators=[gen]).item() for _ in range(5)]
    assert other != [step[0] for step in alone]
    # Seeded rows do not touch the global generator; unseeded rows use it.
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    sample(logits, params, generators=[make_generator(1, "cpu")] * 3)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_seeded_row_independent_of_its_batch_mates_top_k():
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(4))
    mine = SamplingParams(temperature=2.0, top_k=30, seed=5)
    alone = sample(logits[[0]], [mine], generators=[make_generator(5, "cpu")])
    for other in (SamplingParams(top_k=200), SamplingParams(top_k=0), SamplingParams(temperature=0)):
        batch = sample(logits, [mine, other], generators=[make_generator(5, "cpu"), None])
        assert batch[0] == alone[0]


def test_padded_vocab_is_never_sampled():
    V, real = 64, 40
    logits = torch.zeros(64, V)
    logits[:, real:] = 100.0  # the padding rows would win every time
    params = [GREEDY, SamplingParams(), SamplingParams(top_k=5), SamplingParams(top_p=0.5, temperature=3.0)] * 16
    for seed in range(5):
        torch.manual_seed(seed)
        ids = sample(logits, params, vocab_size=real)
        assert int(ids.max()) < real


def test_input_logits_untouched_and_half_precision_accepted():
    logits = torch.randn(2, 30).to(torch.bfloat16)
    copy = logits.clone()
    sample(logits, [SamplingParams(repetition_penalty=1.5)] * 2, seen=[[1], [2]], vocab_size=20)
    assert torch.equal(logits, copy)
    f32 = torch.randn(2, 30)
    copy = f32.clone()
    sample(f32, [SamplingParams()] * 2, vocab_size=20)
    assert torch.equal(f32, copy)


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("seed", "42"), ("max_new_tokens", 0), ("max_new_tokens", 2.5),
    ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]),
])
def test_invalid_params_are_rejected_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_defaults_and_stop_string():
    p = SamplingParams(stop="\n\n")
    assert p.stop == ["\n\n"] and p.stop_token_ids is None and not p.greedy
    assert SamplingParams(temperature=0).greedy


def test_row_count_mismatch():
    with pytest.raises(ValueError, match="2 rows"):
        sample(torch.zeros(2, 5), [GREEDY])


def test_argmax_rows_equals_torch_argmax_ties_included():
    torch.manual_seed(0)
    logits = torch.randn(5, 65024)
    logits[1, 70] = logits[1, 60000] = 9.0  # equal maxima in two blocks: the first wins
    logits[2, 1030] = logits[2, 1031] = 9.0  # equal maxima in one block
    logits[3, 64000:] = -math.inf  # a masked tail
    logits[4] = -1.0  # all equal: id 0
    ids = argmax_rows(logits)
    assert torch.equal(ids, logits.argmax(dim=-1))
    assert ids.tolist()[1:] == [70, 1030, int(logits[3].argmax()), 0]
    odd = torch.randn(3, 5001)  # not whole blocks: torch's argmax
    assert torch.equal(argmax_rows(odd), odd.argmax(dim=-1))
    assert torch.equal(argmax_rows(logits.t().contiguous().t()), logits.argmax(dim=-1))  # any strides
