"""The streaming reasoning splitter: think blocks opened in the prompt or in the output, empty, unclosed, and tags
split across pieces."""

import pytest

from appliance.model.reasoning import ReasoningSplitter


def _run(pieces, **kwargs):
    splitter = ReasoningSplitter(**kwargs)
    reasoning = content = ""
    for piece in pieces:
        out = splitter.push(piece)
        reasoning, content = reasoning + out.reasoning, content + out.content
    out = splitter.finish()
    return reasoning + out.reasoning, content + out.content


def test_opened_in_prompt_the_output_holds_only_the_closing_tag():
    assert _run(["Let me", " think.", "</think>", "\n\n", "Answer."], opened_in_prompt=True) == \
        ("Let me think.", "Answer.")


@pytest.mark.parametrize("cut", range(1, len("a</think>\n\nb")))
def test_tags_split_anywhere_are_found(cut):
    text = "a</think>\n\nb"
    assert _run([text[:cut], text[cut:]], opened_in_prompt=True) == ("a", "b")


def test_tag_split_character_by_character():
    assert _run(list("<think>plan</think>done")) == ("plan", "done")


def test_both_tags_in_the_output():
    assert _run(["  <th", "ink>\nstep 1", "</th", "ink>\n", "result"]) == ("\nstep 1", "result")


def test_empty_think_block():
    assert _run(["<think>\n\n</think>\n\nHello"]) == ("\n\n", "Hello")
    assert _run(["</think>", "Hello"], opened_in_prompt=True) == ("", "Hello")


def test_unclosed_block_stays_reasoning():
    assert _run(["still thinking about </thi"], opened_in_prompt=True) == ("still thinking about </thi", "")


def test_no_tags_is_all_content():
    assert _run(["Plain ", "answer < 3"]) == ("", "Plain answer < 3")


def test_a_lookalike_is_not_a_tag():
    assert _run(["</thinking> is not it</think>ok"], opened_in_prompt=True) == ("</thinking> is not it", "ok")


def test_thinking_state_is_visible():
    splitter = ReasoningSplitter(opened_in_prompt=True)
    assert splitter.thinking
    splitter.push("x</think>")
    assert not splitter.thinking
