"""Split a model's streamed text into reasoning (the think block) and the answer, safely across pieces.

DeepSeek-R1 templates open `<think>` in the prompt, so the output holds only `</think>`; other models write both
tags, or none. A tag may arrive split over several pieces ("</th" + "ink>"), so text that could still become a tag
is held back until it cannot. An unclosed block stays reasoning; an empty one yields no reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""


@dataclass
class ReasoningSplitter:
    open_tag: str = "<think>"
    close_tag: str = "</think>"
    opened_in_prompt: bool = False
    _state: str = field(init=False)  # "start" (an opening tag may come), "think", "answer"
    _held: str = field(init=False, default="")
    _answer_started: bool = field(init=False, default=False)

    def __post_init__(self):
        self._state = "think" if self.opened_in_prompt else "start"

    @property
    def thinking(self) -> bool:
        return self._state == "think"

    def push(self, text: str) -> Split:
        out = Split()
        buf = self._held + text
        self._held = ""
        while buf:
            if self._state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(self.open_tag):
                    self._state, buf = "think", stripped[len(self.open_tag):]
                elif self.open_tag.startswith(stripped):  # whitespace or a tag's beginning: wait for more
                    self._held = buf
                    return out
                else:
                    self._state = "answer"
            elif self._state == "think":
                at = buf.find(self.close_tag)
                if at >= 0:
                    out.reasoning += buf[:at]
                    self._state, buf = "answer", buf[at + len(self.close_tag):]
                else:
                    keep = _partial_suffix(buf, self.close_tag)
                    out.reasoning += buf[:len(buf) - keep]
                    self._held = buf[len(buf) - keep:]
                    return out
            else:
                if not self._answer_started:  # the blank line after </think> is layout, not answer
                    buf = buf.lstrip("\n")
                    if not buf:
                        return out
                    self._answer_started = True
                out.content += buf
                return out
        return out

    def finish(self) -> Split:
        """Flush what was held back: an unfinished tag is plain text of the part it was in."""
        held, self._held = self._held, ""
        if self._state == "think":
            return Split(reasoning=held)
        return Split(content=held.strip() if self._state == "start" else held)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper beginning of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
