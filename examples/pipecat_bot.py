"""A Pipecat bot whose face is served by musetalk-stream, in the browser over SmallWebRTC.

Offline and TTS-free: the bot "speaks" a local recording (``--speech``, any WAV; by default a
generated speech-like buzz) every few seconds, the way a TTS service would hand it audio, and the
avatar lip-syncs it. Run a server first (``make serve`` gives the lite engine), then:

    python examples/pipecat_bot.py --server http://127.0.0.1:8000 --port 7860

and open http://127.0.0.1:7860/. Each page gets its own pipeline:

    transport.input() -> SpeechLoop -> MuseTalkVideoService -> transport.output()

In a real bot the avatar goes between your TTS service and ``transport.output()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path
from typing import Any

import av
import numpy as np
import uvicorn
from pipecat.frames.frames import Frame, StartFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from stream_server.sdk.pipecat_service import MuseTalkVideoService

SPEECH_RATE = 24_000
FRAME_S = 0.02

PAGE = """<!doctype html>
<meta charset="utf-8"><title>Pipecat bot with a musetalk-stream avatar</title>
<style>body{font-family:sans-serif;margin:2em}video{width:512px;height:512px;background:#222}</style>
<h1>Pipecat bot</h1>
<p><button id="go">Connect</button> <span id="state">not connected</span></p>
<video id="video" autoplay playsinline></video>
<script type="module">
const state = document.getElementById("state");
document.getElementById("go").onclick = async () => {
  const pc = new RTCPeerConnection({ iceServers: [] });
  // SmallWebRTC expects audio first, then video.
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (e) => { document.getElementById("video").srcObject = e.streams[0] || new MediaStream([e.track]); };
  pc.onconnectionstatechange = () => { state.textContent = pc.connectionState; };
  await pc.setLocalDescription(await pc.createOffer());
  if (pc.iceGatheringState !== "complete")
    await new Promise((ok) => pc.addEventListener("icegatheringstatechange",
      () => pc.iceGatheringState === "complete" && ok()));
  const answer = await (await fetch("/api/offer", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }) })).json();
  await pc.setRemoteDescription(answer);
};
</script>
"""


def load_speech(path: Path | None) -> np.ndarray:
    """Mono int16 at ``SPEECH_RATE``: the file's audio, or a generated speech-like buzz."""
    if path is None:
        t = np.arange(int(SPEECH_RATE * 3.0)) / SPEECH_RATE
        voice = 0.4 * np.sign(np.sin(2 * np.pi * 140 * t)) * ((t % 0.28) < 0.16)
        return (voice * 32767).astype(np.int16)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SPEECH_RATE)
    parts = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    return np.concatenate(parts).astype(np.int16)


class SpeechLoop(FrameProcessor):
    """Stands in for a TTS service: says ``speech`` every ``every_s`` seconds, as 20 ms TTS frames."""

    def __init__(self, speech: np.ndarray, every_s: float = 6.0) -> None:
        super().__init__()
        self._speech = speech
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame) and self._task is None:
            self._task = self.create_task(self._talk(), "speech-loop")

    async def _talk(self) -> None:
        step = int(SPEECH_RATE * FRAME_S)
        while True:
            await asyncio.sleep(self._every_s / 2)
            await self.push_frame(TTSStartedFrame())
            for offset in range(0, len(self._speech), step):
                chunk = self._speech[offset : offset + step].tobytes()
                await self.push_frame(TTSAudioRawFrame(audio=chunk, sample_rate=SPEECH_RATE, num_channels=1))
                await asyncio.sleep(FRAME_S)
            await self.push_frame(TTSStoppedFrame())
            await asyncio.sleep(self._every_s / 2)

    async def cleanup(self) -> None:
        await super().cleanup()  # type: ignore[no-untyped-call]
        if self._task is not None:
            await self.cancel_task(self._task)


def build_app(server: str, avatar: str, speech: np.ndarray, token: str | None) -> Starlette:
    runners: set[asyncio.Task[None]] = set()

    async def page(_request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def offer(request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        connection = SmallWebRTCConnection(ice_servers=[])
        await connection.initialize(sdp=body["sdp"], type=body["type"])
        transport = SmallWebRTCTransport(
            webrtc_connection=connection,
            params=TransportParams(
                audio_out_enabled=True,
                video_out_enabled=True,
                # Not "live": the avatar's images are synced with their audio (sync_with_audio) and the
                # transport shows the newest one at 25 fps; a live video queue would never show them.
                video_out_is_live=False,
                video_out_width=512,
                video_out_height=512,
                video_out_framerate=25,
            ),
        )
        avatar_service = MuseTalkVideoService(url=server, avatar=avatar, token=token, transport="webrtc")

        @avatar_service.event_handler("on_queue_position")  # type: ignore[untyped-decorator]
        async def on_queue_position(_service: MuseTalkVideoService, position: int, eta_s: float | None) -> None:
            print(f"avatar: waiting for a slot, position {position}, eta {eta_s}")

        pipeline = Pipeline([transport.input(), SpeechLoop(speech), avatar_service, transport.output()])
        worker = PipelineWorker(pipeline, params=PipelineParams(audio_out_sample_rate=48_000))

        @transport.event_handler("on_client_disconnected")  # type: ignore[untyped-decorator]
        async def on_client_disconnected(_transport: SmallWebRTCTransport, _client: Any) -> None:
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        task = asyncio.create_task(runner.run())
        runners.add(task)
        task.add_done_callback(runners.discard)
        return JSONResponse(connection.get_answer())  # type: ignore[no-untyped-call]

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):  # type: ignore[no-untyped-def]
        yield
        for task in list(runners):
            task.cancel()

    return Starlette(routes=[Route("/", page), Route("/api/offer", offer, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="the musetalk-stream server")
    parser.add_argument("--avatar", default="astronaut")
    parser.add_argument("--token", default=None, help="a token for the server (default: guest, tier low)")
    parser.add_argument("--speech", type=Path, default=None, help="a WAV the bot says (default: generated)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    app = build_app(args.server, args.avatar, load_speech(args.speech), args.token)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
