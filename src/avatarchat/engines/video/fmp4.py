"""H.264 + AAC in fragmented MP4, produced incrementally so it can be streamed to MediaSource.

One ``Fmp4Stream`` is one continuous media timeline (a turn, or a ``say`` file). Callers add the
audio of a piece of speech and then its frames; ``take()`` returns the bytes produced so far.
"""

from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np

AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
FRAGMENTED = "empty_moov+default_base_moof"


class _Sink:
    """A write-only file object that PyAV's muxer writes into."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0

    def write(self, data: bytes | memoryview) -> int:
        b = bytes(data)
        self._parts.append(b)
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        return None

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class Fmp4Stream:
    def __init__(
        self,
        width: int,
        height: int,
        fps: int,
        audio_rate: int,
        *,
        crf: int = 26,
        preset: str = "ultrafast",
        threads: int = 1,
        audio_bitrate: int = 64000,
    ) -> None:
        if audio_rate not in AAC_RATES:
            raise ValueError(f"audio rate {audio_rate} is not an AAC sample rate")
        self.fps = fps
        self.audio_rate = audio_rate
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format="mp4", options={"movflags": FRAGMENTED, "frag_duration": "1"})
        v = self._container.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.codec_context.time_base = Fraction(1, fps)
        v.codec_context.options = {
            "preset": preset,
            "tune": "zerolatency",
            "profile": "baseline",
            "crf": str(crf),
            "threads": str(threads),
            "x264-params": f"keyint={fps * 2}:min-keyint={fps}:scenecut=0",
        }
        a = self._container.add_stream("aac", rate=audio_rate)
        a.codec_context.layout = "mono"
        a.codec_context.bit_rate = audio_bitrate
        self._video = v
        self._audio = a
        self._frames = 0
        self._samples = 0  # audio samples handed to the encoder
        self._pending = np.zeros(0, np.float32)  # audio not yet a whole AAC frame
        self._closed = False
        self._last_rgb: np.ndarray | None = None
        self._last_yuv: np.ndarray | None = None  # repeated at close() to cover the AAC tail

    def start(self) -> None:
        """Open the encoders and write the init segment now rather than at the first frame, so a stream
        prepared ahead of time costs the first fragment nothing."""
        self._container.start_encoding()

    @property
    def video_seconds(self) -> float:
        return self._frames / self.fps

    @property
    def audio_seconds(self) -> float:
        return (self._samples + len(self._pending)) / self.audio_rate

    @property
    def mime(self) -> str:
        return mime_for(self._video.codec_context.extradata)

    def add_audio(self, pcm: np.ndarray) -> None:
        """Append mono float32 samples at ``audio_rate``."""
        self._pending = np.concatenate([self._pending, np.asarray(pcm, np.float32)])
        size = self._audio.codec_context.frame_size or 1024
        whole = len(self._pending) // size * size
        if whole:
            self._encode_audio(self._pending[:whole], size)
            self._pending = self._pending[whole:]

    def add_frame(self, rgb: np.ndarray) -> None:
        """Append one RGB frame (H, W, 3) uint8. The stream keeps a reference: do not change it afterwards."""
        # OpenCV's SIMD RGB→I420 is several times faster than swscale's path inside PyAV. The same image
        # again (a face held for two frames under load) is not converted again.
        same = rgb is self._last_rgb and self._last_yuv is not None
        self.add_yuv(self._last_yuv if same else cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420))  # type: ignore[arg-type]
        self._last_rgb = rgb

    def add_yuv(self, yuv: np.ndarray) -> None:
        """Append one I420 frame ((H·3/2, W) uint8, as ``cv2.COLOR_RGB2YUV_I420`` gives). Kept: do not change it."""
        self._last_rgb, self._last_yuv = None, yuv
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = self._frames
        frame.time_base = Fraction(1, self.fps)
        self._frames += 1
        for packet in self._video.encode(frame):
            self._container.mux(packet)

    @property
    def frames(self) -> int:
        return self._frames

    def take(self) -> bytes:
        return self._sink.take()

    def close(self) -> bytes:
        """Flush the encoders and return the last bytes. The audio tail is padded to a whole AAC frame
        (up to 46 ms at 22.05 kHz), and the last video frame is repeated to cover it within half a frame."""
        if self._closed:
            return b""
        size = self._audio.codec_context.frame_size or 1024
        if len(self._pending):
            tail = np.zeros(size, np.float32)
            tail[: len(self._pending)] = self._pending
            self._pending = np.zeros(0, np.float32)
            self._encode_audio(tail, size)
        last = self._last_yuv
        while last is not None and (self._frames + 0.5) / self.fps < self._samples / self.audio_rate:
            self.add_yuv(last)
        self._closed = True
        for packet in self._video.encode(None):
            self._container.mux(packet)
        self._mux_audio(self._audio.encode(None))
        self._container.close()
        return self._sink.take()

    def abort(self) -> None:
        """Drop the stream without flushing (the client has discarded it)."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except (av.FFmpegError, ValueError):
                pass

    def _encode_audio(self, pcm: np.ndarray, size: int) -> None:
        for start in range(0, len(pcm), size):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + size], format="fltp", layout="mono")
            frame.sample_rate = self.audio_rate
            frame.pts = self._samples
            frame.time_base = Fraction(1, self.audio_rate)
            self._samples += size
            self._mux_audio(self._audio.encode(frame))

    def _mux_audio(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            # The AAC encoder's priming packet (pts < 0) would make the muxer shift every track, and MSE
            # ignores edit lists. Dropping it keeps audio sample 0 at time 0; that first frame is silence.
            if packet.pts is not None and packet.pts < 0:
                continue
            self._container.mux(packet)


def mime_for(extradata: bytes | None) -> str:
    """The MediaSource type of our H.264 + AAC-LC stream, with profile and level read from the SPS."""
    avc = "avc1.42C01E"  # baseline, level 3.0: what x264 picks for 512x512 at 25 fps
    if extradata:
        if extradata[0] == 1 and len(extradata) >= 4:  # avcC
            avc = f"avc1.{extradata[1]:02X}{extradata[2]:02X}{extradata[3]:02X}"
        else:  # Annex B: find the SPS NAL unit (type 7)
            for start in (i + 3 for i in range(len(extradata) - 6) if extradata[i : i + 3] == b"\0\0\1"):
                if extradata[start] & 0x1F == 7:
                    sps = extradata[start + 1 : start + 4]
                    avc = f"avc1.{sps[0]:02X}{sps[1]:02X}{sps[2]:02X}"
                    break
    return f'video/mp4; codecs="{avc}, mp4a.40.2"'
