"""MuseTalk v1.5 audio features: 16 kHz audio -> whisper hidden states -> one [50, 384] window a frame.

Whisper sees audio in 30 s segments (each padded to 30 s) and gives 50 steps a second; every step
keeps all hidden states (embedding output + each encoder layer: 5 x 384 for whisper-tiny). The steps
are trimmed to the audio's length, ``LEFT_PAD`` zero steps are put before and ``RIGHT_PAD`` after,
and frame ``i`` takes padded steps ``[2i, 2i + 10)``: real steps ``[2i - 4, 2i + 6)``, i.e. 80 ms of
audio either side of the frame's own 40 ms.

MuseTalk (``AudioProcessor.get_whisper_chunk``) counts frames and steps in floating point,
``floor(samples / 16000 * 25)`` and ``floor(samples / 16000 * 50)``; those are the integer
``samples // 640`` and ``samples // 320`` except where rounding makes the product fall just short
of a whole number (9280 samples: 28.999999999999996 steps), where MuseTalk drops that last step or
frame. Integer arithmetic is kept here: an utterance then always has exactly ``samples // 640``
frames, which the stream's audio/video alignment relies on.
"""

from __future__ import annotations

import numpy as np
import torch

from inference.engine import FEATURE_SAMPLE_RATE, FEATURE_SAMPLES_PER_FRAME

SAMPLES_PER_STEP = FEATURE_SAMPLE_RATE // 50
STEPS_PER_FRAME = FEATURE_SAMPLES_PER_FRAME // SAMPLES_PER_STEP
SEGMENT_SAMPLES = 30 * FEATURE_SAMPLE_RATE
SEGMENT_STEPS = SEGMENT_SAMPLES // SAMPLES_PER_STEP
LEFT_PAD = 4
RIGHT_PAD = 12
WINDOW_STEPS = 10
# Real steps a frame reaches beyond its own: frame i needs steps below 2i + LOOKAHEAD_END.
LOOKAHEAD_END = WINDOW_STEPS - LEFT_PAD


def frame_count(samples: int) -> int:
    return samples // FEATURE_SAMPLES_PER_FRAME


def step_count(samples: int) -> int:
    return samples // SAMPLES_PER_STEP


def window_steps(frame: int) -> tuple[int, int]:
    """The real (unpadded) step range ``[start, end)`` whose hidden states frame ``frame`` uses;
    negative or past-the-end steps are zeros."""
    start = STEPS_PER_FRAME * frame - LEFT_PAD
    return start, start + WINDOW_STEPS


def window_samples(frame: int) -> tuple[int, int]:
    """The audio samples ``[start, end)`` that frame ``frame``'s features are drawn from."""
    start, end = window_steps(frame)
    return start * SAMPLES_PER_STEP, end * SAMPLES_PER_STEP


class WhisperSteps:
    """Whisper encoder hidden states of one 30 s segment: ``[1500, layers + 1, d]``."""

    def __init__(self, encoder: torch.nn.Module, extractor: object, device: torch.device, dtype: torch.dtype):
        self.encoder = encoder
        self.extractor = extractor
        self.device = device
        self.dtype = dtype

    @torch.inference_mode()
    def encode(self, segments: list[np.ndarray]) -> torch.Tensor:
        """Hidden states of several segments (each at most 30 s) in one batch: ``[S, 1500, L, d]``."""
        mel = self.extractor(  # type: ignore[operator]
            [np.asarray(s, dtype=np.float32) for s in segments],
            sampling_rate=FEATURE_SAMPLE_RATE,
            return_tensors="pt",
        ).input_features
        out = self.encoder(mel.to(self.device, self.dtype), output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=2)


def pad_steps(steps: torch.Tensor, samples: int) -> torch.Tensor:
    """Trim ``[T, L, d]`` steps to the audio's length and add the zero steps on both sides."""
    steps = steps[: step_count(samples)]
    left = steps.new_zeros((LEFT_PAD, *steps.shape[1:]))
    right = steps.new_zeros((RIGHT_PAD, *steps.shape[1:]))
    return torch.cat([left, steps, right], dim=0)


def frame_windows(padded: torch.Tensor, first: int, count: int, offset: int = 0) -> torch.Tensor:
    """Frames ``[first, first + count)`` from padded steps whose element 0 is padded step ``offset``:
    ``[count, 10 * L, d]``."""
    starts = torch.arange(first, first + count, device=padded.device) * STEPS_PER_FRAME - offset
    index = starts[:, None] + torch.arange(WINDOW_STEPS, device=padded.device)[None, :]
    windows = padded[index]
    return windows.reshape(count, -1, padded.shape[-1])


def clip_features(steps: WhisperSteps, audio: np.ndarray) -> torch.Tensor:
    """Whole-clip features exactly as MuseTalk computes them: ``[len(audio) // 640, 50, 384]``."""
    audio = np.asarray(audio, dtype=np.float32)
    segments = [audio[i : i + SEGMENT_SAMPLES] for i in range(0, max(len(audio), 1), SEGMENT_SAMPLES)]
    hidden = steps.encode(segments).flatten(0, 1)
    return frame_windows(pad_steps(hidden, len(audio)), 0, frame_count(len(audio)))
