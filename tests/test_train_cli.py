"""`glmkit finetune`, `glmkit merge-lora` and `glmkit chat --adapter`, end to end on a tiny checkpoint."""

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_checkpoint

from glmkit.cli import main
from glmkit.loader import load_model
from glmkit.lora import load_adapter, merge_lora

CONVERSATION = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}
IDS = torch.tensor([[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("finetune") / "base")


def jsonl(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def run(monkeypatch, capsys, args: list[str], stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_lora_adapter_chats_and_merges_into_a_plain_checkpoint(base, tmp_path, monkeypatch, capsys):
    data = jsonl(tmp_path / "d.jsonl", [CONVERSATION] * 4)
    code, _, err = run(monkeypatch, capsys, ["finetune", "--model", str(base), "--train", data, "--eval", data,
                                             "--method", "lora", "--lr", "1e-2", "--max-steps", "2", "--batch-size",
                                             "2", "--out", str(tmp_path / "adapter"), "--no-progress"])
    assert code == 0, err
    assert "4 examples from 4 lines" in err and "eval loss" in err and "wrote lora result" in err

    code, _, err = run(monkeypatch, capsys, ["merge-lora", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                                             "--out", str(tmp_path / "merged")])
    assert code == 0, err
    merged = load_model(tmp_path / "merged", dtype="float32")
    expected = merge_lora(load_adapter(load_model(base, dtype="float32"), tmp_path / "adapter"))
    assert torch.equal(merged(IDS), expected(IDS))
    assert not torch.equal(merged(IDS), load_model(base, dtype="float32")(IDS))
    assert (tmp_path / "merged" / "tokenizer.model").is_file()

    greedy = ["--temperature", "0", "--max-new-tokens", "6"]
    code, with_adapter, _ = run(monkeypatch, capsys, ["chat", "--model", str(base), "--adapter",
                                                      str(tmp_path / "adapter"), *greedy], "hello\n")
    assert code == 0
    code, from_merged, _ = run(monkeypatch, capsys, ["chat", "--model", str(tmp_path / "merged"), *greedy], "hello\n")
    assert code == 0 and with_adapter == from_merged


def test_bad_lines_stop_the_run_unless_skipped_and_are_reported(base, tmp_path, monkeypatch, capsys):
    data = jsonl(tmp_path / "d.jsonl", [CONVERSATION, "{oops", CONVERSATION])
    args = ["finetune", "--model", str(base), "--train", data, "--method", "ptuning", "--pre-seq-len", "2",
            "--max-steps", "1", "--batch-size", "2", "--out", str(tmp_path / "out"), "--no-progress"]
    code, _, err = run(monkeypatch, capsys, args)
    assert code == 2
    assert "1 bad line(s) out of 3" in err and "line 2: not valid JSON" in err
    code, _, err = run(monkeypatch, capsys, [*args, "--skip-bad-lines"])
    assert code == 0, err
    assert "1 bad lines skipped" in err and "skipped line 2: not valid JSON" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the prefix


def test_settings_that_cannot_work_are_named(base, tmp_path, monkeypatch, capsys):
    data = jsonl(tmp_path / "d.jsonl", [CONVERSATION])
    common = ["finetune", "--model", str(base), "--train", data, "--method", "full", "--out", str(tmp_path / "o")]
    code, _, err = run(monkeypatch, capsys, [*common, "--max-steps", "0"])
    assert code == 2 and "--max-steps=0 must be a positive integer" in err
    code, _, err = run(monkeypatch, capsys, [*common, "--batch-size", "3", "--grad-accum", "2"])
    assert code == 2 and "batch_size=3 examples per step cannot be split evenly" in err
