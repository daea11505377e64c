"""The held (speculative) reply's sender, and what the person heard of a reply."""

from __future__ import annotations

from typing import Any

from avatarchat.pipeline.session import GatedSender
from avatarchat.pipeline.turn import Turn


class Sink:
    def __init__(self) -> None:
        self.out: list[tuple[str, Any]] = []

    async def event(self, type: str, **fields: object) -> None:
        self.out.append((type, fields))

    async def media(self, turn_id: int, payload: bytes) -> None:
        self.out.append(("media", (turn_id, payload)))


async def test_gated_sender_holds_then_releases_in_order() -> None:
    sink = Sink()
    gate = GatedSender(sink)
    await gate.event("turn_start", turn_id=1)
    await gate.media(1, b"abc")
    await gate.event("text_delta", turn_id=1, delta="Hi")
    assert sink.out == []  # nothing reaches the client while held
    await gate.release()
    assert [k for k, _ in sink.out] == ["turn_start", "media", "text_delta"]
    await gate.event("turn_done", turn_id=1)  # after release, straight through
    assert sink.out[-1][0] == "turn_done"


def test_played_text_counts_whole_pieces_then_a_share_of_words() -> None:
    turn = Turn.__new__(Turn)
    turn.sentences = [(0, 1000, "One two three four."), (1000, 2000, "Five six seven eight nine ten.")]
    assert turn.played_text(0) == ""
    assert turn.played_text(500) == "One two"
    assert turn.played_text(1000) == "One two three four."
    assert turn.played_text(2000) == "One two three four. Five six seven"
    assert turn.played_text(10_000) == "One two three four. Five six seven eight nine ten."
