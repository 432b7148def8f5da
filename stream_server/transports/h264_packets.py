"""H.264 for WebRTC, encoded where the frames are rendered: one Annex-B access unit per frame.

aiortc sends pre-encoded video as it is (its ``H264Encoder.pack`` splits an ``av.Packet`` into
RTP payloads), so in process mode the worker encodes and the server process only packetizes.
The stream is what aiortc's own encoder makes and every browser decodes: constrained baseline
(no B-frames), ``zerolatency`` (a packet out for every frame in), SPS and PPS repeated before
each IDR, a fixed bitrate and a keyframe at least every ``keyframe_interval_frames``.

The bitrate is fixed: the receiver's estimate (REMB) reaches aiortc's encoder, not this one.
Keyframes: the first frame, the interval, and every ``encode(..., keyframe=True)`` (the server
asks after a picture loss indication from the peer, or after it had to drop packets)."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np


class H264PacketEncoder:
    """Encodes ``(height, width, 3)`` uint8 RGB images of one stream. An odd width or height is
    cropped by one pixel column/row (right/bottom), as the fMP4 muxer does. One thread at a time."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: int,
        *,
        bitrate: int,
        keyframe_interval_frames: int,
        preset: str = "superfast",
        threads: int = 1,
    ) -> None:
        if width < 2 or height < 2:
            raise ValueError(f"frame size {width}x{height} is too small")
        if keyframe_interval_frames < 1:
            raise ValueError("the keyframe interval must be at least one frame")
        self.source_width, self.source_height = width, height
        self.width, self.height = width - width % 2, height - height % 2
        codec = av.CodecContext.create("libx264", "w")
        assert isinstance(codec, av.VideoCodecContext)
        codec.width, codec.height = self.width, self.height
        codec.pix_fmt = "yuv420p"
        codec.framerate = Fraction(fps, 1)
        codec.time_base = Fraction(1, fps)
        codec.bit_rate = bitrate
        codec.thread_count = threads
        codec.options = {
            "preset": preset,
            "tune": "zerolatency",
            "profile": "baseline",
            "g": str(keyframe_interval_frames),
            "forced-idr": "1",
            "maxrate": str(bitrate),
            "bufsize": str(bitrate),
        }
        codec.open()
        self._codec = codec
        self._pts = 0

    def encode(self, image: np.ndarray, *, keyframe: bool = False) -> tuple[bytes, bool]:
        """The frame's access unit (Annex B) and whether it is an IDR frame."""
        if image.shape != (self.source_height, self.source_width, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"expected a {self.source_height}x{self.source_width}x3 uint8 image, got {image.shape} {image.dtype}"
            )
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[: self.height, : self.width]), format="rgb24")
        picture.pts = self._pts
        picture.time_base = self._codec.time_base
        picture.pict_type = av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        self._pts += 1
        packets = self._codec.encode(picture)
        if len(packets) != 1:  # (zerolatency: no look-ahead, no B-frames)
            raise RuntimeError(f"x264 returned {len(packets)} packets for one frame")
        return bytes(packets[0]), bool(packets[0].is_keyframe)
