"""Rendering the model's own chat template: DeepSeek-R1's, with the opened think block."""

from appliance.model.manifest import load_manifest
from appliance.model.tokenizer import ChatTokenizer


def test_r1_prompt_opens_the_think_block(tiny_int4):
    tok = ChatTokenizer(load_manifest(tiny_int4))
    prompt = tok.render([{"role": "user", "content": "你好"}])
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>你好<｜Assistant｜><think>\n"
    assert tok.encode(prompt) == [151646, 151644, 108386, 151645, 151648, 198]


def test_r1_template_drops_earlier_reasoning(tiny_int4):
    tok = ChatTokenizer(load_manifest(tiny_int4))
    prompt = tok.render([
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n2"},
        {"role": "user", "content": "and 2+2?"},
    ])
    assert "simple sum" not in prompt
    assert prompt.count("<think>") == 1 and prompt.endswith("<｜Assistant｜><think>\n")
    # the template keeps what follows </think> verbatim, the blank line included
    assert "<｜Assistant｜>\n\n2<｜end▁of▁sentence｜>" in prompt


def test_system_prompt_leads(tiny_int4):
    tok = ChatTokenizer(load_manifest(tiny_int4))
    prompt = tok.render([{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "hi"}])
    assert prompt.startswith("<｜begin▁of▁sentence｜>You answer briefly.<｜User｜>hi")


def test_stream_decoder_holds_split_characters(tiny_int4):
    tok = ChatTokenizer(load_manifest(tiny_int4))
    text = "长城🙂 ok"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
