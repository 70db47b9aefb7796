"""Build the `glmkit-demo` model from nothing, each stage a glmkit command or function:

    python -m glmkit.demo.build --out DIR --seed 0

1. data       synthetic conversations (glmkit.demo.synth): SFT set, held-out set, raw-text corpus
2. tokenizer  glmkit train-tokenizer: a SentencePiece model in the ChatGLM3 scheme, the names
              replies copy (cities, units) kept one piece each
3. shards     glmkit tokenize-corpus: the corpus tokenized once into packed token shards
4. init       glmkit init-model: a fresh ChatGLM3-architecture model of the recipe's shape
5. pretrain   glmkit pretrain: every weight, on contiguous windows of the shards
6. sft        glmkit finetune --method full on the conversations
7. model      DIR/model: config.json, bfloat16 weights, tokenizer.model, demo.json
8. evaluate   python -m glmkit.demo.evaluate: held-out tool calls and answers, on the saved model

Commands run in this process and are printed as they start, so any stage can be rerun by hand.
DIR/build.json records the recipe and each stage's seconds and results. The same seed gives the
same data, tokenizer, initial weights and data order. `--preset toy` runs the whole recipe at a
toy size in seconds (the tests use it); `--set name=value` changes one field of the `Recipe`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .content import NAME

MAX_PARAMETERS = 10_000_000
MAX_BYTES = 25 * 1000 * 1000
LENGTH_GROUP = 50  # SFT batches are formed from this many batches' worth of examples of similar length


@dataclass(frozen=True)
class Recipe:
    """Every number of the build."""

    # data
    sft_conversations: int = 19200  # one pass: sft_steps x sft_batch
    corpus_conversations: int = 6000  # pretraining reads these and the SFT ones as plain text
    eval_conversations: int = 300  # held out, for the tool-use evaluation
    sft_eval_conversations: int = 64  # held out, for the SFT eval loss
    # tokenizer
    vocab_size: int = 4096  # SentencePiece pieces; the nine special tokens follow
    # model (ChatGLM3 architecture)
    num_layers: int = 6
    hidden_size: int = 256
    ffn_hidden_size: int = 704
    num_attention_heads: int = 8
    kv_channels: int = 32
    multi_query_group_num: int = 8  # one key/value per head: with 2 groups the model learned to copy far worse
    seq_length: int = 1024
    # pretraining on the raw-text corpus
    pretrain_window: int = 512
    pretrain_steps: int = 500
    pretrain_batch: int = 8
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 25
    # supervised fine-tuning on the conversations
    sft_steps: int = 1200
    sft_batch: int = 16
    sft_lr: float = 1e-3
    sft_warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1

    def model_fields(self) -> dict[str, Any]:
        names = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
                 "multi_query_group_num", "seq_length")
        return {name: getattr(self, name) for name in names}


PRESETS: dict[str, Recipe] = {
    "demo": Recipe(),
    # The whole recipe in seconds, for tests: tiny data, model and runs; its quality means nothing.
    "toy": Recipe(sft_conversations=48, corpus_conversations=48, eval_conversations=3, sft_eval_conversations=2,
                  vocab_size=700, num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                  kv_channels=16, multi_query_group_num=1, pretrain_window=64, pretrain_steps=2, pretrain_batch=2,
                  pretrain_warmup=0, sft_steps=2, sft_batch=2, sft_warmup=0),
}


def build(out_dir: str | Path, seed: int = 0, recipe: Recipe = PRESETS["demo"],
          progress: bool = True) -> dict[str, Any]:
    """Run every stage into `out_dir`; return what build.json records. The model is in `out_dir/model`."""
    import torch

    from glmkit.config import ModelConfig
    from glmkit.loader import load_model, save_model
    from glmkit.tokenizer import load_tokenizer
    from glmkit.train import PackedTokens, PretrainWindows

    from . import evaluate, synth

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("data", "tokenizer", "shards", "init", "pretrain", "sft", "model")}
    data = paths["data"]
    corpus, conversations, train_file, eval_file = (data / "corpus.jsonl", data / "conversations.jsonl",
                                                    data / "train.jsonl", data / "eval.jsonl")
    symbols = data / "symbols.txt"
    log: dict[str, Any] = {"name": NAME, "seed": seed, "recipe": dataclasses.asdict(recipe), "stages": {}}
    stage = _Stages(log, out)
    quiet = [] if progress else ["--no-progress"]

    with stage("data"):
        data.mkdir(exist_ok=True)
        drawn = synth.conversations(recipe.sft_conversations + recipe.corpus_conversations, seed, "train")
        sft = drawn[:recipe.sft_conversations]
        held_out = synth.conversations(recipe.eval_conversations + recipe.sft_eval_conversations, seed, "eval")
        _write_jsonl(conversations, [c.record() for c in sft])
        _write_jsonl(eval_file, [c.record() for c in held_out[recipe.eval_conversations:]])
        documents = synth.corpus_documents(drawn, seed)
        _write_jsonl(corpus, [{"text": t} for t in documents])
        symbols.write_text("".join(f"{name}\n" for name in synth.copied_names()), encoding="utf-8")
        stage.result(sft=len(sft), corpus_documents=len(documents), held_out=len(held_out))

    stage.command("tokenizer", ["train-tokenizer", "--input", corpus, "--vocab-size", recipe.vocab_size,
                                "--symbols", symbols, "--seed", seed, "--out", paths["tokenizer"]])
    tokenizer = load_tokenizer(paths["tokenizer"])
    stage.command("shards", ["tokenize-corpus", "--input", corpus, "--tokenizer", paths["tokenizer"],
                             "--out", paths["shards"], "--overwrite"])
    sets = [arg for name, value in recipe.model_fields().items() for arg in ("--set", f"{name}={value}")]
    stage.command("init", ["init-model", "--config", "tiny", *sets, "--tokenizer", paths["tokenizer"],
                           "--seed", seed, "--out", paths["init"]])

    parameters = ModelConfig.from_json(paths["init"] / "config.json").num_parameters()
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"the recipe's model has {parameters:,} parameters, over {MAX_PARAMETERS:,}")
    stage.command("pretrain", ["pretrain", "--model", paths["init"], "--shards", paths["shards"],
                               "--window", recipe.pretrain_window, "--lr", recipe.pretrain_lr,
                               "--max-steps", recipe.pretrain_steps, "--batch-size", recipe.pretrain_batch,
                               "--warmup-steps", recipe.pretrain_warmup, "--min-lr-ratio", recipe.min_lr_ratio,
                               "--weight-decay", recipe.weight_decay, "--seed", seed, "--device", "cpu",
                               "--out", paths["pretrain"], *quiet])
    windows = PretrainWindows(PackedTokens(paths["shards"], tokenizer), recipe.pretrain_window)
    stage.result(**_log_losses(paths["pretrain"]), data=windows.summary())

    with stage("order"):  # SFT batches of similar lengths waste less on padding
        records = [json.loads(line) for line in conversations.read_text(encoding="utf-8").splitlines()]
        ordered = group_by_length(records, [rendered_length(tokenizer, r) for r in records], recipe.sft_batch, seed)
        _write_jsonl(train_file, ordered)

    stage.command("sft", ["finetune", "--model", paths["pretrain"], "--train", train_file, "--eval", eval_file,
                          "--method", "full", "--lr", recipe.sft_lr, "--max-steps", recipe.sft_steps,
                          "--batch-size", recipe.sft_batch, "--warmup-steps", recipe.sft_warmup,
                          "--min-lr-ratio", recipe.min_lr_ratio, "--weight-decay", recipe.weight_decay,
                          "--no-shuffle", "--seed", seed, "--device", "cpu", "--out", paths["sft"], *quiet])
    stage.result(**_log_losses(paths["sft"]))

    with stage("model"):
        model = load_model(paths["sft"], dtype=torch.bfloat16, device="cpu")
        folder = save_model(model, paths["model"], tokenizer_path=paths["tokenizer"])
        size = sum(f.stat().st_size for f in folder.iterdir())
        stage.result(parameters=model.config.num_parameters(), bytes=size)
        if size > MAX_BYTES:
            raise ValueError(f"the model folder holds {size:,} bytes, over {MAX_BYTES:,}")

    report_file = out / "evaluation.json"
    stage.run("evaluate", evaluate.main, ["--model", folder, "--n", recipe.eval_conversations, "--seed", seed,
                                          "--out", report_file], ok=(0, 1), program="python -m glmkit.demo.evaluate")
    evaluation = json.loads(report_file.read_text(encoding="utf-8"))
    stage.result(rates=evaluation["rates"], meets_targets=evaluation["meets_targets"],
                 showcase_ok=evaluation["showcase"]["ok"])

    card = {"name": NAME, "seed": seed, "parameters": log["stages"]["model"]["parameters"], "recipe": log["recipe"],
            "evaluation": {"rates": evaluation["rates"], "counts": evaluation["counts"],
                           "showcase": evaluation["showcase"]}}
    (folder / "demo.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log["seconds"] = round(sum(s["seconds"] for s in log["stages"].values()), 1)
    stage.save()
    return log


def rendered_length(tokenizer, record: dict[str, Any]) -> int:
    """Tokens of a conversation record as training renders it."""
    from glmkit.chat_format import render_with_loss_mask
    from glmkit.train.data import conversation_messages

    messages, _ = conversation_messages(record)
    return len(render_with_loss_mask(tokenizer, messages)[0])


def group_by_length(records: list[Any], lengths: list[int], batch_size: int, seed: int) -> list[Any]:
    """`records` reordered so that each run of `batch_size` holds examples of similar length.

    Shuffled, cut into groups of LENGTH_GROUP batches, sorted by length within a group and cut into
    batches; then the batches are shuffled. Read in order (no shuffling by the loop), the batches
    pad little and still mix the kinds of conversation. The same seed gives the same order.
    """
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    group = LENGTH_GROUP * batch_size
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start:start + group], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [records[i] for batch in batches for i in batch]


class _Stages:
    """Times each stage, prints what it runs, and records its results in DIR/build.json."""

    def __init__(self, log: dict[str, Any], out: Path):
        self.log, self.out = log, out
        self._name = ""

    def __call__(self, name: str, line: str | None = None):
        self._name, self._line = name, line
        return self

    def __enter__(self):
        print(f"== {self._name}" + (f": {self._line}" if self._line else ""), file=sys.stderr, flush=True)
        self.log["stages"][self._name] = {"command": self._line} if self._line else {}
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        seconds = round(time.perf_counter() - self._began, 1)
        self.log["stages"][self._name]["seconds"] = seconds
        print(f"   {self._name}: {seconds}s", file=sys.stderr, flush=True)
        self.save()

    def result(self, **values: Any) -> None:
        self.log["stages"][self._name].update(values)
        self.save()

    def save(self) -> None:
        (self.out / "build.json").write_text(json.dumps(self.log, indent=2, ensure_ascii=False, default=str) + "\n",
                                             encoding="utf-8")

    def command(self, name: str, argv: list[Any]) -> None:
        """Run `glmkit ARGV` in this process as stage `name`."""
        from glmkit.cli import main

        self.run(name, main, argv, program="glmkit")

    def run(self, name: str, main, argv: list[Any], program: str, ok: tuple[int, ...] = (0,)) -> None:
        argv = [str(a) for a in argv]
        with self(name, " ".join([program, *argv])):
            status = main(argv)
        if status not in ok:
            raise RuntimeError(f"stage {name} failed with status {status}: {program} {' '.join(argv)}")


def _log_losses(folder: Path) -> dict[str, Any]:
    from glmkit.train.progress import read_log

    records = read_log(folder)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    seconds = sum(r["seconds"] for r in steps)
    return {"steps": len(steps), "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "tokens_per_second": round(sum(r["tokens"] for r in steps) / seconds) if seconds else None}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def recipe_with(base: Recipe, assignments: list[str]) -> Recipe:
    """`base` with `name=value` assignments applied, each value read as its field's type."""
    fields = {f.name for f in dataclasses.fields(Recipe)}
    changes: dict[str, Any] = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {assignment!r}: expected name=value with a name among {', '.join(sorted(fields))}")
        kind = type(getattr(base, name))
        try:
            changes[name] = kind(value)
        except ValueError:
            raise ValueError(f"--set {assignment!r}: {value!r} is not a {kind.__name__}") from None
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmkit.demo.build", description=__doc__.splitlines()[0],
                                     epilog="The model lands in OUT/model; OUT/build.json records the run. The exit "
                                            "status is 1 when the model misses the tool-use targets.")
    parser.add_argument("--out", required=True, help="the build folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change one recipe field, e.g. --set sft_steps=100 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        recipe = recipe_with(PRESETS[args.preset], args.set)
    except ValueError as e:
        parser.error(str(e))
    log = build(args.out, args.seed, recipe, progress=not args.no_progress)
    evaluation = log["stages"]["evaluate"]
    print(f"built {Path(args.out) / 'model'} in {log['seconds']:.0f}s; the model "
          f"{'meets' if evaluation['meets_targets'] else 'MISSES'} the tool-use targets", file=sys.stderr)
    return 0 if evaluation["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
