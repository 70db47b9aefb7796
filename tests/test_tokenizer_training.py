"""glmkit train-tokenizer: a SentencePiece model in the ChatGLM3 scheme, and the tokenizer's special
ids after any model's pieces."""

import json

import pytest
import sentencepiece as spm

from glmkit.chat_format import render_messages
from glmkit.cli import main as cli
from glmkit.tokenizer import SPECIAL_TOKEN_NAMES, ChatGLMTokenizer, load_tokenizer
from glmkit.train.tokenizer_training import MAX_LINE_BYTES, train_tokenizer

DOCUMENTS = [
    "Hello, I am glmkit-demo. The weather in Beijing is 23°C and sunny.",
    "你好！我是 glmkit-demo。北京现在天气晴，气温23°C。",
    '{\n    "name": "get_weather",\n    "description": "查询一个城市当前的天气"\n}',
    "```python\ntool_call(city='Shanghai')\n```\nIt is 7°C in Shanghai.",
    "上海今天多云，温度7°C，湿度40%。The answer is 1776.",
] * 20
VOCAB = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCUMENTS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    report = train_tokenizer([corpus], out, VOCAB)
    return report, load_tokenizer(out)


def test_pieces_then_the_nine_specials(trained):
    report, tok = trained
    assert report.num_pieces == tok.num_pieces == VOCAB
    assert report.documents == len(DOCUMENTS)
    assert tok.special_tokens == {name: VOCAB + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
    assert tok.vocab_size == VOCAB + 9
    assert set(tok.stop_ids) == {2, VOCAB + 6, VOCAB + 8}
    assert (tok.eos_id, tok.pad_id) == (2, 0)


def test_piece_layout_follows_chatglm3(trained):
    _, tok = trained
    sp = spm.SentencePieceProcessor(model_file=str(tok.path))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert all(sp.is_byte(i) for i in range(3, 259)) and sp.id_to_piece(3) == "<0x00>"
    assert sp.encode("2024", out_type=str) == ["▁", "2", "0", "2", "4"]  # digits one by one
    assert sp.decode(sp.encode("two  spaces\tand a tab")) == "two  spaces\tand a tab"  # text kept as written


def test_text_never_becomes_a_special_token(trained):
    _, tok = trained
    text = "".join(SPECIAL_TOKEN_NAMES) + " <|user|>\n<|assistant|> sop eop [gMASK]"
    ids = tok.encode(text)
    assert ids and max(ids) < tok.num_pieces
    assert tok.decode(ids) == text


def test_unseen_characters_fall_back_to_bytes(trained):
    _, tok = trained
    text = "🦾 𠮷 ünïcødé"
    ids = tok.encode(text)
    assert 0 not in ids  # never <unk>
    assert tok.decode(ids) == text


def test_streaming_decode_works_with_a_trained_model(trained):
    _, tok = trained
    text = "北京 weather 23°C 🦾 and more"
    ids = tok.encode(text)
    detok = tok.detokenizer()
    assert "".join([detok.push(i) for i in ids] + [detok.flush()]) == tok.decode(ids) == text


def test_chat_format_uses_the_trained_specials(trained):
    _, tok = trained
    ids = render_messages(tok, [{"role": "user", "content": "你好"}])
    assert ids[:3] == [tok.token_id("[gMASK]"), tok.token_id("sop"), tok.token_id("<|user|>")]
    assert ids[-1] == tok.token_id("<|assistant|>") == VOCAB + 7
    assert tok.decode(ids) == "[gMASK]sop<|user|>\n 你好<|assistant|>"  # as the official tokenizer decodes it


def test_training_is_deterministic(corpus, trained, tmp_path):
    report, _ = trained
    again = train_tokenizer([corpus], tmp_path, VOCAB)
    assert again.path.read_bytes() == report.path.read_bytes()


def test_unigram_works_too(corpus, tmp_path):
    report = train_tokenizer([corpus], tmp_path, 350, model_type="unigram")
    tok = load_tokenizer(report.path)
    assert tok.token_id("<|observation|>") == 358
    assert tok.decode(tok.encode("北京 23°C")) == "北京 23°C"


def test_long_lines_are_cut_and_counted(tmp_path):
    line = ("北京天气 sunny 23°C. " * 2000)[:MAX_LINE_BYTES]  # over the byte limit in UTF-8
    corpus = tmp_path / "long.txt"
    corpus.write_text(line + "\nshort line\n", encoding="utf-8")
    report = train_tokenizer([corpus], tmp_path / "tok", 280)
    assert report.cut_lines == 1 and report.lines == 2 and report.documents == 1


def test_bad_settings_are_named(corpus, tmp_path):
    with pytest.raises(ValueError, match="too high"):
        train_tokenizer([corpus], tmp_path, 5000)
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer([corpus], tmp_path, 100)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer([corpus], tmp_path, 300, model_type="wordpiece")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([empty], tmp_path, 300)


def test_tokenizer_names_what_a_foreign_model_lacks(tmp_path):
    # A SentencePiece model without the piece "a" (streaming needs it) or without </s>.
    def raw_model(name, lines, **options):
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / name),
                                       vocab_size=40, hard_vocab_limit=False, minloglevel=2, **options)
        return tmp_path / f"{name}.model"

    chinese = ["你好世界，今天天气很好。北京上海广州深圳。"] * 50
    with pytest.raises(ValueError, match="no piece 'a'"):
        ChatGLMTokenizer(raw_model("no_a", chinese))
    with pytest.raises(ValueError, match="</s>"):
        ChatGLMTokenizer(raw_model("no_eos", ["a b c d e f g hello world"] * 50, eos_id=-1))


def test_command_writes_the_tokenizer(corpus, tmp_path, capsys):
    assert cli(["train-tokenizer", "--input", str(corpus), "--vocab-size", "360", "--out", str(tmp_path)]) == 0
    assert "360 pieces + 9 special tokens (ids 360..368)" in capsys.readouterr().err
    assert load_tokenizer(tmp_path).vocab_size == 369


def test_command_reports_errors_in_one_line(tmp_path, capsys):
    assert cli(["train-tokenizer", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300",
                "--out", str(tmp_path)]) == 2
    assert "nope.txt: no such corpus file" in capsys.readouterr().err


def test_symbols_stay_one_piece_wherever_they_appear(corpus, tmp_path):
    # A name in a sentence ("▁Shanghai") and after a quote ("Shanghai") is the same token, so a
    # model copies it into a tool call with one lookup; a space inside a symbol is kept.
    symbols = ["Shanghai", "上海", "New York"]
    train_tokenizer([corpus], tmp_path, VOCAB, symbols=symbols)
    tok = load_tokenizer(tmp_path)
    ids = {name: tok._sp.piece_to_id(name.replace(" ", "\u2581")) for name in symbols}
    assert all(i != tok._sp.unk_id() for i in ids.values())
    for text, name in [("It is 7°C in Shanghai.", "Shanghai"), ("tool_call(city='Shanghai')", "Shanghai"),
                       ("去上海看看", "上海"), ("weather in New York?", "New York"),
                       ('{"city": "New York"}', "New York")]:
        encoded = tok.encode(text)
        assert ids[name] in encoded, text
        assert tok.decode(encoded) == text


def test_bad_symbols_are_named(corpus, tmp_path):
    with pytest.raises(ValueError, match="list of words"):
        train_tokenizer([corpus], tmp_path, VOCAB, symbols="Shanghai")
    with pytest.raises(ValueError, match="' Shanghai'"):
        train_tokenizer([corpus], tmp_path, VOCAB, symbols=[" Shanghai"])
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer([corpus], tmp_path, VOCAB, symbols=[""])


def test_command_reads_symbols_from_a_file(corpus, tmp_path):
    symbols = tmp_path / "symbols.txt"
    symbols.write_text("Shanghai\n\n上海\n", encoding="utf-8")
    out = tmp_path / "tok"
    assert cli(["train-tokenizer", "--input", str(corpus), "--vocab-size", "360", "--symbols", str(symbols),
                "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    assert tok._sp.piece_to_id("上海") in tok.encode("去上海")
