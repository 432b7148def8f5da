from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import av
import numpy as np
import pytest

from inference.engine import FPS, OUTPUT_SAMPLES_PER_FRAME, Frame
from stream_server.transports.fmp4 import FragmentedMp4Muxer, split_boxes

WIDTH, HEIGHT = 96, 64
CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex", b"edts", b"moof", b"traf"}


def synthetic_frame(index: int, width: int = WIDTH, height: int = HEIGHT) -> Frame:
    """A gradient that moves one pixel per frame and a 440 Hz tone on the stream clock."""
    x = (np.arange(width)[None, :] + index) % width
    y = np.arange(height)[:, None]
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = x * 255 // (width - 1)
    image[..., 1] = y * 255 // (height - 1)
    image[..., 2] = 128
    t = (index * OUTPUT_SAMPLES_PER_FRAME + np.arange(OUTPUT_SAMPLES_PER_FRAME)) / 48_000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return Frame(index=index, image=image, audio=audio)


def sixty_frames() -> list[Frame]:
    return [synthetic_frame(i) for i in range(60)]


def run_muxer(
    muxer: FragmentedMp4Muxer, frames: Sequence[Frame], batch: int = 7
) -> tuple[bytes, list[bytes]]:
    segments: list[bytes] = []
    for start in range(0, len(frames), batch):
        segments += muxer.encode(frames[start : start + batch])
    segments += muxer.close()
    assert muxer.init_segment is not None
    return muxer.init_segment, segments


def boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the boxes in data[start:end]."""
    end = len(data) if end is None else end
    while start < end:
        size, kind = struct.unpack(">I4s", data[start : start + 8])
        yield kind, start + 8, start + size
        start += size


def find(data: bytes, path: Sequence[bytes], start: int = 0, end: int | None = None) -> list:
    """Payload ranges of all boxes at ``path``, descending through container boxes."""
    found = []
    for kind, body, stop in boxes(data, start, end):
        if kind == path[0]:
            found += [(body, stop)] if len(path) == 1 else find(data, path[1:], body, stop)
    return found


def u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def full_box_fields(data: bytes, body: int, fields: dict[int, int], flags: int) -> dict[int, int]:
    """Read the optional 32-bit fields of a full box (``{flag: width in words}``), in order."""
    values, cursor = {}, body
    for flag, words in fields.items():
        if flags & flag:
            values[flag] = int.from_bytes(data[cursor : cursor + 4 * words], "big")
            cursor += 4 * words
    return values


@dataclass
class TrackRun:
    track_id: int
    decode_time: int
    durations: list[int]
    first_is_sync: bool


def track_runs(init: bytes, segment: bytes) -> list[TrackRun]:
    """Per-track start time, sample durations and first-sample sync flag of one moof."""
    trex = {}
    for body, _ in find(init, [b"moov", b"mvex", b"trex"]):
        trex[u32(init, body + 4)] = (u32(init, body + 12), u32(init, body + 20))
    runs = []
    for traf, stop in find(segment, [b"moof", b"traf"]):
        tfhd, tfdt, trun = (
            find(segment, [name], traf, stop)[0][0] for name in (b"tfhd", b"tfdt", b"trun")
        )
        track_id = u32(segment, tfhd + 4)
        duration, sample_flags = trex[track_id]
        tfhd_fields = {0x1: 2, 0x2: 1, 0x8: 1, 0x10: 1, 0x20: 1}
        header = full_box_fields(segment, tfhd + 8, tfhd_fields, u32(segment, tfhd) & 0xFFFFFF)
        duration = header.get(0x8, duration)
        sample_flags = header.get(0x20, sample_flags)
        wide = segment[tfdt] == 1
        decode_time = int.from_bytes(segment[tfdt + 4 : tfdt + (12 if wide else 8)], "big")
        run_flags = u32(segment, trun) & 0xFFFFFF
        count = u32(segment, trun + 4)
        run_header = full_box_fields(segment, trun + 8, {0x1: 1, 0x4: 1}, run_flags)
        per_sample = [bit for bit in (0x100, 0x200, 0x400, 0x800) if run_flags & bit]
        cursor = trun + 8 + 4 * len(run_header)
        samples = []
        for _ in range(count):
            values = struct.unpack_from(f">{len(per_sample)}I", segment, cursor)
            samples.append(dict(zip(per_sample, values, strict=False)))
            cursor += 4 * len(per_sample)
        first_flags = run_header.get(0x4, samples[0].get(0x400, sample_flags))
        durations = [sample.get(0x100, duration) for sample in samples]
        runs.append(TrackRun(track_id, decode_time, durations, not first_flags & 0x10000))
    return runs


def track_info(init: bytes) -> dict[int, tuple[bytes, int, int]]:
    """track id -> (handler type, timescale, edit list media time)."""
    info = {}
    for trak, stop in find(init, [b"moov", b"trak"]):
        tkhd = find(init, [b"tkhd"], trak, stop)[0][0]
        track_id = u32(init, tkhd + (12 if init[tkhd] == 0 else 20))
        mdhd = find(init, [b"mdia", b"mdhd"], trak, stop)[0][0]
        timescale = u32(init, mdhd + (12 if init[mdhd] == 0 else 20))
        handler = find(init, [b"mdia", b"hdlr"], trak, stop)[0][0]
        media_time = 0
        for elst, _ in find(init, [b"edts", b"elst"], trak, stop)[:1]:
            wide = init[elst] == 1
            at = elst + (16 if wide else 12)
            media_time = int.from_bytes(init[at : at + (8 if wide else 4)], "big", signed=True)
        info[track_id] = (init[handler + 8 : handler + 12], timescale, max(0, media_time))
    return info


def decode(data: bytes) -> tuple[list[av.VideoFrame], np.ndarray, float]:
    """Video frames, the mono audio, and the time of the audio's first sample."""
    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(video=0))
    with av.open(io.BytesIO(data)) as container:
        sound = list(container.decode(audio=0))
    audio = np.concatenate([f.to_ndarray().reshape(-1) for f in sound])
    return frames, audio, float(sound[0].pts * sound[0].time_base)


def test_init_and_media_segment_layout() -> None:
    init, segments = run_muxer(FragmentedMp4Muxer(WIDTH, HEIGHT), sixty_frames())
    assert [kind for kind, *_ in boxes(init)] == [b"ftyp", b"moov"]
    assert len(find(init, [b"moov", b"trak"])) == 2
    assert len(segments) == 5
    for segment in segments:
        assert [kind for kind, *_ in boxes(segment)] == [b"moof", b"mdat"]
        assert len(find(segment, [b"moof", b"traf"])) == 2
    parsed, used = split_boxes(init + b"".join(segments) + b"\x00\x00\x01")
    assert used == len(init) + sum(map(len, segments))
    assert [kind for kind, _ in parsed][:4] == [b"ftyp", b"moov", b"moof", b"mdat"]


def test_segments_start_with_a_keyframe_and_hold_at_most_half_a_second() -> None:
    muxer = FragmentedMp4Muxer(WIDTH, HEIGHT, segment_seconds=0.5)
    init, segments = run_muxer(muxer, sixty_frames())
    tracks = track_info(init)
    video_frames = 0
    for segment in segments:
        for run in track_runs(init, segment):
            handler, timescale, media_time = tracks[run.track_id]
            start = max(run.decode_time, media_time)
            end = run.decode_time + sum(run.durations)
            assert (end - start) / timescale <= 0.5
            if handler == b"vide":
                assert run.first_is_sync
                assert len(run.durations) == 12
                assert run.decode_time == video_frames * timescale // FPS
                video_frames += len(run.durations)
    assert video_frames == 60


def test_each_segment_decodes_on_its_own() -> None:
    init, segments = run_muxer(FragmentedMp4Muxer(WIDTH, HEIGHT), sixty_frames())
    for number, segment in enumerate(segments):
        with av.open(io.BytesIO(init + segment)) as container:
            packets = [p for p in container.demux(video=0) if p.size]
            assert packets[0].is_keyframe
            pictures = [f for p in packets for f in p.decode()]
        assert [round(f.time * FPS) for f in pictures] == list(range(12 * number, 12 * number + 12))


def test_stream_decodes_to_every_frame_with_matching_audio() -> None:
    frames = [synthetic_frame(i) for i in range(60)]
    init, segments = run_muxer(FragmentedMp4Muxer(WIDTH, HEIGHT), frames, batch=1)
    data = init + b"".join(segments)
    with av.open(io.BytesIO(data)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert (video.width, video.height) == (WIDTH, HEIGHT)
        assert audio.sample_rate == 48_000 and audio.channels == 1
        assert audio.codec_context.profile == "LC"
    pictures, sound, audio_start = decode(data)
    assert len(pictures) == 60
    times = [f.time for f in pictures]
    assert times == sorted(times) and len(set(times)) == 60
    assert [round(t * FPS, 6) for t in times] == list(range(60))
    assert abs(audio_start) < 1 / FPS
    assert abs(len(sound) / 48_000 - 60 / FPS) <= 1 / FPS
    error = np.abs(pictures[30].to_ndarray(format="rgb24").astype(int) - frames[30].image).mean()
    assert error < 8


def test_segment_is_returned_once_the_next_one_begins() -> None:
    muxer = FragmentedMp4Muxer(WIDTH, HEIGHT)
    returned_at = []
    for i in range(60):
        returned_at += [i] * len(muxer.encode([synthetic_frame(i)]))
    assert len(returned_at) == 4
    for number, index in enumerate(returned_at):
        assert 12 * (number + 1) <= index <= 12 * (number + 1) + 2
    assert len(muxer.close()) == 1


@pytest.mark.parametrize(
    ("profile", "prefix"), [("main", "4D"), ("baseline", "42"), ("high", "64")]
)
def test_mime_names_the_encoded_profile(profile: str, prefix: str) -> None:
    muxer = FragmentedMp4Muxer(WIDTH, HEIGHT, profile=profile)
    match = re.fullmatch(r'video/mp4; codecs="avc1\.([0-9A-F]{6}), mp4a\.40\.2"', muxer.mime)
    assert match and match.group(1).startswith(prefix)
    init, _ = run_muxer(muxer, [synthetic_frame(i) for i in range(13)])
    stsd = find(init, [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd"])[0][0]
    entry = stsd + 8  # the avc1 sample entry; its 78-byte visual header precedes avcC
    avcc = find(init, [b"avcC"], entry + 8 + 78, entry + u32(init, entry))[0][0]
    assert init[avcc + 1 : avcc + 4].hex().upper() == match.group(1)


def test_gap_in_indexes_keeps_audio_and_video_aligned() -> None:
    marked = 40
    indexes = [*range(20), *range(33, 60)]
    frames = []
    for i in indexes:
        frame = synthetic_frame(i)
        frame.image[:] = 255 if i == marked else 0
        frame.audio[:] = 0.0
        if i == marked:
            t = np.arange(OUTPUT_SAMPLES_PER_FRAME) / 48_000
            frame.audio[:] = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
        frames.append(frame)
    init, segments = run_muxer(FragmentedMp4Muxer(WIDTH, HEIGHT), frames)
    pictures, sound, audio_start = decode(init + b"".join(segments))
    assert [round(f.time * FPS, 6) for f in pictures] == indexes
    white = [f.time for f in pictures if f.to_ndarray(format="rgb24").mean() > 200]
    assert white == [pytest.approx(marked / FPS)]
    onset = audio_start + np.argmax(np.abs(sound) > 0.1) / 48_000
    assert abs(onset - marked / FPS) < 1 / FPS
    assert abs(len(sound) / 48_000 - 60 / FPS) <= 1 / FPS


def test_timeline_starts_at_the_first_frame() -> None:
    frames = [synthetic_frame(i) for i in range(100, 130)]
    init, segments = run_muxer(FragmentedMp4Muxer(WIDTH, HEIGHT), frames)
    assert [len(run.durations) for run in track_runs(init, segments[0])][:1] == [12]
    pictures, sound, audio_start = decode(init + b"".join(segments))
    assert [round(f.time * FPS, 6) for f in pictures] == list(range(30))
    assert abs(audio_start) < 1 / FPS
    assert abs(len(sound) / 48_000 - 30 / FPS) <= 1 / FPS


def test_odd_sizes_are_cropped_to_even() -> None:
    muxer = FragmentedMp4Muxer(WIDTH + 1, HEIGHT + 1)
    assert (muxer.width, muxer.height) == (WIDTH, HEIGHT)
    frames = [synthetic_frame(i, WIDTH + 1, HEIGHT + 1) for i in range(13)]
    init, segments = run_muxer(muxer, frames)
    pictures, _, _ = decode(init + b"".join(segments))
    assert (pictures[0].width, pictures[0].height) == (WIDTH, HEIGHT)


def test_rejects_bad_frames_and_use_after_close() -> None:
    muxer = FragmentedMp4Muxer(WIDTH, HEIGHT)
    with pytest.raises(ValueError):
        muxer.encode([synthetic_frame(0, WIDTH, HEIGHT + 2)])
    short = synthetic_frame(0)
    short.audio = short.audio[:100]
    with pytest.raises(ValueError):
        muxer.encode([short])
    muxer.encode([synthetic_frame(5)])
    with pytest.raises(ValueError):
        muxer.encode([synthetic_frame(5)])
    muxer.close()
    with pytest.raises(RuntimeError):
        muxer.encode([synthetic_frame(6)])
    assert muxer.close() == []


def test_close_without_frames_yields_nothing() -> None:
    muxer = FragmentedMp4Muxer(WIDTH, HEIGHT)
    assert muxer.close() == [] and muxer.init_segment is None


def test_muxers_run_side_by_side_in_threads() -> None:
    def produce(offset: int) -> bytes:
        init, segments = run_muxer(
            FragmentedMp4Muxer(WIDTH, HEIGHT), [synthetic_frame(i + offset) for i in range(30)]
        )
        return init + b"".join(segments)

    with ThreadPoolExecutor(max_workers=3) as pool:
        outputs = list(pool.map(produce, [0, 0, 100]))
    for data in outputs:
        pictures, _, _ = decode(data)
        assert len(pictures) == 30
