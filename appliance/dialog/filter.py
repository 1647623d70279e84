"""The sensitive-word filter: one Aho-Corasick automaton over the configured word lists, applied to what users
send (a hit gets a polite refusal instead of a model call) and to what the model answers (hits are masked)."""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

import ahocorasick

from appliance.errors import ConfigError

log = logging.getLogger(__name__)


def _read(paths: list[str]) -> list[str]:
    words = []
    for path in paths:
        try:
            words += [line for line in Path(path).read_text(encoding="utf-8").splitlines()
                      if not line.lstrip().startswith("#")]
        except OSError as e:
            raise ConfigError(f"sensitive-word list {path}: cannot read it ({e.strerror}).") from None
        except UnicodeDecodeError:
            raise ConfigError(f"sensitive-word list {path}: not UTF-8.") from None
    return words


def _stamps(paths) -> tuple:
    out = []
    for path in paths:
        try:
            st = Path(path).stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def _normalize(text: str) -> str:
    # full-width letters and digits, and case, must not slip past the list
    return unicodedata.normalize("NFKC", text).lower()


class WordFilter:
    def __init__(self, words: list[str], paths: tuple[str, ...] = ()):
        self.paths = paths
        self._stamps = _stamps(paths)
        self._build(words)

    def _build(self, words: list[str]) -> None:
        self.words = sorted({_normalize(w.strip()) for w in words if w.strip()})
        automaton = ahocorasick.Automaton()
        for word in self.words:
            automaton.add_word(word, len(word))
        if self.words:
            automaton.make_automaton()
        self._automaton = automaton

    @classmethod
    def from_files(cls, paths: list[str]) -> "WordFilter":
        return cls(_read(paths), tuple(paths))

    def reload_if_changed(self) -> bool:
        """Pick up edited lists without a restart; a list that became unreadable keeps the old words."""
        stamps = _stamps(self.paths)
        if stamps == self._stamps:
            return False
        try:
            self._build(_read(list(self.paths)))
        except ConfigError as e:
            log.error("%s; keeping the previous word list", e)
            return False
        self._stamps = stamps
        log.info("sensitive-word lists reloaded: %d words", len(self.words))
        return True

    def hits(self, text: str) -> list[str]:
        if not self.words:
            return []
        return sorted({_normalize(text)[end - n + 1:end + 1] for end, n in self._automaton.iter(_normalize(text))})

    def mask(self, text: str) -> str:
        """Each hit replaced by as many ＊ as it has characters. NFKC keeps the length of CJK text, and the mask
        works on the normalized positions, which line up with the original for the characters we meet."""
        if not self.words:
            return text
        normalized = _normalize(text)
        if len(normalized) != len(text):
            text = normalized  # rare (ligatures and the like): mask the normalized form rather than misalign
        chars = list(text)
        for end, n in self._automaton.iter(normalized):
            chars[end - n + 1:end + 1] = "＊" * n
        return "".join(chars)
