"""Per-session conversation history, trimmed to a token budget."""

from __future__ import annotations

import re

from collections.abc import Callable
from dataclasses import dataclass, field

from avatarchat.engines.types import ChatMessage


def cjk_count(text: str) -> int:
    """How many CJK ideographs ``text`` has."""
    return sum(1 for ch in text if "\u3400" <= ch <= "\u9fff")


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate: ~4 chars per token for Latin text, one per CJK character."""
    cjk = cjk_count(text)
    return cjk + (len(text) - cjk + 3) // 4 + 1


_CUES = {"zh": "\n（请用简体中文回答。）", "en": "\n(Answer in English.)"}


def script_language(text: str) -> str:
    """"zh" when the CJK ideographs outnumber the Latin words (a hanzi is about a word), else "en"."""
    cjk = cjk_count(text)
    words = len(re.findall(r"[A-Za-z]+", text))
    return "zh" if cjk and cjk >= words else "en"


def with_language_cue(text: str) -> str:
    """``text`` with a line asking for the answer in its own language."""
    return text + _CUES[script_language(text)]


# The person asks about what they interrupted: the cut-short exchange stays in the prompt.
_REFERS_BACK = re.compile(
    r"\b(repeat|again|continue|go on|keep going|carry on|finish|you were saying|what did you say|last part|before)\b"
    r"|继续|再说|重复|刚才|接着|说完",
    re.IGNORECASE,
)


@dataclass
class History:
    system_prompt: str
    budget: int
    count_tokens: Callable[[str], int] = approx_tokens
    _messages: list[ChatMessage] = field(default_factory=list)
    _cut_short: bool = False  # the newest reply was interrupted

    def add(self, role: str, content: str) -> None:
        if content:
            self._messages.append(ChatMessage(role, content, self.count_tokens(content) + 4))
            self._cut_short = False
        self._trim()

    def replace_last_reply(self, content: str, *, interrupted: bool = False) -> bool:
        """Replace the newest assistant message (e.g. with the part the person heard before interrupting)."""
        for i in range(len(self._messages) - 1, -1, -1):
            if self._messages[i].role == "assistant":
                if content:
                    self._messages[i] = ChatMessage("assistant", content, self.count_tokens(content) + 4)
                else:
                    del self._messages[i]
                self._cut_short = interrupted
                return True
            if self._messages[i].role == "user":
                return False
        return False

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        """The prompt: system prompt, the history that fits the budget, then ``user_text``.

        Right after a barge-in the interrupted exchange is left out of the prompt (it stays in the history),
        unless the person refers back to it: with it in, the embedded model went on with the old answer instead
        of the new question in 5-7 of 24 trials, without it in 2 of 24 (BENCHMARKS.md, "Barge-in")."""
        kept = self._messages
        if self._cut_short and user_text is not None and not _REFERS_BACK.search(user_text):
            users = [i for i, m in enumerate(kept) if m.role == "user"]
            kept = kept[: users[-1]] if users else kept  # from the question that reply answered on
        out = [{"role": "system", "content": self.system_prompt}]
        out += [m.as_dict() for m in kept]
        if user_text is not None:
            out.append({"role": "user", "content": user_text})
        return out

    @property
    def turns(self) -> list[ChatMessage]:
        return list(self._messages)

    @property
    def tokens(self) -> int:
        return sum(m.tokens for m in self._messages)

    def clear(self) -> None:
        self._messages.clear()

    def _trim(self) -> None:
        # Drop the oldest messages first, in user/assistant pairs, so the model never sees an orphaned answer.
        while self._messages and self.tokens > self.budget:
            self._messages.pop(0)
            while self._messages and self._messages[0].role != "user":
                self._messages.pop(0)
