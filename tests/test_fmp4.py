import io

import av
import numpy as np
import pytest

from avatarchat.engines.video.fmp4 import Fmp4Stream, mime_for


def decode(data: bytes) -> tuple[list[float], int, float]:
    with av.open(io.BytesIO(data)) as c:
        times = [float(f.pts * f.time_base) for f in c.decode(video=0)]
    with av.open(io.BytesIO(data)) as c:
        samples = 0
        rate = 0
        for f in c.decode(audio=0):
            samples += f.samples
            rate = f.sample_rate
    return times, samples, samples / rate


def test_stream_is_continuous_across_pieces_and_in_sync() -> None:
    s = Fmp4Stream(256, 256, 25, 22050)
    out = b""
    chunks = []
    for piece in range(3):
        frames = 20 + piece * 7
        s.add_audio(np.full(frames * 882, 0.1, np.float32))
        for i in range(frames):
            img = np.full((256, 256, 3), (i * 9) % 255, np.uint8)
            s.add_frame(img)
            data = s.take()
            chunks.append(len(data))
            out += data
    out += s.close()
    assert out[4:8] == b"ftyp"
    times, _, audio_s = decode(out)
    assert len(times) == 20 + 27 + 34
    assert np.allclose(np.diff(times), 0.04)
    assert abs(audio_s - len(times) / 25) <= 0.04
    # Streaming: bytes leave while frames are added, not only at the end.
    assert sum(1 for c in chunks if c) > 50


def test_first_fragment_leaves_after_two_frames() -> None:
    s = Fmp4Stream(128, 128, 25, 22050)
    s.add_audio(np.zeros(882 * 10, np.float32))
    s.add_frame(np.zeros((128, 128, 3), np.uint8))
    s.add_frame(np.zeros((128, 128, 3), np.uint8))
    data = s.take()
    assert b"moov" in data and b"moof" in data and b"mdat" in data
    s.abort()


def test_mime_comes_from_the_sps() -> None:
    s = Fmp4Stream(128, 128, 25, 22050)
    s.add_frame(np.zeros((128, 128, 3), np.uint8))
    assert s.mime.startswith('video/mp4; codecs="avc1.42')
    s.abort()
    assert mime_for(bytes([1, 0x64, 0, 0x1F])) == 'video/mp4; codecs="avc1.64001F, mp4a.40.2"'


def test_rejects_non_aac_rate() -> None:
    with pytest.raises(ValueError, match="AAC"):
        Fmp4Stream(128, 128, 25, 12345)


def test_started_stream_has_its_init_segment_and_codec_string_before_any_frame() -> None:
    s = Fmp4Stream(256, 256, 25, 22050)
    s.start()
    assert s.mime.startswith('video/mp4; codecs="avc1.')
    init = s.take()
    assert init[4:8] == b"ftyp" and b"moov" in init and b"moof" not in init
    s.start()  # idempotent
    s.add_audio(np.full(10 * 882, 0.1, np.float32))
    for _ in range(10):
        s.add_frame(np.full((256, 256, 3), 90, np.uint8))
    times, _, audio_s = decode(init + s.take() + s.close())
    assert len(times) == 10 and abs(audio_s - 0.4) <= 0.05


def test_piece_audio_is_sliced_at_frame_boundaries_with_a_lead() -> None:
    from avatarchat.pipeline.media import Piece

    piece = Piece("hi", np.zeros(10 * 882, np.float32), np.zeros((10, 3), np.float32))
    assert piece.audio_until(0) == 0
    assert piece.audio_until(2) == 2 * 882
    assert piece.audio_until(2, lead=100) == 2 * 882 + 100
    assert piece.audio_until(9, lead=5000) == 10 * 882  # never past the piece
    assert piece.audio_until(10) == piece.audio_until(12) == 10 * 882


def test_frames_given_in_i420_make_the_same_stream_as_rgb() -> None:
    """A renderer that gives the encoder's own format (I420) skips the conversion: the same bytes come out, and
    the last frame is still repeated to cover the audio's tail at close()."""
    import cv2

    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 255, (64, 96, 3), np.uint8) for _ in range(6)]
    audio = np.zeros(int(22050 * 0.5), np.float32)  # longer than the 6 frames: the tail needs repeats
    out = []
    for as_i420 in (False, True):
        stream = Fmp4Stream(96, 64, 25, 22050, threads=1)
        stream.start()
        stream.add_audio(audio)
        for f in frames:
            stream.add_yuv(cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420)) if as_i420 else stream.add_frame(f)
        data = stream.take() + stream.close()
        assert stream.frames == 13  # 0.5 s at 25 fps, rounded up by the AAC frames
        out.append(data)
    assert out[0] == out[1]
