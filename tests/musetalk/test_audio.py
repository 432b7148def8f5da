from __future__ import annotations

import numpy as np
import pytest
import torch
from musetalk_helpers import speech_like

from inference.engine import FEATURE_SAMPLES_PER_FRAME
from inference.musetalk.audio import (
    SAMPLES_PER_STEP,
    SEGMENT_SAMPLES,
    SEGMENT_STEPS,
    WhisperSteps,
    clip_features,
    window_samples,
    window_steps,
)
from inference.musetalk.featurizer import WhisperFeaturizer
from inference.musetalk.models import MuseTalkModels


class StepIndexEncoder(WhisperSteps):
    """Stands in for whisper: step ``t`` of a segment holds the mean sample value of its 20 ms in
    every layer and channel, so a ramp of step numbers comes out as step numbers."""

    def __init__(self, layers: int = 5, dim: int = 384) -> None:
        self.layers, self.dim = layers, dim

    def encode(self, segments: list[np.ndarray]) -> torch.Tensor:
        out = torch.zeros(len(segments), SEGMENT_STEPS, self.layers, self.dim)
        for k, seg in enumerate(segments):
            steps = len(seg) // SAMPLES_PER_STEP
            means = seg[: steps * SAMPLES_PER_STEP].reshape(steps, SAMPLES_PER_STEP).mean(1)
            out[k, :steps] = torch.from_numpy(means)[:, None, None]
        return out


def step_ramp(samples: int) -> np.ndarray:
    """Sample ``k`` holds ``1 + k // 320``: the (1-based) number of its whisper step."""
    return (1 + np.arange(samples) // SAMPLES_PER_STEP).astype(np.float32)


def expected_window(frame: int, samples: int) -> np.ndarray:
    start, end = window_steps(frame)
    known = samples // SAMPLES_PER_STEP
    return np.array([s + 1 if 0 <= s < known else 0 for s in range(start, end)], dtype=np.float32)


def test_window_geometry() -> None:
    assert window_steps(0) == (-4, 6)
    assert window_steps(10) == (16, 26)
    assert window_samples(10) == (16 * 320, 26 * 320)
    # frame i's own 40 ms sit inside its window with 80 ms of context either side
    start, end = window_samples(7)
    own = (7 * FEATURE_SAMPLES_PER_FRAME, 8 * FEATURE_SAMPLES_PER_FRAME)
    assert own[0] - start == 1280 and end - own[1] == 1280


@pytest.mark.parametrize("samples", [640 * 25, 640 * 25 + 639, 640 * 3 + 1, 16000 * 31 + 123])
def test_frame_windows_cover_the_right_steps(samples: int) -> None:
    enc = StepIndexEncoder()
    feats = clip_features(enc, step_ramp(samples))
    assert feats.shape == (samples // 640, 50, 384)
    for i in range(len(feats)):
        # [50, 384] is 10 steps x 5 layers; every layer of a step holds the step's number
        got = feats[i].reshape(10, 5, 384)[:, :, 0]
        assert torch.equal(got, torch.from_numpy(expected_window(i, samples))[:, None].expand(10, 5)), i


def test_segments_cross_30_seconds() -> None:
    samples = SEGMENT_SAMPLES + 16000
    feats = clip_features(StepIndexEncoder(), step_ramp(samples))
    boundary = SEGMENT_SAMPLES // FEATURE_SAMPLES_PER_FRAME  # frame 750 starts segment 2
    got = feats[boundary].reshape(10, 5, 384)[:, 0, 0].numpy()
    assert got.tolist() == expected_window(boundary, samples).tolist() == list(range(1497, 1507))


def drive(featurizer: WhisperFeaturizer, audio: np.ndarray, chunks: int, *, eager: bool = True) -> torch.Tensor:
    out: list[torch.Tensor] = []
    for chunk in np.array_split(audio, chunks):
        featurizer.push(chunk)
        if eager and featurizer.ready():
            out += featurizer.take(featurizer.ready())
    featurizer.finish()
    out += featurizer.take(featurizer.ready())
    return torch.stack(out)


@pytest.mark.parametrize("exact", [False, True])
def test_chunked_equals_whole_with_a_local_encoder(exact: bool) -> None:
    enc = StepIndexEncoder()
    audio = step_ramp(SEGMENT_SAMPLES + 8000 + 77)
    whole = clip_features(enc, audio)
    featurizer = WhisperFeaturizer(enc, chunk_frames=3, exact=exact)
    assert torch.equal(drive(featurizer, audio, 97), whole)


def test_exact_mode_equals_whole_clip(models: MuseTalkModels) -> None:
    steps = WhisperSteps(models.whisper, models.feature_extractor, models.device, models.dtype)
    audio = speech_like(1.3)
    featurizer = WhisperFeaturizer(steps, exact=True)
    for chunk in np.array_split(audio, 7):
        featurizer.push(chunk)
        assert featurizer.ready() == 0  # a clip shorter than a segment waits for its end
    assert torch.equal(drive(featurizer, np.zeros(0, np.float32), 1), clip_features(steps, audio))


def test_live_chunks_match_whole_clip_within_tolerance(models: MuseTalkModels) -> None:
    steps = WhisperSteps(models.whisper, models.feature_extractor, models.device, models.dtype)
    audio = speech_like(1.5, seed=2)
    whole = clip_features(steps, audio)
    featurizer = WhisperFeaturizer(steps, chunk_frames=4)
    live = drive(featurizer, audio, 15)
    assert live.shape == whole.shape
    rel = (live - whole).norm(dim=(1, 2)) / whole.norm(dim=(1, 2))
    assert float(rel.max()) < 0.02
    assert featurizer.encodes <= len(whole) // 4 + 2  # at most one encode per chunk


def test_live_lookahead_and_chunking() -> None:
    featurizer = WhisperFeaturizer(StepIndexEncoder(), chunk_frames=2)
    featurizer.push(step_ramp(640 * 3))  # frame 0 needs audio through 2 frames past its own
    assert featurizer.pending() == 3 and featurizer.ready() == 0
    featurizer.push(np.ones(640, np.float32))  # frames 0 and 1 are now covered: one chunk
    assert featurizer.ready() == 2
    assert len(featurizer.take(1)) == 1 and featurizer.ready() == 1 and featurizer.pending() == 3


@pytest.mark.parametrize("samples", [0, 1, 639, 640, 641, 6399, 6400, 12345])
def test_an_utterance_yields_n_div_640_frames(samples: int) -> None:
    featurizer = WhisperFeaturizer(StepIndexEncoder())
    featurizer.push(step_ramp(samples))
    assert featurizer.pending() == samples // 640
    featurizer.finish()
    assert featurizer.ready() == featurizer.pending() == samples // 640
    assert len(featurizer.take(featurizer.ready())) == samples // 640


def test_push_after_finish_starts_a_new_utterance() -> None:
    featurizer = WhisperFeaturizer(StepIndexEncoder(), chunk_frames=1)
    first, second = step_ramp(640 * 5 + 100), step_ramp(640 * 4)
    featurizer.push(first)
    featurizer.finish()
    featurizer.push(second)  # the new utterance's steps restart at 0, its tail pad is its own
    featurizer.finish()
    assert featurizer.ready() == 9
    got = torch.stack(featurizer.take(9))
    enc = StepIndexEncoder()
    assert torch.equal(got, torch.cat([clip_features(enc, first), clip_features(enc, second)]))


def test_reset_drops_everything_not_taken() -> None:
    featurizer = WhisperFeaturizer(StepIndexEncoder(), chunk_frames=1)
    featurizer.push(step_ramp(640 * 10))
    taken = featurizer.take(2)
    featurizer.finish()
    featurizer.push(step_ramp(640 * 10))
    featurizer.reset()
    assert (featurizer.ready(), featurizer.pending()) == (0, 0)
    featurizer.push(step_ramp(640 * 6))
    featurizer.finish()
    assert torch.equal(torch.stack(featurizer.take(6)), clip_features(StepIndexEncoder(), step_ramp(640 * 6)))
    assert len(taken) == 2


def test_take_more_than_ready_is_an_error() -> None:
    featurizer = WhisperFeaturizer(StepIndexEncoder())
    featurizer.push(step_ramp(640 * 2))
    with pytest.raises(ValueError):
        featurizer.take(1)


def musetalk_reference(models: MuseTalkModels, audio: np.ndarray) -> torch.Tensor:
    """MuseTalk v1.5's ``get_audio_feature`` + ``get_whisper_chunk`` restated step by step (fps 25,
    padding 2 and 2): each 30 s segment through the feature extractor and the encoder on its own,
    all hidden states stacked, segments joined, trimmed, 2 * 2 zero steps before and 2 * 3 * 2 after,
    frame i takes 2 * (2 + 2 + 1) steps from step 2i, flattened step-major."""
    segments = [audio[i : i + 480000] for i in range(0, len(audio), 480000)]
    hidden = []
    for segment in segments:
        mel = models.feature_extractor(segment, return_tensors="pt", sampling_rate=16000).input_features
        with torch.no_grad():
            states = models.whisper(mel.to(models.dtype), output_hidden_states=True).hidden_states
        hidden.append(torch.stack(states, dim=2))  # [1, 1500, 5, 384]
    feature = torch.cat(hidden, dim=1)[:, : len(audio) // 320]
    zeros = torch.zeros_like(feature[:, :1])
    feature = torch.cat([zeros.expand(-1, 4, -1, -1), feature, zeros.expand(-1, 12, -1, -1)], dim=1)
    prompts = [feature[:, 2 * i : 2 * i + 10] for i in range(len(audio) // 640)]
    out = torch.cat(prompts, dim=0)  # [T, 10, 5, 384]
    return out.reshape(out.shape[0], 10 * out.shape[2], out.shape[3])


@pytest.mark.parametrize("seconds", [1.37, 30.0, 31.3])
def test_clip_features_match_musetalk_with_the_real_encoder(models: MuseTalkModels, seconds: float) -> None:
    """The whole path with the tiny whisper and its real feature extractor, across a segment
    boundary too, against MuseTalk's algorithm written out independently."""
    steps = WhisperSteps(models.whisper, models.feature_extractor, models.device, models.dtype)
    audio = speech_like(seconds, seed=9)
    ours = clip_features(steps, audio)
    reference = musetalk_reference(models, audio)
    assert ours.shape == reference.shape == (len(audio) // 640, 50, 384)
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4)
    # the zero padding: frame 0 starts with 4 zero steps (20 rows), the last frame ends past the audio
    assert not ours[0, :20].any() and ours[0, 20:25].abs().sum() > 0
    assert not ours[-1, -5:].any()


def test_exact_mode_across_a_segment_boundary_with_the_real_encoder(models: MuseTalkModels) -> None:
    """Clip streams release the first 30 s as soon as that segment is complete, and every feature
    is the whole-clip one (so MuseTalk's too, see above)."""
    steps = WhisperSteps(models.whisper, models.feature_extractor, models.device, models.dtype)
    audio = speech_like(30.9, seed=11)
    featurizer = WhisperFeaturizer(steps, exact=True)
    out: list[torch.Tensor] = []
    for chunk in np.array_split(audio, 40):
        featurizer.push(chunk)
        out += featurizer.take(featurizer.ready())
    early = len(out)
    featurizer.finish()
    out += featurizer.take(featurizer.ready())
    assert 740 <= early < 750  # up to the frames whose window needs steps of the second segment
    whole = clip_features(steps, audio)
    assert len(out) == len(whole) == len(audio) // 640
    assert torch.allclose(torch.stack(out), whole, atol=1e-5, rtol=1e-5)
    assert featurizer.encodes == 2
