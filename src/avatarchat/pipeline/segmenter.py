"""Cut streamed LLM text into pieces that are spoken one at a time.

Sentence ends (seed 002): 。！？.!?；; and newline. The first piece of a reply is cut early, at the
first clause boundary (，,、:：) or after about ``first_max_words`` words, so speech starts sooner;
but not before ``first_min_words`` words: a two-word first piece ("The moon.") plays out before the
next one is synthesized, and the avatar would stall.
The first ``eager_pieces`` pieces are cut that way, the word limit doubling each time: piece 2 must
be ready before the short piece 1 has played, so it may not be a 30-word sentence either.
A "." between digits or inside an abbreviation-like token (e.g. "3.5", "e.g.") is not an end.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

SENTENCE_ENDS = frozenset("。！？.!?；;\n")
CLAUSE_BOUNDS = frozenset("，,、:：")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Closing quotes/brackets that belong to the sentence before the cut.
_TRAILERS = frozenset("\"'”’)]}）」』】")
_ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "st", "approx"})


def count_words(text: str) -> int:
    """Words for Latin text; each CJK character counts as half a word (about two per word)."""
    cjk = len(_CJK.findall(text))
    latin = len(_CJK.sub(" ", text).split())
    return latin + (cjk + 1) // 2


_PAIRS = {"“": "”", "「": "」", "『": "』", "（": "）", "【": "】", "(": ")", "[": "]"}


def _open_quote(text: str) -> bool:
    """A quote or bracket is open, so a closing one may follow the punctuation just streamed. Otherwise
    a ，。！？ (or ,!?) ends its piece at once: waiting for the next token costs a token's time (~60 ms
    for the bilingual LLM on one core) on every piece."""
    return text.count('"') % 2 == 1 or any(text.count(a) > text.count(b) for a, b in _PAIRS.items())


def _long_enough(clause: str) -> bool:
    return len(_CJK.findall(clause)) >= 2 or len(clause.split()) >= 2


class Segmenter:
    def __init__(
        self, first_max_words: int = 8, max_chars: int = 300, first_min_words: int = 1, eager_pieces: int = 1
    ) -> None:
        self._first_max_words = first_max_words
        self._first_min_words = min(first_min_words, first_max_words)
        self._eager_pieces = eager_pieces
        self._max_chars = max_chars
        self._buf = ""
        self._emitted = 0

    def push(self, delta: str) -> Iterator[str]:
        """Feed more text; yield every piece that is complete."""
        self._buf += delta
        while (cut := self._find_cut()) is not None:
            yield from self._take(cut)

    def flush(self) -> Iterator[str]:
        """The reply ended: yield what is left."""
        yield from self._take(len(self._buf))

    def _take(self, cut: int) -> Iterator[str]:
        piece, self._buf = self._buf[:cut], self._buf[cut:]
        piece = piece.strip()
        if piece and any(ch.isalnum() for ch in piece):
            self._emitted += 1
            yield piece

    def _find_cut(self) -> int | None:
        buf = self._buf
        eager = self._emitted < self._eager_pieces
        first = self._emitted == 0
        for i, ch in enumerate(buf):
            if ch in SENTENCE_ENDS or (eager and ch in CLAUSE_BOUNDS):
                if i + 1 >= len(buf) and (ch == "." or _open_quote(buf)):
                    return None  # need the next char to tell "3." from "3.5" or to take a closing quote
                if ch == "." and self._is_inner_dot(buf, i):
                    continue
                if ch in CLAUSE_BOUNDS and not _long_enough(buf[:i]):
                    continue  # "Well," alone is too short to be worth a piece
                if first and count_words(buf[:i]) < self._first_min_words:
                    continue
                end = i + 1
                while end < len(buf) and buf[end] in _TRAILERS:
                    end += 1
                if end >= len(buf) and buf[end - 1] in _TRAILERS:
                    return None
                return end
        max_words = self._first_max_words << self._emitted
        if eager and count_words(buf) > max_words:
            space = buf.rstrip().rfind(" ")
            if space > 0 and count_words(buf[:space]) >= max_words:
                return space + 1
            if _CJK.search(buf[-1]):
                return len(buf)
        if len(buf) > self._max_chars:
            space = buf.rfind(" ", 0, self._max_chars)
            return space + 1 if space > 0 else self._max_chars
        return None

    @staticmethod
    def _is_inner_dot(buf: str, i: int) -> bool:
        nxt = buf[i + 1]
        if nxt.isdigit() and i > 0 and buf[i - 1].isdigit():
            return True  # 3.5
        if nxt.isalpha():
            return True  # file.txt / a.m.
        word = buf[:i].rsplit(None, 1)[-1].lower() if buf[:i].strip() else ""
        return word in _ABBREVIATIONS


def split_text(text: str, first_max_words: int = 8, first_min_words: int = 1, eager_pieces: int = 1) -> list[str]:
    """Segment a whole text at once (used by ``say``)."""
    seg = Segmenter(first_max_words=first_max_words, first_min_words=first_min_words, eager_pieces=eager_pieces)
    return [*seg.push(text), *seg.flush()]
