"""`glmkit finetune` under torchrun (2 processes, gloo on the CPU) computes what one process computes.

The same global batch is split between the processes, so losses and weights agree with a plain run to
float rounding. FSDP's checkpoints hold whole weights: a 2-process sharded run, stopped, resumes on one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_checkpoint

from glmkit.cli import main
from glmkit.loader import load_model
from glmkit.train.progress import read_log

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each torchrun launch starts two Python processes with torch: ~10 s here

EXCHANGES = [("hi", "hello!"), ("你好", "你好！"), ("2+2?", "4"), ("name?", "glmkit"), ("thanks", "you are welcome"),
             ("bye", "再见"), ("1+1?", "2"), ("ok?", "ok")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("distributed")
    base = make_tiny_checkpoint(folder / "base")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}]},
                                       ensure_ascii=False) + "\n" for q, a in EXCHANGES), encoding="utf-8")
    return base, data


def finetune_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(base), "--train", str(data), "--out", str(out), "--lr", "1e-2",
            "--max-steps", "3", "--batch-size", "4", "--no-progress", *extra]


def torchrun(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "glmkit.cli", *args], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out) if "loss" in r]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_two_process_ddp_lora_equals_one_process(setup, tmp_path):
    base, data = setup
    assert main(finetune_args(base, data, tmp_path / "one", "--method", "lora")) == 0
    torchrun(finetune_args(base, data, tmp_path / "two", "--method", "lora"))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    assert_same_tensors(load_file(tmp_path / "two" / "adapter_model.safetensors"),
                        load_file(tmp_path / "one" / "adapter_model.safetensors"))


def test_two_process_fsdp_checkpoint_resumes_on_one_process_as_an_uninterrupted_run(setup, tmp_path):
    base, data = setup
    assert main(finetune_args(base, data, tmp_path / "one", "--method", "full")) == 0
    torchrun(finetune_args(base, data, tmp_path / "two", "--method", "full", "--fsdp", "--stop-after", "2"))
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.pt", "rng-rank0.pt", "rng-rank1.pt", "trainable.safetensors", "trainer.json"]
    assert main(finetune_args(base, data, tmp_path / "two", "--method", "full", "--resume")) == 0
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    # Weights are compared by what they compute: AdamW divides each gradient by its own running size, so
    # a weight whose gradient is pure rounding noise (the key bias: softmax ignores a shift) moves by
    # about lr either way, while the logits agree.
    ids = torch.tensor([[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]])
    torch.testing.assert_close(load_model(tmp_path / "two", dtype="float32")(ids),
                               load_model(tmp_path / "one", dtype="float32")(ids), atol=1e-4, rtol=1e-4)
