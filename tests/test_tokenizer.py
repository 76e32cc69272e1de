import pytest

from accel_gpt.errors import UserError
from accel_gpt.tokenizer import get_tokenizer


def test_gpt2_ids_match_tiktoken_reference():
    enc = get_tokenizer("gpt2")
    assert enc.n_vocab == 50257
    assert enc.encode("Hello, world!") == [15496, 11, 995, 0]
    assert enc.encode(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")  # special tokens only when asked for


def test_chinese_and_raw_bytes_round_trip():
    enc = get_tokenizer("gpt2")
    text = "萧炎，斗之力，三段"
    assert len(enc.encode(text)) == 20
    assert enc.decode(enc.encode(text)) == text
    assert all(isinstance(enc.encode_single_token(bytes([b])), int) for b in range(256))  # every byte is a token


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(UserError, match="unknown tokenizer"):
        get_tokenizer("no-such-encoding")
