"""The decoder over the shared-buffer KV cache: the same tokens as the source model in torch, whether a prompt is
prefilled at once or in chunks, alone or decoded in a batch beside sequences of other lengths."""

import numpy as np
import pytest

from appliance.model.decoder import Decoder
from appliance.model.generate import generate
from appliance.model.manifest import load_manifest
from appliance.model.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def fp32(tiny_fp32):
    manifest = load_manifest(tiny_fp32)
    return Decoder(manifest, threads=1), ChatTokenizer(manifest)


@pytest.fixture(scope="module")
def torch_model(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()


def _torch_last_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def test_greedy_tokens_equal_torch(fp32, torch_model):
    import torch

    decoder, tok = fp32
    ids = tok.encode(tok.render([{"role": "user", "content": "Write a haiku about rivers."}]))
    ours = list(generate(decoder, ids, 24, frozenset()))
    with torch.no_grad():
        theirs = torch_model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                      pad_token_id=0)[0, len(ids):].tolist()
    assert ours == theirs


def test_stop_token_and_max_tokens_end_generation(fp32):
    decoder, tok = fp32
    ids = tok.encode("hello")
    first = next(generate(decoder, ids, 5, frozenset()))
    assert list(generate(decoder, ids, 5, frozenset({first}))) == [first]
    assert len(list(generate(decoder, ids, 7, frozenset()))) == 7


def test_chunked_prefill_equals_one_shot(fp32, torch_model):
    decoder, tok = fp32
    ids = tok.encode("The quick brown fox jumps over the lazy dog, again and again.")
    cache = decoder.new_cache(slots=2, max_length=64)
    whole = decoder.prefill(cache, 0, ids)
    chunked = decoder.prefill(cache, 1, ids, chunk=4)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
    np.testing.assert_allclose(whole, _torch_last_logits(torch_model, ids), atol=1e-3)
    assert list(cache.lengths) == [len(ids), len(ids)]


def test_batched_decode_of_different_lengths_equals_each_alone(fp32, torch_model):
    decoder, tok = fp32
    prompts = [tok.encode("one"), tok.encode("a somewhat longer prompt than the first"), tok.encode("mid size")]
    cache = decoder.new_cache(slots=4, max_length=64)
    for slot, ids in enumerate(prompts):
        decoder.prefill(cache, slot, ids)
    nxt = np.array([[11], [22], [33]])
    logits = decoder.step(cache, 0, nxt, cache.lengths[:3] + 1)
    cache.lengths[:3] += 1
    for row, ids in enumerate(prompts):
        np.testing.assert_allclose(logits[row], _torch_last_logits(torch_model, ids + [int(nxt[row, 0])]),
                                   atol=1e-3)
    assert list(cache.lengths[:3]) == [len(p) + 1 for p in prompts]


def test_prefix_written_back_continues_like_the_original(fp32):
    decoder, tok = fp32
    ids = tok.encode("remember this prefix and then continue")
    cache = decoder.new_cache(slots=2, max_length=32)
    decoder.prefill(cache, 0, ids[:-1])
    saved = cache.read(0, len(ids) - 1)
    expected = decoder.prefill(cache, 0, ids[-1:])
    cache.write(1, saved)
    np.testing.assert_allclose(decoder.prefill(cache, 1, ids[-1:]), expected, atol=1e-5)
