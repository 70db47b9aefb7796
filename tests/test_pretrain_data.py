"""Raw-text corpora, packed token shards, pretraining windows, and new models trained from scratch."""

import json
import pickle
from array import array

import pytest
import torch

from glmkit.cli import main as cli
from glmkit.loader import load_model
from glmkit.train import TrainConfig, train
from glmkit.train.corpus import CorpusError, iter_documents
from glmkit.train.pretrain_data import (
    INDEX,
    PackedDataError,
    PackedTokens,
    PretrainWindows,
    _ShardWriter,
    is_packed_folder,
    pack_corpus,
)
from glmkit.train.scratch import INIT_STD, new_model, padded_vocab_size, scratch_config
from glmkit.train.tokenizer_training import train_tokenizer

DOCUMENTS = ["Hello world.", "", "北京天气晴，23°C。\nA second line.", "  ", "🦾 byte fallback 𠮷", "x" * 300]


def expected_stream(tok, documents):
    out = []
    for doc in documents:
        if doc.strip():
            out += [tok.token_id("[gMASK]"), tok.token_id("sop")] + tok.encode(doc) + [tok.eos_id]
    return out


def synthetic_corpus(path):
    """A corpus of demo conversations: rich enough for a tokenizer of 700 pieces."""
    from glmkit.demo.synth import conversations, corpus_documents

    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                            for d in corpus_documents(conversations(60, 0), 0)), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCUMENTS), encoding="utf-8")
    return path


# -- corpora -----------------------------------------------------------------------------------------


def test_documents_from_jsonl_and_text(tmp_path, corpus):
    assert [d for _, d in iter_documents([corpus])] == DOCUMENTS
    text = tmp_path / "book.txt"
    text.write_text("one\n\ntwo<|endoftext|>three", encoding="utf-8")
    assert [d for _, d in iter_documents([text])] == ["one\n\ntwo<|endoftext|>three"]
    assert [d for _, d in iter_documents([text], separator="<|endoftext|>")] == ["one\n\ntwo", "three"]


def test_bad_corpus_lines_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.jsonl:3: expected an object"):
        list(iter_documents([bad]))
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_documents([bad]))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok \xff\xfe")
    with pytest.raises(CorpusError, match="binary.txt: not UTF-8"):
        list(iter_documents([binary]))
    with pytest.raises(CorpusError, match="no such corpus file"):
        list(iter_documents([tmp_path / "missing.txt"]))


# -- shards ------------------------------------------------------------------------------------------


def test_shards_round_trip_exactly(tok, corpus, tmp_path):
    index = pack_corpus([corpus], tok, tmp_path / "shards", shard_tokens=7)  # many shards, documents straddle them
    stream = expected_stream(tok, DOCUMENTS)
    assert index["tokens"] == len(stream) and index["documents"] == 4 and index["empty_documents"] == 2
    assert index["dtype"] == "uint16" and len(index["shards"]) == -(-len(stream) // 7)
    packed = PackedTokens(tmp_path / "shards", tok)
    assert len(packed) == len(stream)
    assert packed.tokens(0, len(stream)) == stream
    for start, stop in [(0, 1), (5, 9), (6, 7), (7, 21), (len(stream) - 3, len(stream))]:
        assert packed.tokens(start, stop) == stream[start:stop]
    assert pickle.loads(pickle.dumps(packed)).tokens(3, 30) == stream[3:30]  # data loader workers reopen it


def test_uint32_shards_round_trip(tmp_path):
    ids = [0, 1, 65535, 65536, 2**31 + 5, 7]
    writer = _ShardWriter(tmp_path, "uint32", shard_tokens=4)
    writer.write(ids[:3])
    writer.write(ids[3:])
    shards = writer.close()
    index = {"format": "glmkit-packed-tokens", "version": 1, "dtype": "uint32", "vocab_size": 2**32,
             "tokenizer_sha256": "", "tokens": len(ids), "documents": 1, "empty_documents": 0, "shards": shards}
    (tmp_path / INDEX).write_text(json.dumps(index))
    assert (tmp_path / "tokens-00000.bin").stat().st_size == 16
    assert PackedTokens(tmp_path).tokens(0, len(ids)) == ids


def test_damaged_or_foreign_shards_are_refused(tok, corpus, tmp_path):
    folder = tmp_path / "shards"
    pack_corpus([corpus], tok, folder)
    with pytest.raises(FileExistsError, match="already holds token shards"):
        pack_corpus([corpus], tok, folder)
    pack_corpus([corpus], tok, folder, overwrite=True)
    other = train_tokenizer([synthetic_corpus(tmp_path / "other.jsonl")], tmp_path / "other", 700)
    from glmkit.tokenizer import load_tokenizer

    with pytest.raises(PackedDataError, match="another tokenizer"):
        PackedTokens(folder, load_tokenizer(other.path))
    shard = folder / "tokens-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(PackedDataError, match="tokens-00000.bin: .* bytes, expected"):
        PackedTokens(folder)
    (folder / INDEX).unlink()
    assert not is_packed_folder(folder)
    with pytest.raises(PackedDataError, match="no index.json"):
        PackedTokens(folder)


def test_a_bad_corpus_leaves_no_shards(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 50 + "oops\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="bad.jsonl:51"):
        pack_corpus([bad], tok, tmp_path / "shards", shard_tokens=16)
    assert not list((tmp_path / "shards").iterdir())


def test_an_empty_corpus_is_an_error(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "  "}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="no text to tokenize.*2 empty"):
        pack_corpus([empty], tok, tmp_path / "shards")
    assert not is_packed_folder(tmp_path / "shards")


# -- windows -----------------------------------------------------------------------------------------


def test_windows_are_contiguous_and_report_the_rest(tok, corpus, tmp_path):
    pack_corpus([corpus], tok, tmp_path, shard_tokens=5)
    stream = expected_stream(tok, DOCUMENTS)
    windows = PretrainWindows(PackedTokens(tmp_path, tok), 8)
    assert len(windows) == len(stream) // 8 and windows.unused_tokens == len(stream) % 8
    joined = [t for i in range(len(windows)) for t in windows[i]["input_ids"]]
    assert joined == stream[:len(windows) * 8]
    assert all(w["labels"] == w["input_ids"] for w in (windows[0], windows[-1]))
    assert windows[-1] == windows[len(windows) - 1]
    with pytest.raises(IndexError):
        windows[len(windows)]
    assert f"the last {windows.unused_tokens} tokens fill no window" in windows.summary()
    with pytest.raises(PackedDataError, match="fewer than one window"):
        PretrainWindows(PackedTokens(tmp_path, tok), len(stream) + 1)


# -- new models and pretraining -----------------------------------------------------------------------


def test_new_model_is_seeded_and_scaled():
    config = scratch_config(709, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                            kv_channels=16, multi_query_group_num=2, seq_length=256)
    assert config.padded_vocab_size == padded_vocab_size(709) == 768
    a, b, c = new_model(config, 0), new_model(config, 0), new_model(config, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.transformer.output_layer.weight, c.transformer.output_layer.weight)
    embedding = a.transformer.embedding.word_embeddings.weight
    assert abs(embedding.std().item() - INIT_STD) < 0.002
    dense = a.transformer.encoder.layers[0].self_attention.dense.weight
    assert dense.std().item() < INIT_STD * 0.6  # residual outputs scaled by 1/sqrt(2 * layers)
    assert not a.transformer.encoder.layers[0].self_attention.query_key_value.bias.any()
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        scratch_config(709, padded_vocab_size=512)


@pytest.mark.slow
def test_pretraining_a_new_model_on_windows_lowers_the_loss(tmp_path):
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl")
    report = train_tokenizer([corpus], tmp_path / "tok", 700)
    assert cli(["tokenize-corpus", "-i", str(corpus), "--tokenizer", str(report.path), "--out",
                str(tmp_path / "shards")]) == 0
    assert cli(["init-model", "--config", "tiny", "--set", "num_layers=1", "--set", "seq_length=64",
                "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "init")]) == 0
    from glmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "init")
    model = load_model(tmp_path / "init", dtype=torch.float32)
    assert model.config.padded_vocab_size == 768 and model.config.num_layers == 1
    windows = PretrainWindows(PackedTokens(tmp_path / "shards", tok), 32)
    result = train(model, windows, None, TrainConfig(lr=1e-2, max_steps=16, batch_size=4, shuffle=False,
                                                    progress=False, out_dir=tmp_path / "out", device="cpu"), tok)
    losses = list(result.train_loss.values())
    assert losses[-1] < losses[0] - 1.0, losses
    reloaded = load_model(tmp_path / "out", dtype=torch.float32)
    ids = torch.tensor([windows[0]["input_ids"]])
    assert torch.equal(model(ids), reloaded(ids))


def test_tokenize_corpus_command(tok, tokenizer_path, corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    argv = ["tokenize-corpus", "-i", str(corpus), "--tokenizer", str(tokenizer_path), "--out", str(out)]
    assert cli(argv) == 0
    assert "2 empty documents left out" in capsys.readouterr().err
    assert PackedTokens(out, tok).tokens(0, len(expected_stream(tok, DOCUMENTS))) == expected_stream(tok, DOCUMENTS)
    assert cli(argv) == 2
    assert "already holds token shards" in capsys.readouterr().err


def test_init_model_command_sizes_the_embedding(tokenizer_path, tmp_path, capsys):
    assert cli(["init-model", "--config", "tiny", "--tokenizer", str(tokenizer_path), "--out", str(tmp_path),
                "--set", "num_layers=1"]) == 0
    assert "vocabulary 64798 padded to 64832" in capsys.readouterr().err
    assert cli(["init-model", "--config", "tiny", "--tokenizer", str(tokenizer_path), "--out", str(tmp_path),
                "--set", "layers=1"]) == 2
    assert "--set 'layers=1'" in capsys.readouterr().err
    assert cli(["init-model", "--config", "tiny", "--tokenizer", str(tokenizer_path), "--out", str(tmp_path),
                "--set", "padded_vocab_size=1024"]) == 2
    assert "smaller than the tokenizer's 64798 ids" in capsys.readouterr().err


def test_array_typecodes_have_the_shard_widths():
    assert array("H").itemsize == 2 and array("I").itemsize == 4
