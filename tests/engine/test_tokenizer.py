"""GPT-2 BPE built offline, round trips, special tokens and streaming detokenisation."""

import random

import pytest

from engine import tokenizer
from engine.tokenizer import EOT_ID, StreamDecoder, decode, encode

# Known GPT-2 ids (from the released encoder.json) pin the encoding, not just its self-consistency.
KNOWN = {"Hello world": [15496, 995], " the": [262], "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29]}
ALPHABET = "abcXYZ 019 .,!?'\n\t-—éüß日本語中文한국어😀🎉👍🏽🇫🇷\u200d❤️ \u00a0"


def _random_strings(n, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_builds_without_network_or_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    tokenizer.get_encoding.cache_clear()
    enc = tokenizer.get_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_ID


@pytest.mark.parametrize("text,ids", KNOWN.items())
def test_known_ids(text, ids):
    assert encode(text) == ids


def test_endoftext_is_text_unless_allowed():
    assert encode("a<|endoftext|>b", allow_special=True) == [64, EOT_ID, 65]
    assert EOT_ID not in encode("a<|endoftext|>b")
    assert decode([EOT_ID]) == "<|endoftext|>"


def test_hash_mismatch_is_refused(monkeypatch):
    monkeypatch.setitem(tokenizer.SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(RuntimeError, match="vocab.bpe has sha256"):
        tokenizer._read_verified("vocab.bpe")


def test_round_trip_1000_random_strings():
    for s in _random_strings(1000):
        assert decode(encode(s)) == s


def test_streamed_pieces_concatenate_to_decode():
    for s in _random_strings(200, seed=1) + ["😀🎉 日本語 한국어 👍🏽🇫🇷"]:
        ids = encode(s)
        d = StreamDecoder()
        pieces = [d.push(t) for t in ids] + [d.flush()]
        assert "".join(pieces) == decode(ids) == s


def test_stream_holds_back_split_emoji():
    ids = encode("😀")
    assert len(ids) > 1  # the emoji is split across byte-level tokens
    d = StreamDecoder()
    assert [d.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.push(ids[-1]) == "😀"


def test_invalid_utf8_streams_like_decode():
    # Token 447 is the bytes e2 80: the start of a 3-byte character that never completes.
    ids = [447, 995, 447]
    d = StreamDecoder()
    assert "".join([d.push(t) for t in ids] + [d.flush()]) == decode(ids)
