"""The greedy generate loop over the ONNX artifact: the same tokens as the source model in torch."""

import numpy as np
import pytest

from appliance.generate import generate
from appliance.manifest import load_manifest
from appliance.model import OnnxDecoder
from appliance.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def fp32(tiny_fp32):
    manifest = load_manifest(tiny_fp32)
    return manifest, OnnxDecoder(manifest, threads=1), ChatTokenizer(manifest)


def test_greedy_tokens_equal_torch(fp32, tiny_hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    manifest, decoder, tok = fp32
    ids = tok.encode(tok.render([{"role": "user", "content": "Write a haiku about rivers."}]))
    ours = list(generate(decoder, ids, 24, frozenset()))
    reference = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                    pad_token_id=0)[0, len(ids):].tolist()
    assert ours == theirs


def test_stop_token_ends_generation(fp32):
    manifest, decoder, tok = fp32
    ids = tok.encode("hello")
    first = next(generate(decoder, ids, 5, frozenset()))
    assert list(generate(decoder, ids, 5, frozenset({first}))) == [first]


def test_max_tokens_and_context_are_respected(fp32):
    manifest, decoder, tok = fp32
    ids = tok.encode("hello there")
    assert len(list(generate(decoder, ids, 7, frozenset()))) == 7
    assert len(list(generate(decoder, ids, 100, frozenset(), context=len(ids) + 3))) == 3


def test_decode_with_cache_equals_full_recompute(fp32):
    manifest, decoder, tok = fp32
    ids = np.array([tok.encode("a b c d e f")], np.int64)
    full, _ = decoder.forward(ids, decoder.empty_past())
    head, past = decoder.forward(ids[:, :4], decoder.empty_past())
    tail, present = decoder.forward(ids[:, 4:], past)
    np.testing.assert_allclose(tail[0], full[0, 4:], atol=1e-4)
    assert present[0].shape == (1, 2, ids.shape[1], 16)
