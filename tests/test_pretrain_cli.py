"""`glmkit pretrain`, end to end on a tiny model made by glmkit's own commands from a tiny corpus.

The command is the loop on packed windows: it computes exactly what `glmkit.train.train` computes on
`PretrainWindows`, resumes exactly, runs under torchrun, and refuses data the model cannot train on.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import glmkit
from glmkit.cli import main
from glmkit.train import PackedTokens, PretrainWindows, TrainConfig, train
from glmkit.train.progress import read_log

REPO = Path(__file__).resolve().parents[1]
WINDOW = 32
SHAPE = {"num_layers": 1, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 2, "kv_channels": 16,
         "multi_query_group_num": 1, "seq_length": 64}


def weather_corpus(path: Path, documents: int, seed: int) -> Path:
    """Repetitive English sentences: a small vocabulary, and structure a model learns in a few steps."""
    rng = random.Random(seed)
    cities, skies = ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo"], ["sunny", "cloudy", "rainy", "windy"]
    lines = [" ".join(f"The weather in {rng.choice(cities)} is {rng.choice(skies)} and {rng.randint(0, 35)} degrees "
                      "today." for _ in range(rng.randint(2, 6))) for _ in range(documents)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
    return path


def run(capsys, args: list) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """tok/ (300 pieces), shards/ and held-out/ (its shards), init/ (a fresh model), other-tok/ (another tokenizer)."""
    root = tmp_path_factory.mktemp("pretrain")
    corpus = weather_corpus(root / "corpus.jsonl", 80, seed=0)
    held_out = weather_corpus(root / "held-out.jsonl", 10, seed=1)
    for argv in (["train-tokenizer", "--input", corpus, "--vocab-size", 300, "--out", root / "tok"],
                 ["train-tokenizer", "--input", corpus, "--vocab-size", 400, "--out", root / "other-tok"],
                 ["tokenize-corpus", "--input", corpus, "--tokenizer", root / "tok", "--out", root / "shards"],
                 ["tokenize-corpus", "--input", held_out, "--tokenizer", root / "tok", "--out", root / "held-out"],
                 ["init-model", "--config", "tiny", *[a for k, v in SHAPE.items() for a in ("--set", f"{k}={v}")],
                  "--tokenizer", root / "tok", "--out", root / "init"]):
        assert main([str(a) for a in argv]) == 0, argv
    return root


def pretrain_args(made: Path, out: Path, *extra) -> list:
    return ["pretrain", "--model", made / "init", "--shards", made / "shards", "--window", WINDOW, "--lr", "1e-2",
            "--max-steps", 6, "--batch-size", 4, "--warmup-steps", 1, "--min-lr-ratio", "0.1", "--weight-decay",
            "0.1", "--seed", 3, "--device", "cpu", "--out", out, "--no-progress", *extra]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out) if "loss" in r]


def test_pretraining_lowers_the_loss_and_writes_a_checkpoint_glmkit_loads(made, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(capsys, pretrain_args(made, out, "--eval", made / "held-out"))
    assert code == 0, err
    assert f"windows of {WINDOW} tokens" in err and "eval loss" in err and "wrote full result" in err
    curve = losses(out)
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.5, curve
    evals = [r["eval_loss"] for r in read_log(out) if "eval_loss" in r]
    assert len(evals) == 1 and evals[0] < curve[0]
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model",
                                               "train_log.jsonl", "train_config.json"}

    # The command is the loop on the shards' windows: the same numbers, bit for bit.
    tok = glmkit.load_tokenizer(made / "init")
    windows = PretrainWindows(PackedTokens(made / "shards", tok), WINDOW)
    expected = glmkit.load_model(made / "init", dtype="float32")
    result = train(expected, windows, None, TrainConfig(
        method="full", lr=1e-2, max_steps=6, batch_size=4, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.1,
        seed=3, device="cpu", progress=False), tok)
    assert list(result.train_loss.values()) == curve
    trained = glmkit.load_model(out, dtype="float32")
    ids = torch.tensor([windows[0]["input_ids"]])
    assert torch.equal(trained(ids), expected(ids))
    assert not torch.equal(trained(ids), glmkit.load_model(made / "init", dtype="float32")(ids))


def test_a_stopped_run_resumes_as_if_it_never_stopped(made, tmp_path, capsys):
    code, err = run(capsys, pretrain_args(made, tmp_path / "whole"))
    assert code == 0, err
    code, err = run(capsys, pretrain_args(made, tmp_path / "parts", "--stop-after", 3))
    assert code == 0 and "stopped; resume with --resume" in err, err
    assert not (tmp_path / "parts" / "model.safetensors").exists()
    code, err = run(capsys, pretrain_args(made, tmp_path / "parts", "--resume"))
    assert code == 0 and "step 6/6" in err, err
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    whole, parts = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "parts" / "model.safetensors")
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)


def test_shards_the_model_cannot_train_on_are_refused_by_name(made, tmp_path, capsys):
    base = pretrain_args(made, tmp_path / "out")

    def error(**changes) -> str:
        args = list(base)
        for flag, value in changes.items():
            args[args.index(f"--{flag}") + 1] = value
        code, err = run(capsys, args)
        assert code == 2, err
        return err

    assert main(["tokenize-corpus", "--input", str(made / "corpus.jsonl"), "--tokenizer", str(made / "other-tok"),
                 "--out", str(tmp_path / "foreign")]) == 0
    capsys.readouterr()
    assert "--shards {} was tokenized with another tokenizer (409 ids) than the model's (309 ids)".format(
        tmp_path / "foreign") in error(shards=tmp_path / "foreign")

    small = tmp_path / "small-vocab"
    shutil.copytree(made / "init", small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "padded_vocab_size": 256}))
    assert "holds ids of a 309-id vocabulary; the model's embedding has 256 rows" in error(model=small)

    assert "--window 65 is longer than the model's seq_length of 64" in error(window=65)
    assert "--window 1: a window needs at least 2 tokens" in error(window=1)
    (tmp_path / "empty").mkdir()
    assert f"--shards {tmp_path / 'empty'} is empty" in error(shards=tmp_path / "empty")
    assert "no such folder" in error(shards=tmp_path / "missing")
    assert "no index.json" in error(shards=made / "tok")
    (tmp_path / "short.jsonl").write_text('{"text": "Sunny."}\n', encoding="utf-8")
    assert main(["tokenize-corpus", "--input", str(tmp_path / "short.jsonl"), "--tokenizer", str(made / "tok"),
                 "--out", str(tmp_path / "short")]) == 0
    capsys.readouterr()
    assert "fewer than one window of 32" in error(shards=tmp_path / "short")
    assert "--max-steps=0 must be a positive integer" in error(**{"max-steps": 0})
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two Python processes with torch: ~10 s here
def test_two_processes_under_torchrun_compute_what_one_computes(made, tmp_path, capsys):
    assert main([str(a) for a in pretrain_args(made, tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "glmkit.cli", *[str(a) for a in pretrain_args(made, tmp_path / "two")]],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name, tensor in one.items():
        # The key bias barely moves the loss (its non-rotary half not at all: softmax ignores a shift shared
        # by every key), and Adam scales its near-zero gradients, rounding included, up to steps of size lr.
        atol = 1e-4 if name.endswith("query_key_value.bias") else 1e-6
        torch.testing.assert_close(two[name], tensor, atol=atol, rtol=1e-5, msg=name)
