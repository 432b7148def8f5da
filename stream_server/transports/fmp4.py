"""Fragmented MP4 for Media Source Extensions: H.264 + AAC-LC in self-contained segments.

Layout of the byte stream (FFmpeg's mp4 muxer with
``movflags=frag_keyframe+empty_moov+default_base_moof+delay_moov+skip_trailer``):

* the init segment is ``ftyp`` + ``moov``; it carries an edit list that hides the AAC encoder's
  priming samples, so audio and video both start at the stream clock's zero;
* every media segment is exactly one ``moof`` + ``mdat`` (no ``styp``/``sidx``/``mfra``) and starts
  with an IDR frame, so it can be appended on its own after the init segment.

Time is one clock whose origin is the first frame encoded (index ``i0``, normally 0): frame ``i``
is at ``(i - i0) / fps`` seconds on both tracks, its audio starting at sample
``(i - i0) * sample_rate / fps``, so the MSE timeline always starts at 0. Segments are cut on a
fixed grid: a keyframe starts each run of ``frames_per_segment`` indexes from the origin, so a
segment holds at most ``frames_per_segment / fps <= segment_seconds`` of video (audio may reach
one AAC frame, 21 ms, past it). A gap in frame indexes is filled with silence on the audio track
and holds the last picture on the video track (so that segment lasts longer), keeping both tracks
on the clock and the browser's buffered ranges continuous.

Latency: FFmpeg cuts a fragment when the next segment's keyframe arrives, so a segment is
returned by the ``encode`` call that passes the first frame (plus the AAC look-ahead, about one
more frame) of the following segment; ``close`` returns the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

from inference.engine import Frame

_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+delay_moov+skip_trailer"
_SILENCE_CHUNK_S = 1.0
# BT.601 (SMPTE 170M), limited range: what swscale's default RGB->YUV conversion produces.
_BT601 = 6
_LIMITED_RANGE = 1


class _Sink:
    """A write-only, non-seekable file object that collects the muxer's bytes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)


def split_boxes(data: bytes | bytearray) -> tuple[list[tuple[bytes, bytes]], int]:
    """Split complete top-level MP4 boxes off ``data``.

    Returns ``[(type, box_bytes), ...]`` and the number of bytes consumed; a trailing partial
    box is left for the caller to complete.
    """
    boxes: list[tuple[bytes, bytes]] = []
    offset = 0
    while len(data) - offset >= 8:
        size = int.from_bytes(data[offset : offset + 4], "big")
        kind = bytes(data[offset + 4 : offset + 8])
        if size == 1:
            if len(data) - offset < 16:
                break
            size = int.from_bytes(data[offset + 8 : offset + 16], "big")
        if size < 8:
            raise ValueError(f"malformed MP4 box {kind!r} of size {size}")
        if len(data) - offset < size:
            break
        boxes.append((kind, bytes(data[offset : offset + size])))
        offset += size
    return boxes, offset


def avc1_codec_string(extradata: bytes) -> str:
    """``avc1.PPCCLL`` from the SPS in H.264 extradata, either avcC or Annex-B."""
    if extradata[:1] == b"\x01":
        sps = extradata[1:4]
    else:
        sps = b""
        for nal in extradata.replace(b"\x00\x00\x00\x01", b"\x00\x00\x01").split(b"\x00\x00\x01"):
            if nal and nal[0] & 0x1F == 7:
                sps = nal[1:4]
                break
    if len(sps) < 3:
        raise ValueError("no H.264 SPS in the encoder's extradata")
    return "avc1." + sps.hex().upper()


def mp4a_codec_string(extradata: bytes) -> str:
    """``mp4a.40.N`` with N the audio object type of the AudioSpecificConfig (2 = AAC-LC)."""
    if not extradata:
        raise ValueError("no AudioSpecificConfig in the AAC encoder's extradata")
    return f"mp4a.40.{extradata[0] >> 3}"


class FragmentedMp4Muxer:
    """Encodes ``Frame``s to an fMP4 byte stream for MSE, split into init and media segments.

    Usage: send ``mime`` (known from construction), then after each ``encode``/``close`` call
    send ``init_segment`` once it is not ``None`` (it is set no later than the call that returns
    the first media segment), then the returned media segments in order.

    Images must be ``(height, width, 3)`` uint8 RGB as given at construction. H.264 4:2:0 needs
    even dimensions: an odd width or height is cropped by one pixel column/row (right/bottom);
    ``width`` and ``height`` report the encoded size. One instance belongs to one stream and may
    be driven from any single thread; instances share no state.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: int = 25,
        sample_rate: int = 48_000,
        *,
        segment_seconds: float = 0.5,
        crf: int = 23,
        max_bitrate: int | None = None,
        audio_bitrate: int = 64_000,
        profile: str = "main",
        preset: str = "veryfast",
        threads: int = 0,
    ) -> None:
        if width < 2 or height < 2:
            raise ValueError(f"frame size {width}x{height} is too small")
        if sample_rate % fps:
            raise ValueError(f"{sample_rate} Hz is not a whole number of samples per frame")
        self.frames_per_segment = int(segment_seconds * fps + 1e-9)
        if self.frames_per_segment < 1:
            raise ValueError(f"segment_seconds {segment_seconds} is shorter than one frame")
        self.source_width = width
        self.source_height = height
        self.width = width - width % 2
        self.height = height - height % 2
        self.fps = fps
        self.sample_rate = sample_rate
        self.samples_per_frame = sample_rate // fps

        self._sink = _Sink()
        self._container = av.open(
            self._sink,
            mode="w",
            format="mp4",
            container_options={"movflags": _MOVFLAGS, "flush_packets": "1"},
        )
        self._video = self._container.add_stream("libx264", rate=fps)
        video = self._video.codec_context
        video.width = self.width
        video.height = self.height
        video.pix_fmt = "yuv420p"
        video.time_base = Fraction(1, fps)
        video.thread_count = threads
        video.colorspace = video.color_primaries = video.color_trc = _BT601
        video.color_range = _LIMITED_RANGE
        x264 = {
            "preset": preset,
            "tune": "zerolatency",
            "profile": profile,
            "g": str(self.frames_per_segment),
            "sc_threshold": "0",
            "forced-idr": "1",
            "crf": str(crf),
        }
        if max_bitrate:
            x264["maxrate"] = str(max_bitrate)
            x264["bufsize"] = str(max_bitrate)
        video.options = x264
        self._audio = self._container.add_stream("aac", rate=sample_rate)
        audio = self._audio.codec_context
        audio.layout = "mono"
        audio.time_base = Fraction(1, sample_rate)
        audio.bit_rate = audio_bitrate
        audio.profile = "LC"
        # Opened now, so their extradata (SPS, AudioSpecificConfig) and ``mime`` exist before
        # the first frame.
        video.open()
        audio.open()
        self._mime = (
            f'video/mp4; codecs="{avc1_codec_string(bytes(video.extradata or b""))}, '
            f'{mp4a_codec_string(bytes(audio.extradata or b""))}"'
        )

        self._init: bytes | None = None
        self._pending: list[bytes] = []
        self._origin: int | None = None
        self._next_tick = 0
        self._closed = False

    @property
    def mime(self) -> str:
        """A full ``MediaSource.isTypeSupported`` string naming the encoders' real codecs."""
        return self._mime

    @property
    def init_segment(self) -> bytes | None:
        """``ftyp`` + ``moov``; ``None`` until the first media segment is cut."""
        return self._init

    def encode(self, frames: Sequence[Frame]) -> list[bytes]:
        """Encode frames (strictly increasing indexes); return the media segments completed."""
        if self._closed:
            raise RuntimeError("the muxer is closed")
        for frame in frames:
            self._encode_frame(frame)
        return self._take_segments()

    def close(self) -> list[bytes]:
        """Flush the encoders and the muxer; return the remaining media segments."""
        if self._closed:
            return []
        self._closed = True
        if self._origin is not None:
            self._container.mux(self._video.encode(None))
            self._container.mux(self._audio.encode(None))
        self._container.close()
        return self._take_segments()

    def _encode_frame(self, frame: Frame) -> None:
        image = frame.image
        if image.shape != (self.source_height, self.source_width, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"frame {frame.index}: expected a {self.source_height}x{self.source_width}x3 uint8 "
                f"image, got {image.shape} {image.dtype}"
            )
        if frame.audio.shape != (self.samples_per_frame,):
            raise ValueError(
                f"frame {frame.index}: expected {self.samples_per_frame} audio samples, "
                f"got {frame.audio.shape}"
            )
        if self._origin is None:
            self._origin = frame.index
        tick = frame.index - self._origin
        if tick < self._next_tick:
            raise ValueError(f"frame index {frame.index} does not follow the previous frame")
        self._encode_silence(self._next_tick, tick - self._next_tick)

        image = np.ascontiguousarray(image[: self.height, : self.width])
        picture = av.VideoFrame.from_ndarray(image, format="rgb24")
        picture.pts = tick
        picture.time_base = self._video.codec_context.time_base
        if (
            tick == 0
            or tick // self.frames_per_segment != (self._next_tick - 1) // self.frames_per_segment
        ):
            picture.pict_type = av.video.frame.PictureType.I
        self._container.mux(self._video.encode(picture))
        self._encode_audio(np.ascontiguousarray(frame.audio, dtype=np.float32), tick)
        self._next_tick = tick + 1

    def _encode_silence(self, first_tick: int, count: int) -> None:
        """Audio for frame indexes that were skipped, so the audio track has no holes."""
        chunk_frames = max(1, int(_SILENCE_CHUNK_S * self.fps))
        for start in range(first_tick, first_tick + count, chunk_frames):
            n = min(chunk_frames, first_tick + count - start)
            self._encode_audio(np.zeros(n * self.samples_per_frame, dtype=np.float32), start)

    def _encode_audio(self, samples: np.ndarray, tick: int) -> None:
        sound = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        sound.sample_rate = self.sample_rate
        sound.pts = tick * self.samples_per_frame
        sound.time_base = self._audio.codec_context.time_base
        self._container.mux(self._audio.encode(sound))

    def _take_segments(self) -> list[bytes]:
        """Move complete boxes out of the sink: ftyp+moov to the init, moof+mdat to segments."""
        boxes, used = split_boxes(self._sink.data)
        del self._sink.data[:used]
        segments: list[bytes] = []
        for kind, box in boxes:
            self._pending.append(box)
            if self._init is None and kind == b"moov":
                self._init = b"".join(self._pending)
                self._pending.clear()
            elif self._init is not None and kind == b"mdat":
                segments.append(b"".join(self._pending))
                self._pending.clear()
        return segments
