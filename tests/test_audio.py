from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from inference.audio import AudioError, DecodedAudio, PcmStreamDecoder, decode_audio

CODECS = {"wav": "pcm_s16le", "mp3": "libmp3lame", "ogg": "libopus", "flac": "flac"}
FRAME_S = 1 / 25


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(fmt: str, samples: np.ndarray, rate: int) -> bytes:
    """Encode (channels, n) float32 samples into ``fmt`` in memory."""
    channels = samples.shape[0]
    layout = "mono" if channels == 1 else "stereo"
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(CODECS[fmt], rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples), format="fltp", layout=layout
        )
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = Fraction(1, rate)
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def pcm_bytes(samples: np.ndarray) -> bytes:
    """(channels, n) float32 to interleaved s16le."""
    return (np.clip(samples.T, -1, 1) * 32767).astype("<i2").tobytes()


def video_only(fmt: str, codec: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(10):
            image = np.full((64, 64, 3), i * 20, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def check_decoded(audio: DecodedAudio, seconds: float, amplitude: float = 0.5) -> None:
    assert audio.features.dtype == np.float32 and audio.output.dtype == np.float32
    assert audio.features.ndim == 1 and audio.output.ndim == 1
    assert abs(audio.duration_s - seconds) <= FRAME_S
    assert abs(len(audio.features) / 16_000 - seconds) <= FRAME_S
    assert abs(len(audio.output) - 3 * len(audio.features)) <= 3
    assert np.abs(audio.features).max() <= 1.0 and np.abs(audio.output).max() <= 1.0
    middle = slice(len(audio.output) // 4, 3 * len(audio.output) // 4)
    assert abs(dominant_hz(audio.output[middle], 48_000) - 440) < 5
    assert abs(dominant_hz(audio.features[middle.start // 3 : middle.stop // 3], 16_000) - 440) < 5
    assert np.abs(audio.output[middle]).max() == pytest.approx(amplitude, abs=0.05)


@pytest.mark.parametrize(
    ("fmt", "rate", "channels"),
    [
        ("wav", 16_000, 1),
        ("wav", 44_100, 2),
        ("wav", 11_025, 1),
        ("wav", 48_000, 1),
        ("mp3", 44_100, 1),
        ("mp3", 22_050, 2),
        ("ogg", 48_000, 1),
        ("ogg", 24_000, 2),
        ("flac", 44_100, 1),
        ("flac", 32_000, 2),
    ],
)
def test_formats_decode_to_duration_and_rates(fmt: str, rate: int, channels: int) -> None:
    seconds = 1.3
    data = encode(fmt, np.tile(tone(seconds, rate), (channels, 1)), rate)
    audio = decode_audio(data, fmt, max_seconds=10)
    check_decoded(audio, seconds)


@pytest.mark.parametrize(("rate", "channels"), [(16_000, 1), (44_100, 2), (8_000, 1), (22_050, 6)])
def test_pcm_decodes_to_exact_length(rate: int, channels: int) -> None:
    seconds = 1.0
    data = pcm_bytes(np.tile(tone(seconds, rate), (channels, 1)))
    audio = decode_audio(data, "pcm_s16le", sample_rate=rate, channels=channels, max_seconds=5)
    check_decoded(audio, seconds)
    assert len(audio.features) == 16_000 and len(audio.output) == 48_000
    assert audio.duration_s == seconds


def test_pcm_defaults_to_16k_mono() -> None:
    audio = decode_audio(pcm_bytes(tone(0.5, 16_000)[None, :]), "pcm_s16le", max_seconds=5)
    assert len(audio.features) == 8_000 and audio.duration_s == 0.5


def test_stereo_is_averaged_to_mono() -> None:
    left = tone(1.0, 16_000)
    data = pcm_bytes(np.stack([left, np.zeros_like(left)]))
    audio = decode_audio(data, "pcm_s16le", sample_rate=16_000, channels=2, max_seconds=5)
    assert np.abs(audio.features).max() == pytest.approx(0.25, abs=0.01)
    opposite = pcm_bytes(np.stack([left, -left]))
    silent = decode_audio(opposite, "pcm_s16le", sample_rate=16_000, channels=2, max_seconds=5)
    assert np.abs(silent.output).max() < 1e-3


@pytest.mark.parametrize(
    ("actual", "declared"),
    [
        ("flac", "wav"),
        ("wav", "mp3"),
        ("mp3", "ogg"),
        ("ogg", "flac"),
        ("wav", "flac"),
        ("mp3", "wav"),
    ],
)
def test_mislabelled_format_is_bad_audio(actual: str, declared: str) -> None:
    rate = 48_000
    data = encode(actual, tone(1.0, rate)[None, :], rate)
    with pytest.raises(AudioError) as info:
        decode_audio(data, declared, max_seconds=10)
    assert info.value.code == "bad_audio"
    assert declared in info.value.message


@pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg", "flac"])
def test_garbage_is_bad_audio(fmt: str) -> None:
    data = np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    with pytest.raises(AudioError) as info:
        decode_audio(data, fmt, max_seconds=10)
    assert info.value.code == "bad_audio"


@pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg", "flac", "pcm_s16le"])
def test_empty_is_bad_audio(fmt: str) -> None:
    with pytest.raises(AudioError) as info:
        decode_audio(b"", fmt, max_seconds=10)
    assert info.value.code == "bad_audio"


@pytest.mark.parametrize(
    ("fmt", "keep"),
    [
        ("wav", 0.5),
        ("wav", 0.02),
        ("mp3", 0.5),
        ("ogg", 0.5),
        ("ogg", 0.97),
        ("ogg", 0.01),
        ("flac", 0.6),
    ],
)
def test_truncated_is_bad_audio(fmt: str, keep: float) -> None:
    rate = 48_000
    data = encode(fmt, tone(2.0, rate)[None, :], rate)
    assert isinstance(decode_audio(data, fmt, max_seconds=10), DecodedAudio)
    with pytest.raises(AudioError) as info:
        decode_audio(data[: int(len(data) * keep)], fmt, max_seconds=10)
    assert info.value.code == "bad_audio"


@pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg", "flac"])
def test_video_without_audio_is_bad_audio(fmt: str) -> None:
    with pytest.raises(AudioError) as info:
        decode_audio(video_only("mp4", "mpeg4"), fmt, max_seconds=10)
    assert info.value.code == "bad_audio"


def test_ogg_holding_only_video_is_bad_audio() -> None:
    with pytest.raises(AudioError) as info:
        decode_audio(video_only("ogg", "libvpx"), "ogg", max_seconds=10)
    assert info.value.code == "bad_audio"
    assert "no audio stream" in info.value.message


def test_unknown_format_is_bad_audio() -> None:
    with pytest.raises(AudioError) as info:
        decode_audio(b"abc", "aiff", max_seconds=10)
    assert info.value.code == "bad_audio"


@pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg", "flac"])
def test_too_long_is_refused(fmt: str) -> None:
    rate = 48_000
    data = encode(fmt, tone(3.0, rate)[None, :], rate)
    with pytest.raises(AudioError) as info:
        decode_audio(data, fmt, max_seconds=2.0)
    assert info.value.code == "audio_too_long"
    assert decode_audio(data, fmt, max_seconds=3.5).duration_s == pytest.approx(3.0, abs=FRAME_S)


def test_long_wav_is_refused_at_the_limit() -> None:
    rate = 8_000
    data = encode("wav", np.zeros((1, rate * 600), np.float32), rate)
    with pytest.raises(AudioError) as info:
        decode_audio(data, "wav", max_seconds=1.0)
    assert info.value.code == "audio_too_long"


def test_pcm_too_long_and_bad_parameters() -> None:
    data = pcm_bytes(tone(3.0, 16_000)[None, :])
    with pytest.raises(AudioError) as info:
        decode_audio(data, "pcm_s16le", sample_rate=16_000, channels=1, max_seconds=2)
    assert info.value.code == "audio_too_long"
    for kwargs in ({"sample_rate": 100, "channels": 1}, {"sample_rate": 16_000, "channels": 40}):
        with pytest.raises(AudioError) as info:
            decode_audio(data, "pcm_s16le", max_seconds=5, **kwargs)
        assert info.value.code == "bad_audio"
    with pytest.raises(AudioError) as info:
        decode_audio(data[:-1], "pcm_s16le", max_seconds=5)
    assert info.value.code == "bad_audio"


@pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg", "flac"])
def test_corrupted_bytes_never_leak_ffmpeg_errors(fmt: str) -> None:
    rate = 44_100 if fmt == "mp3" else 48_000
    clean = encode(fmt, tone(1.0, rate)[None, :], rate)
    rng = np.random.default_rng(7)
    for _ in range(20):
        data = bytearray(clean)
        for position in rng.integers(0, len(data), 30):
            data[position] = int(rng.integers(0, 256))
        try:
            decode_audio(bytes(data), fmt, max_seconds=10)
        except AudioError as exc:
            assert exc.code == "bad_audio"


def split_randomly(data: bytes, rng: np.random.Generator) -> list[bytes]:
    cuts = sorted({int(c) for c in rng.integers(0, len(data), 25)})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=False)]


@pytest.mark.parametrize(
    ("rate", "channels", "seed"), [(16_000, 1, 0), (44_100, 2, 1), (48_000, 1, 2), (22_050, 3, 3)]
)
def test_stream_decoder_matches_one_shot(rate: int, channels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    syllables = 0.5 + 0.5 * np.sin(np.arange(int(1.5 * rate)) / rate * 2 * np.pi * 3)
    speechlike = tone(1.5, rate) * syllables
    noise = rng.normal(0, 0.05, (channels, len(speechlike))).astype(np.float32)
    data = pcm_bytes(speechlike[None, :] + noise)
    whole = decode_audio(data, "pcm_s16le", sample_rate=rate, channels=channels, max_seconds=10)

    decoder = PcmStreamDecoder(rate, channels)
    parts = [decoder.push(chunk) for chunk in split_randomly(data, rng)]
    parts.append(decoder.flush())
    low = np.concatenate([p[0] for p in parts])
    high = np.concatenate([p[1] for p in parts])
    assert len(low) == len(whole.features) and len(high) == len(whole.output)
    np.testing.assert_allclose(low, whole.features, atol=1e-5)
    np.testing.assert_allclose(high, whole.output, atol=1e-5)
    assert decoder.seconds == pytest.approx(whole.duration_s)


def test_stream_decoder_holds_partial_samples() -> None:
    decoder = PcmStreamDecoder(16_000, 2)
    low, high = decoder.push(b"\x01\x02\x03")
    assert len(low) == 0 and len(high) == 0
    assert decoder.pending_bytes == 3 and decoder.seconds == 0
    decoder.push(b"\x04")
    assert decoder.pending_bytes == 0 and decoder.seconds == pytest.approx(1 / 16_000)


def test_stream_decoder_is_reusable_after_flush() -> None:
    data = pcm_bytes(tone(0.4, 16_000)[None, :])
    decoder = PcmStreamDecoder()
    for _ in range(2):
        low = np.concatenate([decoder.push(data)[0], decoder.flush()[0]])
        assert len(low) == len(tone(0.4, 16_000))
        assert dominant_hz(low, 16_000) == pytest.approx(440, abs=5)
    assert decoder.seconds == pytest.approx(0.8)


def test_stream_decoder_rejects_bad_parameters() -> None:
    with pytest.raises(AudioError) as info:
        PcmStreamDecoder(sample_rate=0)
    assert info.value.code == "bad_audio"
