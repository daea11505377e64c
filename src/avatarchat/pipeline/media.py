"""Speech → lip-synced frames → fMP4 bytes. Shared by the live pipeline and the ``say`` command.

All functions here are blocking CPU work, meant for worker threads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

from avatarchat.engines.avatar.base import AvatarRendererProtocol, SpeechTrack, wants_audio
from avatarchat.engines.avatar.visemes import mouth_track
from avatarchat.engines.types import Speech
from avatarchat.engines.video.fmp4 import Fmp4Stream
from avatarchat.pipeline.echo import band_energy

_MARKUP = re.compile(r"[*_#`~>|]+|\[(.*?)\]\((?:.*?)\)")
_EMOJI = re.compile("[\U0001f300-\U0001faff\u2600-\u27bf\ufe0f]")


def speakable(text: str) -> str:
    """What the TTS should read: the text without markdown and emoji."""
    text = _MARKUP.sub(lambda m: m.group(1) or " ", text)
    return " ".join(_EMOJI.sub("", text).split())


def resample(audio: np.ndarray, rate: int, to: int) -> np.ndarray:
    """Mono float32 audio at ``rate`` Hz, at ``to`` Hz."""
    audio = audio.astype(np.float32, copy=False)
    if rate == to:
        return audio
    g = math.gcd(rate, to)
    return resample_poly(audio, to // g, rate // g).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Piece:
    """One spoken piece, ready to render: audio at the stream's rate, and one mouth row per frame."""

    text: str
    audio: np.ndarray
    mouth: np.ndarray
    bands: np.ndarray | None = None  # band energies of the audio, for the echo check

    @property
    def frames(self) -> int:
        return len(self.mouth)

    def audio_until(self, frame: int, lead: int = 0) -> int:
        """The sample index where frame ``frame`` starts, plus ``lead`` samples, within the piece."""
        if frame >= self.frames:
            return len(self.audio)
        return min(len(self.audio), round(frame * len(self.audio) / self.frames) + lead)


class Timeline:
    """Keeps audio and video of one stream the same length, piece after piece."""

    def __init__(self, fps: int, audio_rate: int) -> None:
        self.fps = fps
        self.audio_rate = audio_rate
        self.frames = 0
        self.samples = 0

    @property
    def ms(self) -> int:
        return round(self.frames * 1000 / self.fps)

    def prepare(self, speech: Speech) -> Piece:
        audio = resample(speech.audio, speech.sample_rate, self.audio_rate)
        n_frames = max(1, math.ceil(len(audio) * self.fps / self.audio_rate))
        # Pad the audio so that this piece ends exactly where its last frame ends: no drift over a long turn.
        target = round((self.frames + n_frames) * self.audio_rate / self.fps) - self.samples
        audio = np.pad(audio, (0, max(0, target - len(audio))))[:target]
        self.frames += n_frames
        self.samples += target
        return Piece(speech.text, audio, mouth_track(speech, self.fps, n_frames), band_energy(audio, self.audio_rate))


def speech_track(renderer: AvatarRendererProtocol, audio_rate: int, fps: int) -> SpeechTrack | None:
    """A new stream's speech track if ``renderer`` is driven by audio (Wav2Lip), else None."""
    return SpeechTrack(audio_rate, fps) if wants_audio(renderer) else None


def render_batch(
    stream: Fmp4Stream, renderer: AvatarRendererProtocol, mouth: np.ndarray, first_frame: int, audio: np.ndarray | None,
    hold: int = 1, speech: SpeechTrack | None = None,
) -> bytes:
    """Encode ``audio`` (if given) then one frame per mouth row; return the bytes produced. With ``hold`` > 1
    (overload), a face is rendered only every ``hold`` frames and shown until the next: the stream keeps
    its frame rate and timing. ``speech`` (see ``speech_track``): the stream's audio so far, for a renderer
    driven by audio, which then renders the batch's faces in one call."""
    if audio is not None:
        stream.add_audio(audio)
        if speech is not None:
            speech.push(audio)
    if speech is not None and len(mouth):
        speech.begin(first_frame)
        keys = [k for k in range(len(mouth)) if k == 0 or (first_frame + k) % hold == 0]
        faces = dict(zip(keys, renderer.render_speech([first_frame + k for k in keys], mouth[keys], speech)))  # type: ignore[attr-defined]
        face = faces[0]
        for k in range(len(mouth)):
            face = faces.get(k, face)
            stream.add_frame(face)
        speech.forget_before(first_frame)
        return stream.take()
    in_i420 = getattr(renderer, "render_yuv", None)  # a renderer that gives the encoder's own format
    image = None
    for k, row in enumerate(mouth):
        if image is None or (first_frame + k) % hold == 0:
            image = in_i420(first_frame + k, row) if in_i420 is not None else renderer.render(first_frame + k, row)
        if in_i420 is not None:
            stream.add_yuv(image)
        else:
            stream.add_frame(image)
    return stream.take()
