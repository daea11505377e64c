"""Turn-taking: VAD probabilities → when the person starts, pauses, resumes and finishes speaking (seed 002).

A pure state machine over 32 ms windows, with no I/O, so it is easy to test and cheap to run inline:

    SILENT ──voiced──▶ PENDING ──voiced ≥ confirm──▶ SPEAKING ──silent──▶ TRAILING ──silence ≥ end──▶ SILENT
                          │ silent too long                ▲                 │ voiced again
                          ▼                                └─────────────────┘ (speculation discarded)
                        SILENT

Events: ``SpeechStart`` (confirmed speech; may be a barge-in), ``Partial`` (time for a partial
transcript), ``Speculate`` (silence long enough to start the final transcript and the reply
speculatively), ``Resumed`` (speech came back: drop the speculation), ``EndOfTurn``.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

import numpy as np

from avatarchat.config import VADConfig, VoiceConfig
from avatarchat.engines.vad.base import VADStream

RATE = 16000


class State(enum.Enum):
    SILENT = "silent"
    PENDING = "pending"
    SPEAKING = "speaking"
    TRAILING = "trailing"


@dataclass(frozen=True)
class SpeechStart:
    voiced_ms: int
    utterance_id: int


@dataclass(frozen=True)
class Partial:
    audio: np.ndarray


@dataclass(frozen=True)
class Speculate:
    audio: np.ndarray
    utterance_id: int


@dataclass(frozen=True)
class Resumed:
    utterance_id: int


@dataclass(frozen=True)
class EndOfTurn:
    audio: np.ndarray
    utterance_id: int
    trailing_ms: int  # silence already waited since the last voiced window


Event = SpeechStart | Partial | Speculate | Resumed | EndOfTurn


class TurnTaker:
    def __init__(self, vad: VADStream, vad_config: VADConfig, voice: VoiceConfig, partial_interval_ms: int) -> None:
        self._vad = vad
        self._vc = vad_config
        self._voice = voice
        self._window_ms = vad.window * 1000 // RATE
        self._partial_every = partial_interval_ms
        self.confirm_ms = voice.speech_confirm_ms  # raised by the session while the avatar speaks (echo guard)
        self.state = State.SILENT
        self._pre: deque[np.ndarray] = deque(maxlen=max(1, voice.pre_roll_ms // self._window_ms))
        self._utt: list[np.ndarray] = []
        self._voiced_ms = 0
        self._silent_ms = 0
        self._since_partial = 0
        self._speculated = False
        self._utterance_id = 0
        self._carry = np.zeros(0, np.float32)

    @property
    def utterance_id(self) -> int:
        return self._utterance_id

    @property
    def voiced_ms(self) -> int:
        return self._voiced_ms

    def reset(self) -> None:
        self._vad.reset()
        self.state = State.SILENT
        self._pre.clear()
        self._utt = []
        self._carry = np.zeros(0, np.float32)

    def push(self, audio: np.ndarray) -> list[Event]:
        """Feed 16 kHz mono float32; returns the events it caused, in order."""
        buf = np.concatenate([self._carry, audio]) if len(self._carry) else audio
        w = self._vad.window
        usable = len(buf) - len(buf) % w
        self._carry = buf[usable:].copy()
        probs = self._vad.push(buf[:usable])
        events: list[Event] = []
        for i, p in enumerate(probs):
            events += self._step(buf[i * w : (i + 1) * w], p)
        return events

    def _step(self, chunk: np.ndarray, p: float) -> list[Event]:
        voiced = p >= self._vc.threshold
        silent = p < self._vc.neg_threshold
        ms = self._window_ms
        v = self._voice
        if self.state is State.SILENT:
            if voiced:
                self.state = State.PENDING
                self._utt = [*self._pre, chunk]
                self._voiced_ms, self._silent_ms = ms, 0
            else:
                self._pre.append(chunk)
            return []
        self._utt.append(chunk)
        if self.state is State.PENDING:
            if voiced:
                self._voiced_ms += ms
                self._silent_ms = 0
            elif silent:
                self._silent_ms += ms
            if self._voiced_ms >= self.confirm_ms:
                self.state = State.SPEAKING
                self._utterance_id += 1
                self._since_partial = 0
                self._speculated = False
                return [SpeechStart(self._voiced_ms, self._utterance_id)]
            if self._silent_ms >= max(v.speech_confirm_ms, 2 * ms):
                self._drop_to_silent()  # a blip (a click, a cough): not speech
            return []
        events: list[Event] = []
        if self.state is State.SPEAKING:
            self._voiced_ms += ms if voiced else 0
            self._since_partial += ms
            if silent:
                self.state = State.TRAILING
                self._silent_ms = ms
            elif self._since_partial >= self._partial_every:
                self._since_partial = 0
                events.append(Partial(self._audio()))
        elif self.state is State.TRAILING:
            if voiced:
                self.state = State.SPEAKING
                self._silent_ms = 0
                if self._speculated:
                    self._speculated = False
                    events.append(Resumed(self._utterance_id))
                return events
            self._silent_ms += ms
            if not self._speculated and self._silent_ms >= v.speculate_after_ms:
                self._speculated = True
                events.append(Speculate(self._audio(), self._utterance_id))
            if self._silent_ms >= v.silence_ms:
                events.append(EndOfTurn(self._audio(), self._utterance_id, self._silent_ms))
                self._drop_to_silent()
                return events
        if len(self._utt) * ms >= v.max_utterance_s * 1000:
            events.append(EndOfTurn(self._audio(), self._utterance_id, 0))
            self._drop_to_silent()
        return events

    def keep_last(self, ms: int) -> None:
        """Forget all but the last ``ms`` of the current utterance (what came before was not the person's)."""
        keep = max(1, -(-ms // self._window_ms))
        self._utt = self._utt[-keep:]

    def _audio(self) -> np.ndarray:
        return np.concatenate(self._utt) if self._utt else np.zeros(0, np.float32)

    def _drop_to_silent(self) -> None:
        self.state = State.SILENT
        self._utt = []
        self._pre.clear()
        self._voiced_ms = self._silent_ms = 0
