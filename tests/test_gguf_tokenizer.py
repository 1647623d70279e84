"""Reading GGUF headers and turning the real DeepSeek-R1 tokenizer into a `tokenizers` tokenizer."""

import struct

import pytest

from appliance.errors import UnsupportedModelError
from export.gguf_header import read_gguf_header
from export.tokenizer_convert import tokenizer_from_gguf

R1_IDS = {"<｜begin▁of▁sentence｜>": 151646, "<｜end▁of▁sentence｜>": 151643, "<｜User｜>": 151644,
          "<｜Assistant｜>": 151645, "<think>": 151648, "</think>": 151649}


def test_header_of_truncated_r1_gguf(r1_header):
    assert r1_header["general.architecture"] == "qwen2"
    assert r1_header["tokenizer.ggml.pre"] == "deepseek-r1-qwen"
    assert len(r1_header["tokenizer.ggml.tokens"]) == 152064
    assert len(r1_header["tokenizer.ggml.merges"]) == 151387
    assert r1_header["tokenizer.ggml.bos_token_id"] == 151646
    assert "<｜Assistant｜>" in r1_header["tokenizer.chat_template"]


def test_special_tokens_are_single_ids(r1_header):
    tok = tokenizer_from_gguf(r1_header)
    for text, expected in R1_IDS.items():
        assert tok.encode(text, add_special_tokens=False).ids == [expected]
    ids = tok.encode("<｜begin▁of▁sentence｜><｜User｜>你好<｜Assistant｜>", add_special_tokens=False).ids
    assert ids == [151646, 151644, 108386, 151645]


def test_round_trip_of_mixed_text(r1_header):
    tok = tokenizer_from_gguf(r1_header)
    text = "def add(a, b):\n    return a + b  # 加法 ✓\n\n<think>\n1234</think>"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(UnsupportedModelError, match="not a GGUF file"):
        read_gguf_header(bogus)


def test_truncated_header(tmp_path, r1_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(r1_gguf.read_bytes()[:5000])
    with pytest.raises(UnsupportedModelError, match="truncated"):
        read_gguf_header(cut)


def test_unsupported_version(tmp_path):
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(UnsupportedModelError, match="version 1"):
        read_gguf_header(old)


def test_unsupported_tokenizer_kind(r1_header):
    llama_like = dict(r1_header, **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(UnsupportedModelError, match="not supported"):
        tokenizer_from_gguf(llama_like)
