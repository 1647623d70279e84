"""Turn a GGUF header's tokenizer into a Hugging Face `tokenizer.json`, so the runtime needs only `tokenizers`.

GGUF keeps a byte-level BPE as token strings, merges and token types. Control (3) and user-defined (4) tokens must
become added tokens, or `<think>` and `<｜User｜>` are split into pieces by the BPE.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from appliance.errors import UnsupportedModelError

# The split that Qwen2 and the DeepSeek-R1 distills use before byte-level BPE (llama.cpp's "qwen2" and
# "deepseek-r1-qwen" pre-tokenizers are the same expression).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
SUPPORTED_PRE = {"qwen2", "deepseek-r1-qwen"}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def tokenizer_from_gguf(header: dict) -> Tokenizer:
    kind, pre = header.get("tokenizer.ggml.model"), header.get("tokenizer.ggml.pre", "qwen2")
    if kind != "gpt2" or pre not in SUPPORTED_PRE:
        raise UnsupportedModelError(
            f"GGUF tokenizer {kind}/{pre} is not supported; r1box exports byte-level BPE tokenizers of the "
            f"Qwen2 family ({', '.join(sorted(SUPPORTED_PRE))}).")
    tokens = header["tokenizer.ggml.tokens"]
    types = header["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in header["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=int(types[i]) == TOKEN_CONTROL, normalized=False)
             for i in range(len(tokens)) if int(types[i]) in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    tok.add_tokens(added)
    for i in range(len(tokens)):  # add_tokens keeps an existing vocabulary id; check that it did
        if int(types[i]) in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            assert tok.token_to_id(tokens[i]) == i, tokens[i]
    return tok


def write_tokenizer_from_gguf(header: dict, out_dir: Path) -> dict:
    """Write tokenizer.json and tokenizer_config.json; return the config (special tokens, chat template)."""
    tok = tokenizer_from_gguf(header)
    tokens = header["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = header.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "add_bos_token": bool(header.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": header.get("tokenizer.chat_template"),
    }
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return config
