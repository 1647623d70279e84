"""Model output made fit for a WeChat bubble: Markdown turned into plain text, characters that XML cannot carry
dropped (the reply is an XML document; a model can emit control characters), and long answers cut at sentence
boundaries into pieces of at most 2048 UTF-8 bytes (the platform counts bytes, and cuts mid-character otherwise)."""

from __future__ import annotations

import re

from appliance.wechat.envelope import split_utf8

_FENCE = re.compile(r"^```[^\n]*\n?", re.MULTILINE)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+", re.MULTILINE)
_BOLD = re.compile(r"(\*\*|__)(.+?)\1")
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")
_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\((https?://[^)\s]+)\)")
_BULLET = re.compile(r"^(\s*)[-*+]\s+", re.MULTILINE)
_RULE = re.compile(r"^\s*([-*_])\1{2,}\s*$", re.MULTILINE)
_BLANKS = re.compile(r"\n{3,}")
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # outside XML 1.0's Char
_SENTENCE_END = re.compile(r"(?<=[。！？!?；;\n])|(?<=[.](?=\s))")


def plain_text(markdown: str) -> str:
    # an XML reader turns \r\n and \r into \n: said so here, the answer kept is the answer the user reads
    text = _NOT_XML.sub("", markdown.replace("\r\n", "\n").replace("\r", "\n"))
    text = _FENCE.sub("", text)
    text = _HEADING.sub("", text)
    text = _RULE.sub("", text)
    text = _BOLD.sub(r"\2", text)
    text = _ITALIC.sub(r"\1", text)
    text = _CODE.sub(r"\1", text)
    text = _LINK.sub(r"\1 \2", text)
    text = _BULLET.sub(r"\1• ", text)
    return _BLANKS.sub("\n\n", text).strip()


def wechat_pieces(text: str, limit: int = 2048) -> list[str]:
    """Pieces of at most `limit` bytes, cut after a sentence where one ends in range, else at a character."""
    pieces, current = [], ""
    for sentence in (s for s in _SENTENCE_END.split(text) if s):
        if len((current + sentence).encode()) <= limit:
            current += sentence
            continue
        if current:
            pieces.append(current)
        if len(sentence.encode()) > limit:  # one sentence longer than a bubble: cut it by bytes
            *full, current = split_utf8(sentence, limit)
            pieces += full
        else:
            current = sentence
    if current or not pieces:
        pieces.append(current)
    return [p.strip() for p in pieces if p.strip()] or [""]
