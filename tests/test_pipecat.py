"""``MuseTalkVideoService`` in a real Pipecat pipeline against a real server with the lite engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import EndFrame, InterruptionFrame, OutputImageRawFrame, TTSStoppedFrame  # noqa: E402

from stream_server.sdk.pipecat_service import PTS_KEY, SPEAKING_KEY, MuseTalkVideoService  # noqa: E402
from tests.pipecat_harness import PipelineRun, run_pipeline, speak, syllables  # noqa: E402
from tests.server_harness import Client, RunningServer, mint, run_server  # noqa: E402

LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse", "audio": {"format": "pcm_s16le"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(tmp_path_factory.mktemp("pipecat"), MTS_ENGINE__SLOTS="2", MTS_LIMITS__START_BURST="50") as running:
        yield running


def live_images(run: PipelineRun) -> list[OutputImageRawFrame]:
    """Images that came from the stream (the still shown while queued has no session time)."""
    return [f for f in run.images if PTS_KEY in f.metadata]


def motion(images: list[OutputImageRawFrame], rest: bytes) -> np.ndarray:
    base = np.frombuffer(rest, dtype=np.uint8).astype(np.int16)
    return np.array([np.abs(np.frombuffer(f.image, dtype=np.uint8).astype(np.int16) - base).mean() for f in images])


@pytest.mark.parametrize("transport", ["mse", "webrtc"])
async def test_three_seconds_of_tts_give_75_lip_synced_frames(server: RunningServer, transport: str) -> None:
    service = MuseTalkVideoService(url=server.url, avatar="astronaut", token=mint(f"bot-{transport}", "normal"),
                                   transport=transport)

    async def drive(run: PipelineRun) -> None:
        await run.down.wait_for(lambda: len(live_images(run)) >= 10)
        await speak(run, syllables(3.0))
        await run.send(TTSStoppedFrame())
        await run.down.wait_for(lambda: sum(1 for f in live_images(run) if not f.metadata[SPEAKING_KEY]) >= 10 + 75
                                and not live_images(run)[-1].metadata[SPEAKING_KEY], timeout=30)
        await asyncio.sleep(1.0)
        await run.send(EndFrame())

    run = await run_pipeline(service, drive)
    assert run.errors == []
    images = live_images(run)
    assert all(f.size == (512, 512) and f.format == "RGB" and len(f.image) == 512 * 512 * 3 for f in images)
    pts = np.array([f.metadata[PTS_KEY] for f in images])
    assert np.allclose(np.diff(pts), 0.04, atol=1e-3), "25 fps on the session clock, no frame lost or doubled"
    speaking = [f for f in images if f.metadata[SPEAKING_KEY]]
    # 3 s of syllables at 25 fps span about 75 frames: 11 syllables of 4 frames every 7 frames, the
    # pauses between them quiet frames. A TTS frame that reaches the server late (a loaded machine)
    # stretches the span by the frames shown while waiting for it; the syllables stay whole.
    first, last = speaking[0].metadata[PTS_KEY], speaking[-1].metadata[PTS_KEY]
    span_frames = round((last - first) / 0.04) + 1
    assert 72 <= span_frames <= 85, span_frames
    assert 40 <= len(speaking) <= 60, len(speaking)  # 4 frames a syllable, 5 when the sound straddles one more
    # Every speaking frame is followed by exactly its own 40 ms of audio.
    audio = run.audio
    assert len(audio) == len(speaking)
    assert all(a.metadata[PTS_KEY] == v.metadata[PTS_KEY] and a.num_frames == 1920
               for a, v in zip(audio, speaking, strict=True))
    # Lips follow the sound: the mouth's motion correlates best with the audio level at lag 0 (+-1 frame).
    rest = next(f for f in images if not f.metadata[SPEAKING_KEY]).image
    window = [f for f in images if first - 0.4 <= f.metadata[PTS_KEY] <= last + 0.4]
    move = motion(window, rest)
    levels = np.zeros(len(window))
    by_pts = {a.metadata[PTS_KEY]: a for a in audio}
    for i, f in enumerate(window):
        if f.metadata[PTS_KEY] in by_pts:
            samples = np.frombuffer(by_pts[f.metadata[PTS_KEY]].audio, dtype=np.int16).astype(np.float64)
            levels[i] = np.sqrt(np.mean(samples**2))
    lags = range(-4, 5)
    scores = [np.corrcoef(np.roll(levels, lag)[4:-4], move[4:-4])[0, 1] for lag in lags]
    best = list(lags)[int(np.argmax(scores))]
    assert abs(best) <= 1, dict(zip(lags, np.round(scores, 2), strict=True))


async def test_interruption_returns_to_idle_at_once(server: RunningServer) -> None:
    service = MuseTalkVideoService(url=server.url, avatar="astronaut", token=mint("bot-interrupt", "normal"))
    marks: dict[str, float] = {}

    async def drive(run: PipelineRun) -> None:
        await run.down.wait_for(lambda: len(live_images(run)) >= 10)
        # A TTS service produces faster than real time: 6 s of speech arrive within 1 s.
        await speak(run, syllables(6.0), pace=6.0)
        await run.down.wait_for(lambda: sum(f.metadata[SPEAKING_KEY] for f in live_images(run)) >= 20)
        marks["interrupt_at"] = live_images(run)[-1].metadata[PTS_KEY]
        await run.send(InterruptionFrame())
        await run.down.wait_for(lambda: live_images(run)[-1].metadata[PTS_KEY] > marks["interrupt_at"] + 3.0)
        await run.send(EndFrame())

    run = await run_pipeline(service, drive)
    assert run.errors == []
    frames = [f for _, f in run.down.frames]
    cut = next(i for i, f in enumerate(frames) if isinstance(f, InterruptionFrame))
    after = [f for f in frames[cut:] if isinstance(f, OutputImageRawFrame)]
    assert after and not any(f.metadata[SPEAKING_KEY] for f in after), "no speech is shown after the interruption"
    assert not any(type(f).__name__ == "OutputAudioRawFrame" for f in frames[cut:]), "and none is heard"
    timed = [f for f in after if PTS_KEY in f.metadata]
    # Idle frames come from the moment of the interruption on the session clock, in order. The
    # server drops frames it had not yet encoded, so its timeline may skip up to one segment; the
    # transport keeps showing the rest image meanwhile.
    assert timed[0].metadata[PTS_KEY] - marks["interrupt_at"] <= 0.2
    steps = np.diff([f.metadata[PTS_KEY] for f in timed])
    assert steps.min() > 0.039 and steps.max() <= 0.5 + 1e-3
    assert np.allclose(steps / 0.04, np.round(steps / 0.04), atol=0.03), "on the 25 fps grid"
    # And the server itself stopped talking. Without the interrupt its speech would run on for about
    # 5 s more; with it, only what was already encoded or in flight comes (MSE: the segment being
    # encoded, the one in transit and the service's 0.6 s play-out buffer), shown as the rest image.
    assert service.replaced_after_interrupt_s is not None and service.replaced_after_interrupt_s < 2.5


async def test_start_behind_a_busy_slot_reports_its_place_then_is_granted(tmp_path: Path) -> None:
    with run_server(tmp_path, MTS_ENGINE__SLOTS="1") as single:
        holder = await Client.connect(single)
        await holder.hello(mint("slot-holder", "vip"))
        await holder.send("start", **LIVE)
        await holder.expect("granted")
        service = MuseTalkVideoService(url=single.url, avatar="astronaut", token=mint("queued-bot", "normal"))
        places: list[tuple[int, float | None]] = []
        grants: list[float] = []

        @service.event_handler("on_queue_position")
        async def on_queue_position(_service: MuseTalkVideoService, position: int, eta_s: float | None) -> None:
            places.append((position, eta_s))

        @service.event_handler("on_granted")
        async def on_granted(_service: MuseTalkVideoService, waited_s: float) -> None:
            grants.append(waited_s)

        async def drive(run: PipelineRun) -> None:
            await run.down.wait_for(lambda: bool(places))
            await asyncio.sleep(1.5)
            assert grants == [] and live_images(run) == []
            assert run.images, "the still frame shows while queued"
            await holder.close()
            await run.down.wait_for(lambda: len(live_images(run)) >= 10)
            await run.send(EndFrame())

        run = await run_pipeline(service, drive)
        assert run.errors == []
        assert places[0][0] == 1 and len(grants) == 1 and grants[0] >= 1.5
        still = run.images[0]
        assert PTS_KEY not in still.metadata and still.size == (512, 512)


async def test_queue_timeout_is_a_clear_error_that_ends_the_pipeline(tmp_path: Path) -> None:
    with run_server(tmp_path, MTS_ENGINE__SLOTS="1") as single:
        holder = await Client.connect(single)
        await holder.hello(mint("slot-keeper", "vip"))
        await holder.send("start", **LIVE)
        await holder.expect("granted")
        service = MuseTalkVideoService(url=single.url, avatar="astronaut", queue_timeout_s=1.5)

        async def drive(run: PipelineRun) -> None:
            await asyncio.sleep(60)  # the policy ends the pipeline long before this

        run = await run_pipeline(service, drive, timeout=30)
        assert len(run.errors) == 1
        assert "queue_timeout_s=1.5" in run.errors[0].error and "position 1" in run.errors[0].error
        await asyncio.sleep(0.5)
        assert single.get("/v1/queue").json()["tiers"]["low"]["size"] == 0, "the place was given back"
        await holder.close()


async def test_server_going_away_ends_the_pipeline_with_an_error(tmp_path: Path) -> None:
    with run_server(tmp_path) as doomed:
        service = MuseTalkVideoService(url=doomed.url, avatar="astronaut")

        async def drive(run: PipelineRun) -> None:
            await run.down.wait_for(lambda: len(live_images(run)) >= 5)
            doomed.process.kill()
            await asyncio.sleep(60)

        run = await run_pipeline(service, drive, timeout=30)
        assert len(run.errors) == 1 and "closed the connection" in run.errors[0].error
