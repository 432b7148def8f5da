"""Streaming audio features for one stream (implements ``AudioFeaturizer``).

Audio of an utterance is cut at the same 30 s segment boundaries as whole-clip processing. A
completed segment is encoded once and its hidden states are final. Frames inside the current,
still growing segment come from encoding that segment as received so far (whisper pads it with
silence, as it pads the last segment of a clip).

Latency (live mode): frame ``i`` needs audio up to two frames (80 ms) past its own end, and frames
are released ``chunk_frames`` at a time (default 4 = 160 ms) so that the encoder runs at most once
per chunk: speech starts at most 80 ms + one chunk after its audio arrives. Live features differ
slightly from whole-clip ones because whisper attends over the whole 30 s segment (and normalises
the log-mel by its maximum) while later audio is still missing.

Exact mode (clips): a frame is released only when every step it uses is final, i.e. its segment
is complete or the utterance finished; the features are then identical to ``clip_features``.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from inference.engine import AudioFeaturizer
from inference.musetalk.audio import (
    LEFT_PAD,
    LOOKAHEAD_END,
    SEGMENT_SAMPLES,
    SEGMENT_STEPS,
    STEPS_PER_FRAME,
    WINDOW_STEPS,
    WhisperSteps,
    frame_count,
    frame_windows,
    step_count,
)


def _frames_covered(steps: int) -> int:
    """Frames whose whole window lies within the first ``steps`` real steps."""
    return max(0, (steps - LOOKAHEAD_END) // STEPS_PER_FRAME + 1)


class WhisperFeaturizer(AudioFeaturizer):
    """Chunked whisper features; one feature item is a ``[50, 384]`` tensor on the model's device."""

    def __init__(self, steps: WhisperSteps, *, chunk_frames: int = 4, exact: bool = False) -> None:
        if chunk_frames < 1:
            raise ValueError("chunk_frames must be at least 1")
        self._steps = steps
        self.chunk_frames = chunk_frames
        self.exact = exact
        self._done: deque[torch.Tensor] = deque()
        self.encodes = 0
        self._new_utterance()

    def _new_utterance(self) -> None:
        self._segment: list[np.ndarray] = []
        self._segment_samples = 0
        self._received = 0
        self._emitted = 0
        self._final: torch.Tensor | None = None  # real steps of completed segments, from _final_offset
        self._final_offset = 0
        self._final_end = 0
        self._partial: tuple[int, torch.Tensor] | None = None  # (samples encoded, steps) of the segment

    # ----- AudioFeaturizer -----

    def push(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        while len(pcm):
            take = min(len(pcm), SEGMENT_SAMPLES - self._segment_samples)
            self._segment.append(pcm[:take])
            self._segment_samples += take
            self._received += take
            pcm = pcm[take:]
            if self._segment_samples == SEGMENT_SAMPLES:
                self._complete_segment()

    def finish(self) -> None:
        total = frame_count(self._received)
        if total > self._emitted:
            self._compute(total, finished=True)
        self._new_utterance()

    def ready(self) -> int:
        new = self._releasable()
        if not self.exact and new < self.chunk_frames:
            new = 0
        return len(self._done) + new

    def take(self, count: int) -> list[torch.Tensor]:
        if count > len(self._done):
            new = self._releasable()
            if len(self._done) + new < count:
                raise ValueError(f"take({count}) with only {len(self._done) + new} frames ready")
            self._compute(self._emitted + new, finished=False)
        return [self._done.popleft() for _ in range(count)]

    def pending(self) -> int:
        return len(self._done) + frame_count(self._received) - self._emitted

    def reset(self) -> None:
        self._done.clear()
        self._new_utterance()

    # ----- internals -----

    def _releasable(self) -> int:
        known = self._final_end if self.exact else step_count(self._received)
        return max(0, min(_frames_covered(known), frame_count(self._received)) - self._emitted)

    def _segment_audio(self) -> np.ndarray:
        audio = np.concatenate(self._segment) if self._segment else np.zeros(0, np.float32)
        self._segment = [audio]
        return audio

    def _complete_segment(self) -> None:
        steps = self._encode(self._segment_audio())
        self._append_final(steps)
        self._segment = []
        self._segment_samples = 0
        self._partial = None

    def _append_final(self, steps: torch.Tensor) -> None:
        self._final = steps if self._final is None else torch.cat([self._final, steps])
        self._final_end += len(steps)
        # Keep only the steps that frames not yet computed can still reach.
        keep_from = max(self._final_offset, STEPS_PER_FRAME * self._emitted - LEFT_PAD)
        self._final = self._final[keep_from - self._final_offset :]
        self._final_offset = keep_from

    def _encode(self, audio: np.ndarray) -> torch.Tensor:
        self.encodes += 1
        return self._steps.encode([audio])[0]

    def _partial_steps(self) -> torch.Tensor:
        if self._partial is None or self._partial[0] != self._segment_samples:
            self._partial = (self._segment_samples, self._encode(self._segment_audio()))
        return self._partial[1]

    def _compute(self, upto: int, *, finished: bool) -> None:
        """Features of frames ``[_emitted, upto)`` into the ready queue."""
        first = self._emitted
        lo = STEPS_PER_FRAME * first  # padded step index of the first window's start
        hi = STEPS_PER_FRAME * (upto - 1) + WINDOW_STEPS
        real_known = step_count(self._received)
        parts: list[tuple[int, torch.Tensor]] = []
        if self._final is not None:
            parts.append((self._final_offset, self._final))
        if self._segment_samples and self._final_end < hi - LEFT_PAD:
            parts.append((self._final_end, self._partial_steps()[:SEGMENT_STEPS]))
        template = parts[0][1] if parts else self._partial_steps()
        padded = template.new_zeros((hi - lo, *template.shape[1:]))
        for start, steps in parts:
            # real step r sits at padded index r + LEFT_PAD; copy those in [lo, hi) and known.
            r0 = max(start, lo - LEFT_PAD, 0)
            r1 = min(start + len(steps), hi - LEFT_PAD, real_known)
            if r1 > r0:
                padded[r0 + LEFT_PAD - lo : r1 + LEFT_PAD - lo] = steps[r0 - start : r1 - start]
        if not finished and hi - LEFT_PAD > real_known:
            raise AssertionError("frame computed before its audio arrived")
        windows = frame_windows(padded, first, upto - first, offset=lo)
        self._done.extend(windows.unbind(0))
        self._emitted = upto
        if self._final is not None:
            drop = max(0, STEPS_PER_FRAME * upto - LEFT_PAD - self._final_offset)
            self._final = self._final[drop:]
            self._final_offset += drop
