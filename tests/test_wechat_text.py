"""Answers made fit for WeChat: Markdown to plain text, and pieces of at most 2048 UTF-8 bytes cut at sentences."""

import pytest

from appliance.dialog.wechat_text import plain_text, wechat_pieces


def test_markdown_becomes_plain_text():
    md = "# 开户\n**需要**带`身份证`，详见[网站](https://bank.example/a)\n- 第一步\n* 第二步\n```\ncode\n```\n---"
    assert plain_text(md) == "开户\n需要带身份证，详见网站 https://bank.example/a\n• 第一步\n• 第二步\ncode"


def test_characters_xml_cannot_carry_are_dropped():
    import xml.etree.ElementTree as ET

    text = plain_text("答\x00案\x08是\x1b[0m\ufffe好\t的\n")
    assert text == "答案是[0m好\t的"
    assert ET.fromstring(f"<xml><Content>{text}</Content></xml>").find("Content").text == text


def test_carriage_returns_become_the_newlines_an_xml_reader_would_make_of_them():
    import xml.etree.ElementTree as ET

    text = plain_text("第一行 \r\n第二行\r第三行")
    assert text == "第一行 \n第二行\n第三行"
    assert ET.fromstring(f"<xml><Content>{text}</Content></xml>").find("Content").text == text


def test_plain_text_is_left_alone():
    text = "利率为 2*3 的结果，a_b_c 不变。"
    assert plain_text(text) == text


@pytest.mark.parametrize("text", ["第一句。" * 700, "Sentence one. " * 400, "长" * 3000, "🙂" * 1200])
def test_pieces_fit_and_lose_nothing(text):
    pieces = wechat_pieces(text)
    assert all(len(p.encode()) <= 2048 for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")


def test_cuts_fall_on_sentence_ends_when_possible():
    pieces = wechat_pieces("第一句。" * 700)
    assert len(pieces) > 1 and all(p.endswith("。") for p in pieces)
