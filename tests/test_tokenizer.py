"""ChatGLMTokenizer and IncrementalDetokenizer against the real ChatGLM3 tokenizer.model.

Expected ids come from sentencepiece directly, so the tests check glmkit against the official
scheme rather than against itself.
"""

import random

import pytest
from sentencepiece import SentencePieceProcessor

from glmkit.tokenizer import ChatGLMTokenizer, IncrementalDetokenizer, load_tokenizer

SPECIALS = {
    "[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793,
    "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796, "<|observation|>": 64797,
}
# Chinese, English, emoji (some as one piece, some by byte fallback), rare CJK by byte fallback
# (𠮷 U+20BB7, 𪚥 U+2A6A5), odd spacing and newlines.
MIXED_TEXTS = [
    "你好",
    "Hello, 世界! How are you today?",
    "😀👍🏽🤖🦾 emoji 🧠 and 🫠",
    "𠮷野家 and 𪚥 are rare; 鱻 is not",
    "  two leading spaces,\ttab,\n\nblank line, trailing space ",
    "代码:\n```python\nprint('你好 🌍')\n```\n",
    "ﾟ･✿ヾ╲(｡◕‿◕｡)╱✿･ﾟ ∑∫∂ √2 ≈ 1.414",
]


@pytest.fixture(scope="module")
def sp(tokenizer_path) -> SentencePieceProcessor:
    return SentencePieceProcessor(model_file=str(tokenizer_path))


def official_decode(sp: SentencePieceProcessor, ids: list[int]) -> str:
    """The official SPTokenizer.decode, written out independently."""
    names = {i: name for name, i in SPECIALS.items()}
    text, run = "", []
    for i in ids:
        if i in names:
            text += sp.decode(run) + names[i] if run else names[i]
            run = []
        else:
            run.append(i)
    return text + (sp.decode(run) if run else "")


def stream(tok: ChatGLMTokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens)
    return [detok.push(i) for i in ids] + [detok.flush()]


# -- vocabulary ----------------------------------------------------------------------------------


def test_special_tokens_and_ids(tok):
    assert tok.special_tokens == SPECIALS
    assert (tok.eos_id, tok.pad_id) == (2, 0)
    assert tok.vocab_size == 64798
    assert set(tok.stop_ids) == {2, 64795, 64797}
    for name, i in SPECIALS.items():
        assert tok.token_id(name) == i


def test_unknown_special_token_is_named(tok):
    with pytest.raises(ValueError, match=r"<\|tool\|>"):
        tok.token_id("<|tool|>")


# -- encode / decode -----------------------------------------------------------------------------


def test_encode_is_plain_sentencepiece(tok, sp):
    assert tok.encode("你好") == [36474, 54591]
    assert tok.encode("") == []
    for text in MIXED_TEXTS:
        assert tok.encode(text) == sp.encode(text)


def test_rare_characters_use_byte_fallback(tok, sp):
    ids = tok.encode("𠮷")
    assert [sp.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0xA0>", "<0xAE>", "<0xB7>"]
    assert tok.decode(ids) == "𠮷"


@pytest.mark.parametrize("text", [*SPECIALS, "</s>", "<s>", "<unk>", "<|user|>\n<|assistant|>hi"])
def test_text_never_becomes_a_special_or_control_id(tok, text):
    ids = tok.encode(text)
    assert ids and all(2 < i < 64789 for i in ids)
    assert tok.decode(ids) == text


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"hi")


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_writes_special_names_between_runs(tok, sp):
    ids = [64790, 64792, 64795, *sp.encode("\n"), *sp.encode("Hi 😀"), 64796, *sp.encode("a\n"), 2]
    assert tok.decode(ids) == official_decode(sp, ids) == "[gMASK]sop<|user|>\n Hi 😀<|assistant|>a\n"
    assert tok.decode(ids, skip_special_tokens=True) == "\n Hi 😀a\n"


def test_decode_matches_official_on_random_ids(tok, sp):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(64798) for _ in range(rng.randrange(30))]
        assert tok.decode(ids) == official_decode(sp, ids)


@pytest.mark.parametrize("bad", [-1, 64798, 65023, 10**9])
def test_decode_rejects_ids_out_of_range(tok, bad):
    with pytest.raises(ValueError, match=str(bad)):
        tok.decode([5, bad])


def test_decode_rejects_non_integer_ids(tok):
    with pytest.raises(ValueError, match="integer"):
        tok.decode([1.5])


# -- loading -------------------------------------------------------------------------------------


def test_load_from_file_or_folder(tokenizer_path):
    assert load_tokenizer(tokenizer_path).encode("你好") == [36474, 54591]
    assert load_tokenizer(tokenizer_path.parent).encode("你好") == [36474, 54591]
    assert load_tokenizer(str(tokenizer_path.parent)).vocab_size == 64798


def test_load_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)  # a folder without tokenizer.model


def test_load_rejects_a_file_that_is_not_a_tokenizer(tmp_path):
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


# -- streaming -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_stream_equals_full_decode_without_broken_characters(tok, text):
    ids = tok.encode(text)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_stream_holds_byte_fallback_until_the_character_is_complete(tok, sp):
    ids = sp.encode("a 𠮷")  # ▁a ▁ <0xF0> <0xA0> <0xAE> <0xB7>
    detok = tok.detokenizer()
    assert [detok.push(i) for i in ids] == ["a", " ", "", "", "", "𠮷"]
    assert detok.flush() == ""


def test_stream_keeps_mid_text_spaces_that_a_fresh_decode_drops(tok, sp):
    ids = sp.encode("one two  three\n four")
    assert sp.decode(ids[1:]) != sp.decode(ids)[len(sp.decode(ids[:1])):]  # the trap
    assert "".join(stream(tok, ids)) == "one two  three\n four"


def test_stream_of_a_conversation_with_special_tokens(tok, sp):
    ids = [64790, 64792, 64795, *sp.encode("\n"), *sp.encode("天气 ☀️?"), 64796,
           *sp.encode("get_weather\n"), *sp.encode("```python\ntool_call(city='𠮷')\n```"), 64797]
    for skip in (False, True):
        chunks = stream(tok, ids, skip)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in chunk for chunk in chunks)


def test_stream_equals_full_decode_on_random_ids(tok):
    # Random ids stress every SentencePiece corner: byte pieces that never complete, `<s>`/`</s>`
    # between bytes, lone "▁" pieces at run starts, special ids splitting runs.
    rng = random.Random(1234)
    pools = [range(259, 64789), [30910, 265], range(3, 259), range(131, 195), range(227, 243),
             [0, 1, 2], range(64789, 64798)]
    for _ in range(1500):
        weights = [rng.random() for _ in pools]
        ids = [rng.choice(rng.choices(pools, weights)[0]) for _ in range(rng.randrange(40))]
        for skip in (False, True):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("garbage", [
    [0x80],  # stray continuation bytes
    [0xF0, 0xA0, 0xAE],  # 4-byte sequences that never get their last byte
    [0xE6, 0x88, 0xC3],  # truncated 3-byte sequence, then a lone lead byte
])
def test_stream_holds_a_bounded_window(tok, sp, garbage):
    # Bytes that never form a character: the full decode shows them as U+FFFD, and the
    # detokenizer must emit them too instead of decoding an ever-growing window.
    ids = sp.encode("start") + [3 + b for b in garbage] * 200 + sp.encode(" end 𠮷")
    detok = tok.detokenizer()
    chunks, held = [], []
    for i in ids:
        chunks.append(detok.push(i))
        held.append(len(detok._held))
    chunks.append(detok.flush())
    assert "".join(chunks) == tok.decode(ids)
    assert max(held) <= IncrementalDetokenizer.MAX_HELD


def test_stream_rejects_bad_ids_and_push_after_flush(tok):
    detok = tok.detokenizer()
    with pytest.raises(ValueError, match="64798"):
        detok.push(64798)
    detok.flush()
    with pytest.raises(RuntimeError, match="flush"):
        detok.push(5)
