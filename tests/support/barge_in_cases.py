"""After a barge-in: conversations whose next reply should answer a new question (a bench and a test share them)."""

from __future__ import annotations

import re

from avatarchat.pipeline.history import History

# (asked first, heard of its reply, asked over it, words of the new topic, words of the old one)
CASES = [
    ("Tell me a long story about a brave knight.", "Once upon a time, in a kingdom far away, a brave knight",
     "Tell me about the sun instead.", ["sun", "star", "light", "hot"], ["knight", "castle", "sword", "kingdom"]),
    ("Describe a walk through a forest in autumn.", "The leaves crunch under your feet as you walk",
     "Actually, how do I cook rice?", ["rice", "water", "cook", "boil", "pot"], ["forest", "leaves", "tree", "autumn"]),
    ("Tell me a story about a dragon who bakes bread.", "There once was a dragon named Ember who loved",
     "Wait, what is the biggest ocean?", ["pacific", "ocean"], ["dragon", "bread", "bake", "ember"]),
    ("Explain how a rainbow forms.", "A rainbow forms when sunlight passes through raindrops",
     "Never mind, tell me a joke about cats.", ["cat", "joke", "meow", "purr", "kitten"], ["rainbow", "raindrop"]),
    ("Tell me about the history of the bicycle.", "The bicycle was invented in the early nineteenth",
     "Stop, what should I eat for breakfast?", ["breakfast", "eat", "egg", "oat", "toast", "cereal", "fruit"],
     ["bicycle", "bike", "wheel"]),
    ("Tell me a story about a lighthouse keeper.", "Old Tom had kept the lighthouse on the rocky",
     "Hold on, how far away is the moon?", ["moon", "miles", "kilometers", "km", "distance"],
     ["lighthouse", "keeper", "tom"]),
]


def answers_new(reply: str, new: list[str], old: list[str]) -> bool:
    text = reply.lower()
    return any(re.search(r"\b" + w, text) for w in new) and not any(re.search(r"\b" + w, text) for w in old)


def prompt(system: str, case: tuple, interrupted: bool) -> list[dict[str, str]]:  # type: ignore[type-arg]
    asked, heard, question, _, _ = case
    h = History(system, 1200)
    h.add("user", asked)
    h.add("assistant", heard + " and then much more that was never heard.")
    h.replace_last_reply(heard, interrupted=interrupted)
    return h.messages(question)
