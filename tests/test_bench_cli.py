"""`glmkit bench`: one table of prefill, decode, first token, memory and roofline, per mode.

The real numbers come from the 6B shape (see benchmarks/RESULTS.md); here a tiny shape proves the
command end to end: children per mode, random weights made in each mode's own format, the JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_checkpoint

from glmkit.commands.bench import random_model, weight_bytes_per_token
from glmkit.config import ModelConfig
from glmkit.loader import save_model
from glmkit.quant import Int4Linear, QuantConfig, QuantizedEmbedding

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--prompt", "8", "--new", "4", "--rounds", "2", "--bandwidth-gib", "0.125"]


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "glmkit.cli", "bench", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300, check=False)


@pytest.mark.slow  # four processes
def test_random_shape_reports_every_mode(tmp_path):
    report = tmp_path / "bench.json"
    result = bench("--shape", "tiny", "--group-size", "32", "--json", str(report), *QUICK, "--bandwidth-gib", "1")
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("mode"))
    assert [line.split()[0] for line in table[header + 1:]] == ["bf16", "int8", "int4"]
    data = json.loads(report.read_text())
    assert data["prompt"] == 8 and data["rounds"] == 2
    rows = data["results"]
    for r in rows.values():
        assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss"] > 0 and r["load_s"] > 0
        assert r["bandwidth"] > 0  # measured in each mode's own process, between its decode rounds
        assert r["roofline_tok_s"] == pytest.approx(r["bandwidth"] / r["bytes_per_token"])
        assert r["peak_rss"] < 2**30  # the tiny model's own peak: the 1 GiB bandwidth buffer comes after it
    # Fewer bytes per token with fewer bits (the tiny shape's output layer, int8 in both, dominates).
    assert rows["bf16"]["bytes_per_token"] > rows["int8"]["bytes_per_token"] > rows["int4"]["bytes_per_token"]
    assert "random 2-layer weights" in result.stderr  # the progress bar


@pytest.mark.slow  # five processes
def test_checkpoints_float_and_quantized(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "float")
    result = bench("--model", str(folder), "--modes", "int8", *QUICK)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split()[0] == "int8"
    from glmkit.loader import load_model

    quantized = save_model(load_model(folder, quantize=QuantConfig("int4", 32)), tmp_path / "int4")
    result = bench("--model", str(quantized), *QUICK)  # its own mode, by default
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split()[0] == "int4"
    result = bench("--model", str(quantized), "--modes", "bf16", *QUICK)
    assert result.returncode == 2 and "is a quantized checkpoint (int4)" in result.stderr


def test_bad_arguments_are_one_line_errors():
    result = bench("--shape", "tiny", "--modes", "int3")
    assert result.returncode == 2 and "modes must be among" in result.stderr
    result = bench("--shape", "tiny", "--new", "1")
    assert result.returncode == 2 and "--new at least 2" in result.stderr
    result = bench("--shape", "tiny", "--rounds", "0")
    assert result.returncode == 2 and "--rounds must be at least 1" in result.stderr


def test_random_weights_are_made_in_the_quantized_format_and_counted():
    config = ModelConfig.preset("tiny")
    model = random_model(config, QuantConfig("int4", 32, embedding="int4"))
    assert isinstance(model.transformer.embedding.word_embeddings, QuantizedEmbedding)
    mlp = model.transformer.encoder.layers[0].mlp.dense_h_to_4h
    assert isinstance(mlp, Int4Linear) and mlp.weight.dtype == torch.uint8 and not mlp.weight.is_meta
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits.float()).all() and logits.float().std() > 0
    counted = weight_bytes_per_token(model)
    embedding = sum(t.nbytes for t in model.transformer.embedding.word_embeddings.buffers())
    everything = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    assert counted == everything - embedding
