"""Audio input: uploaded files and live PCM chunks to float32 mono at the feature and output rates.

Everything here is blocking CPU work for a worker thread. One decode pass feeds two stateful
resamplers, one to ``FEATURE_SAMPLE_RATE`` (model input) and one to ``OUTPUT_SAMPLE_RATE`` (what
the client hears), so both describe exactly the same interval.

Validation: the container must be the declared one (FFmpeg's probe decides, so FLAC bytes declared
as "wav" are refused), hold an audio stream, decode without errors and not be shorter than its
own header says (WAV data chunk size, FLAC STREAMINFO, MP3 Xing/Info/VBRI, Ogg granule
positions). A truncated MP3 without such a header cannot be told from a short one and is
accepted. Raw ``pcm_s16le`` carries no header, so only its length can be checked.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from inference.engine import FEATURE_SAMPLE_RATE, OUTPUT_SAMPLE_RATE

FORMATS = ("wav", "mp3", "ogg", "flac", "pcm_s16le")
PCM_DEFAULT_SAMPLE_RATE = 16_000
PCM_DEFAULT_CHANNELS = 1
_PCM_RATES = (8_000, 192_000)
_PCM_MAX_CHANNELS = 8
_TRUNCATION_SLACK_S = 0.1
_TRUNCATION_SLACK_RATIO = 0.01
_EMPTY = np.zeros(0, dtype=np.float32)
# Downmix gains sum to 1 (stereo: (L + R) / 2), so correlated channels cannot clip.
_DOWNMIX = {"rematrix_maxval": "1.0"}


class AudioError(Exception):
    """Audio the server cannot use; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _bad(message: str) -> AudioError:
    return AudioError("bad_audio", message)


def _too_long(max_seconds: float) -> AudioError:
    return AudioError("audio_too_long", f"the audio is longer than the {max_seconds:g} s allowed")


@dataclass
class DecodedAudio:
    features: np.ndarray
    """float32 mono at ``FEATURE_SAMPLE_RATE``, in [-1, 1]."""
    output: np.ndarray
    """float32 mono at ``OUTPUT_SAMPLE_RATE``, in [-1, 1]; ``3 * len(features)`` samples (±1)."""
    duration_s: float


class _TwoRates:
    """Stateful resampling of one input to mono float32 at both rates.

    ``flush`` trims or pads the totals to the input length scaled to each rate, so both outputs
    cover exactly the input's interval however it was chunked.
    """

    _RATES = (FEATURE_SAMPLE_RATE, OUTPUT_SAMPLE_RATE)

    def __init__(self) -> None:
        self._resamplers = [
            av.AudioResampler(format="flt", layout="mono", rate=rate, options=_DOWNMIX)
            for rate in self._RATES
        ]
        self._emitted = [0, 0]
        self.input_samples = 0
        self.input_rate = 0

    @property
    def seconds(self) -> float:
        return self.input_samples / self.input_rate if self.input_rate else 0.0

    def push(self, frame: av.AudioFrame) -> tuple[np.ndarray, np.ndarray]:
        self.input_rate = frame.sample_rate
        self.input_samples += frame.samples
        return self._resample(0, frame), self._resample(1, frame)

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        """The tails; the resamplers cannot be used afterwards."""
        tails = []
        for slot, rate in enumerate(self._RATES):
            tail = self._resample(slot, None) if self.input_samples else _EMPTY
            expected = round(self.input_samples * rate / self.input_rate) if self.input_rate else 0
            keep = max(0, expected - (self._emitted[slot] - len(tail)))
            if keep > len(tail):
                tail = np.concatenate([tail, np.zeros(keep - len(tail), dtype=np.float32)])
            self._emitted[slot] += keep - len(tail)
            tails.append(tail[:keep])
        return tails[0], tails[1]

    def _resample(self, slot: int, frame: av.AudioFrame | None) -> np.ndarray:
        chunks = [f.to_ndarray().reshape(-1) for f in self._resamplers[slot].resample(frame)]
        samples = np.concatenate(chunks) if chunks else _EMPTY
        self._emitted[slot] += len(samples)
        return np.clip(samples, -1.0, 1.0)


class PcmStreamDecoder:
    """Live mode: raw ``pcm_s16le`` chunks of any byte length to (16 kHz, 48 kHz) float32 mono.

    A partial sample frame at the end of a chunk waits for the next one; channels are averaged;
    resampling state carries across chunks, so chunk boundaries leave no trace. ``flush`` ends an
    utterance (returns the resamplers' tails and starts afresh); ``seconds`` counts all audio
    received since construction, for the caller's limits.
    """

    def __init__(
        self,
        sample_rate: int = PCM_DEFAULT_SAMPLE_RATE,
        channels: int = PCM_DEFAULT_CHANNELS,
    ) -> None:
        low, high = _PCM_RATES
        if not low <= sample_rate <= high:
            raise _bad(f"pcm_s16le sample_rate {sample_rate} is outside {low}..{high}")
        if not 1 <= channels <= _PCM_MAX_CHANNELS:
            raise _bad(f"pcm_s16le channels {channels} is outside 1..{_PCM_MAX_CHANNELS}")
        self.sample_rate = sample_rate
        self.channels = channels
        self.frame_bytes = 2 * channels
        self._carry = b""
        self._samples = 0
        self._rates = _TwoRates()

    @property
    def seconds(self) -> float:
        """Seconds of complete samples received since construction."""
        return self._samples / self.sample_rate

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete sample frame held for the next chunk."""
        return len(self._carry)

    def push(self, chunk: bytes) -> tuple[np.ndarray, np.ndarray]:
        data = self._carry + chunk
        whole = len(data) - len(data) % self.frame_bytes
        self._carry = data[whole:]
        if not whole:
            return _EMPTY.copy(), _EMPTY.copy()
        pcm = np.frombuffer(data, dtype="<i2", count=whole // 2).reshape(-1, self.channels)
        mono = pcm.mean(axis=1, dtype=np.float32) / np.float32(32768)
        frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._rates.input_samples
        frame.time_base = Fraction(1, self.sample_rate)
        self._samples += len(mono)
        return self._rates.push(frame)

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        """End of an utterance: the resamplers' tails; a partial sample frame held is dropped."""
        self._carry = b""
        tails = self._rates.flush()
        self._rates = _TwoRates()
        return tails


def decode_audio(
    data: bytes,
    fmt: str,
    *,
    sample_rate: int | None = None,
    channels: int | None = None,
    max_seconds: float,
) -> DecodedAudio:
    """Decode a whole upload. ``sample_rate``/``channels`` apply to ``pcm_s16le`` only and default
    to 16000 Hz mono. Raises ``AudioError`` ("bad_audio" or "audio_too_long"), nothing else."""
    if fmt not in FORMATS:
        raise _bad(f"unsupported audio format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not data:
        raise _bad("the audio is empty")
    if fmt == "pcm_s16le":
        return _decode_pcm(
            data,
            sample_rate or PCM_DEFAULT_SAMPLE_RATE,
            channels or PCM_DEFAULT_CHANNELS,
            max_seconds,
        )
    if fmt == "wav":
        _check_wav_length(data)
    elif fmt == "ogg":
        _check_ogg_pages(data)
    try:
        return _decode_container(data, fmt, max_seconds)
    except (av.FFmpegError, ValueError, EOFError, OSError) as exc:
        raise _bad(f"the {fmt} audio could not be decoded: {exc}") from exc


def _decode_pcm(data: bytes, sample_rate: int, channels: int, max_seconds: float) -> DecodedAudio:
    decoder = PcmStreamDecoder(sample_rate, channels)
    if len(data) % decoder.frame_bytes:
        raise _bad(
            f"pcm_s16le length {len(data)} is not a whole number of {channels}-channel samples"
        )
    if len(data) // decoder.frame_bytes > max_seconds * sample_rate:
        raise _too_long(max_seconds)
    (low, high), (low_tail, high_tail) = decoder.push(data), decoder.flush()
    return DecodedAudio(
        np.concatenate([low, low_tail]), np.concatenate([high, high_tail]), decoder.seconds
    )


def _decode_container(data: bytes, fmt: str, max_seconds: float) -> DecodedAudio:
    with av.open(io.BytesIO(data), mode="r", metadata_errors="replace") as container:
        if fmt not in container.format.name.split(","):
            raise _bad(f"declared {fmt} but the data is {container.format.long_name}")
        if not container.streams.audio:
            raise _bad(f"the {fmt} data has no audio stream")
        stream = container.streams.audio[0]
        declared = _declared_seconds(data, fmt, stream)
        rates = _TwoRates()
        parts = []
        for packet in container.demux(stream):
            for frame in packet.decode():
                parts.append(rates.push(frame))
                if rates.seconds > max_seconds:
                    raise _too_long(max_seconds)
        parts.append(rates.flush())
    if not rates.input_samples:
        raise _bad(f"the {fmt} data holds no audio samples")
    slack = declared * _TRUNCATION_SLACK_RATIO + _TRUNCATION_SLACK_S if declared else 0.0
    if declared is not None and rates.seconds < declared - slack:
        raise _bad(
            f"the {fmt} audio is truncated: {rates.seconds:.2f} s of the {declared:.2f} s "
            "its header declares"
        )
    features = np.concatenate([p[0] for p in parts])
    output = np.concatenate([p[1] for p in parts])
    return DecodedAudio(features, output, rates.seconds)


def _declared_seconds(data: bytes, fmt: str, stream: av.audio.stream.AudioStream) -> float | None:
    """The duration the file's own header states, where that is exact rather than estimated."""
    if fmt == "flac" and data[:4] == b"fLaC" and len(data) >= 26:
        info = int.from_bytes(data[18:26], "big")
        rate, total = info >> 44, info & ((1 << 36) - 1)
        return total / rate if rate and total else None
    exact = fmt == "ogg" or (fmt == "mp3" and _has_mp3_length_tag(data))
    if exact and stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def _has_mp3_length_tag(data: bytes) -> bool:
    """A Xing/Info/VBRI tag in the first MP3 frame (after any ID3v2 tag) counts the frames."""
    start = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        size = 0
        for byte in data[6:10]:
            size = (size << 7) | (byte & 0x7F)
        start = 10 + size + (10 if data[5] & 0x10 else 0)
    head = data[start : start + 200]
    return any(tag in head for tag in (b"Xing", b"Info", b"VBRI"))


def _check_wav_length(data: bytes) -> None:
    """FFmpeg quietly clamps a RIFF data chunk to the bytes present; a short one is truncated."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    offset = 12
    while offset + 8 <= len(data):
        kind = data[offset : offset + 4]
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        if kind == b"data":
            present = len(data) - offset - 8
            if size not in (0, 0xFFFFFFFF) and present < size:
                raise _bad(
                    f"the wav audio is truncated: {present} of the {size} data bytes it declares"
                )
            return
        offset += 8 + size + (size & 1)


def _check_ogg_pages(data: bytes) -> None:
    """FFmpeg drops an incomplete last Ogg page without complaint; a cut page is truncation."""
    offset = 0
    while offset < len(data) and data[offset : offset + 4] == b"OggS":
        segments = data[offset + 26] if offset + 27 <= len(data) else None
        table_end = offset + 27 + (segments or 0)
        if segments is None or table_end > len(data):
            raise _bad("the ogg audio is truncated inside a page header")
        offset = table_end + sum(data[offset + 27 : table_end])
        if offset > len(data):
            raise _bad("the ogg audio is truncated inside its last page")
