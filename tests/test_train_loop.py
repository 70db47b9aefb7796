"""The training loop on a tiny model: each method learns and touches only its parameters, outputs
reload exactly, resuming reproduces the uninterrupted run, and batches split any way compute the same step."""

import itertools
import json

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_model

from glmkit.loader import load_model, save_model
from glmkit.lora import LoRALinear, load_adapter
from glmkit.train import TrainConfig, TrainConfigError, train
from glmkit.train.batches import GlobalBatches
from glmkit.train.checkpoint import latest
from glmkit.train.loop import lr_factor
from glmkit.train.progress import read_log

VOCAB = 256  # a small vocabulary keeps each step quick; the loop does not depend on it
IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def examples(n: int, length: int = 16, seed: int = 0) -> list[dict]:
    """Arithmetic sequences (learnable), the first 4 tokens a prompt without loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, stride = int(torch.randint(0, VOCAB, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        ids = [(start + stride * j) % VOCAB for j in range(length - int(torch.randint(0, 4, (1,), generator=g)))]
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


def config(**overrides) -> TrainConfig:
    settings = {"batch_size": 4, "max_steps": 6, "progress": False, "pre_seq_len": 4, "seed": 3}
    return TrainConfig(**{**settings, **overrides})


def model(**overrides):
    return tiny_model(0, padded_vocab_size=VOCAB, **overrides)


@pytest.mark.parametrize("method, lr, margin", [("full", 1e-2, 2.0), ("lora", 2e-2, 0.5), ("ptuning", 1e-1, 0.03)])
def test_loss_falls_for_each_method(method, lr, margin):
    result = train(model(), examples(4), None, config(method=method, lr=lr))
    losses = list(result.train_loss.values())
    assert len(losses) == 6 and result.completed
    assert losses[-1] < losses[0] - margin, losses


def test_ptuning_changes_only_the_prefix_and_saves_it_in_the_official_layout(tmp_path):
    base = model()
    save_model(base, tmp_path / "base")
    before = {n: t.clone() for n, t in base.state_dict().items()}
    result = train(base, examples(4), None, config(method="ptuning", lr=1e-1, out_dir=tmp_path / "out"))
    after = base.state_dict()
    assert set(after) - set(before) == {"transformer.prefix_encoder.embedding.weight"}
    assert all(torch.equal(after[n], before[n]) for n in before)
    with safe_open(str(result.output / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"transformer.prefix_encoder.embedding.weight"}
    assert json.loads((result.output / "config.json").read_text())["pre_seq_len"] == 4
    reloaded = load_model(tmp_path / "base", dtype="float32", prefix=result.output)
    assert torch.equal(reloaded(IDS), base(IDS))


def test_lora_trains_only_adapters_and_its_saved_adapter_reproduces_the_model(tmp_path):
    trained = model()
    base_state = {n: t.clone() for n, t in model().state_dict().items()}
    result = train(trained, examples(4), None, config(method="lora", lr=2e-2, out_dir=tmp_path))
    for name, module in trained.named_modules():
        if isinstance(module, LoRALinear):
            assert torch.equal(module.base_layer.weight, base_state[name + ".weight"])
    plain = {n: t for n, t in trained.state_dict().items() if ".lora_" not in n}
    assert all(torch.equal(t, base_state[n.replace(".base_layer", "")]) for n, t in plain.items())
    assert (result.output / "adapter_model.safetensors").is_file()
    assert torch.equal(load_adapter(model(), result.output).eval()(IDS), trained(IDS))


def test_a_full_checkpoint_reloads_with_identical_logits(tmp_path, tok):
    trained = model()
    result = train(trained, examples(4), None, config(method="full", lr=1e-2, out_dir=tmp_path), tokenizer=tok)
    assert (tmp_path / "tokenizer.model").read_bytes() == tok.path.read_bytes()
    reloaded = load_model(result.output, dtype="float32")
    assert torch.equal(reloaded(IDS), trained(IDS))
    assert not torch.equal(reloaded(IDS), model()(IDS))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_a_stop_reproduces_the_uninterrupted_run_exactly(tmp_path, method):
    # Dropout (LoRA) and the prefix-free full model, accumulation, warm-up, shuffled epochs, evaluation:
    # everything a resumed run must restore.
    settings = {"method": method, "lr": 1e-2, "grad_accum": 2, "warmup_steps": 2, "eval_every": 2,
                "lora_dropout": 0.2, "batch_size": 4}
    data, held_out = examples(6), examples(2, seed=1)
    whole = model()
    uninterrupted = train(whole, data, held_out, config(**settings))

    first = train(model(), data, held_out, config(**settings, out_dir=tmp_path, stop_after=3, save_every=2))
    assert not first.completed and first.steps == 3
    assert latest(tmp_path).name == "step-000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    resumed_model = model()
    second = train(resumed_model, data, held_out, config(**settings, out_dir=tmp_path, resume="latest"))

    assert second.completed
    assert {**first.train_loss, **second.train_loss} == uninterrupted.train_loss  # bit for bit
    assert {**first.eval_loss, **second.eval_loss} == uninterrupted.eval_loss
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    logged = [r["loss"] for r in read_log(tmp_path) if "loss" in r]
    assert logged == list(uninterrupted.train_loss.values())


def test_resume_refuses_a_checkpoint_of_another_run_and_a_fresh_run_refuses_old_checkpoints(tmp_path):
    train(model(), examples(4), None, config(method="lora", out_dir=tmp_path, stop_after=2))
    with pytest.raises(ValueError, match="different run.*lr: checkpoint 0.0002, now 0.001"):
        train(model(), examples(4), None, config(method="lora", lr=1e-3, out_dir=tmp_path, resume="latest"))
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run \\(step-000002\\): resume it"):
        train(model(), examples(4), None, config(method="lora", out_dir=tmp_path))


def test_gradient_accumulation_computes_the_same_steps():
    data = examples(8)
    runs = [train(model(), data, None, config(method="full", lr=1e-2, batch_size=4, grad_accum=accum, max_steps=3))
            for accum in (1, 2, 4)]
    for run in runs[1:]:
        for step, loss in run.train_loss.items():
            assert loss == pytest.approx(runs[0].train_loss[step], rel=1e-5)


def test_batch_split_must_be_even():
    with pytest.raises(TrainConfigError, match="batch_size=6 .* grad_accum=4; use a multiple of 4"):
        train(model(), examples(8), None, config(batch_size=6, grad_accum=4))


def test_global_batches_visit_every_example_once_per_epoch_and_iterables_resume_in_place():
    data = [{"input_ids": [i, i], "labels": [i, i]} for i in range(10)]
    batches = GlobalBatches(data, batch_size=5, shuffle=True, seed=0)
    epoch = [e["input_ids"][0] for k in (0, 1) for e in batches.batch(k)]
    assert sorted(epoch) == list(range(10)) and epoch != list(range(10))
    assert [e["input_ids"][0] for e in batches.batch(2) + batches.batch(3)] != epoch  # a new order next epoch
    assert batches.batch(1) == GlobalBatches(data, 5, True, 0).batch(1)  # computed, not replayed

    class Stream:  # re-iterable, no length
        def __iter__(self):
            return iter(data[:7])

    stream = GlobalBatches(Stream(), batch_size=3, shuffle=True, seed=0)
    assert [e["input_ids"][0] for k in range(4) for e in stream.batch(k)] == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]
    assert [e["input_ids"][0] for e in GlobalBatches(Stream(), 3, True, 0).batch(2)] == [6, 0, 1]
    with pytest.raises(ValueError, match="an iterator cannot be read twice"):
        once = GlobalBatches(iter(data[:4]), batch_size=3, shuffle=False, seed=0)
        once.batch(0), once.batch(1)


def test_learning_rate_warms_up_then_decays_by_a_cosine():
    factors = [lr_factor(i, warmup=2, total=6, min_ratio=0.1) for i in range(6)]
    assert factors[:3] == [0.5, 1.0, 1.0]  # the peak at the end of warm-up and on the first step after it
    assert all(a > b for a, b in itertools.pairwise(factors[2:]))
    assert factors[-1] > 0.1  # the last step still learns
    assert lr_factor(6, warmup=2, total=6, min_ratio=0.1) == pytest.approx(0.1)  # one step past the end


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lora_on_cuda_over_a_bf16_base_with_autocast():
    trained = model().to(torch.bfloat16)
    result = train(trained, examples(4), None, config(method="lora", lr=2e-2, bf16=True))  # device: cuda:0
    adapters = [p for n, p in trained.named_parameters() if ".lora_" in n]
    assert adapters and all(p.device.type == "cuda" and p.dtype == torch.float32 for p in adapters)
    assert trained.transformer.output_layer.weight.dtype == torch.bfloat16
    losses = list(result.train_loss.values())
    assert losses[-1] < losses[0] - 0.3, losses
