"""MuseTalk throughput: frames/s by batch size and dtype, model FLOP utilisation, and how many
concurrent 25 fps live streams one batching FrameWorker sustains against one loop per session.

The networks have MuseTalk's full-size architecture (UNet ~850 M parameters, the sd-vae decoder,
whisper-tiny) with random weights: speed does not depend on the values. On a CPU use ``--small``
(tiny widths) to check that the benchmark runs; numbers worth reporting need a GPU::

    python bench/gpu_throughput.py                       # full size on cuda, fp16 and bf16
    python bench/gpu_throughput.py --small --device cpu --dtypes fp32 --batches 1,4 --seconds 2

``--process`` also runs the live trials in the process architecture (``engine.process_mode =
"process"``): the same random networks saved in the models layout, one spawned worker process
loading them, streams opened through ``ProcessEnginePool`` with their frames coming back through
shared memory (as WebRTC streams do), so the hand-off to the server process is in the figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.engine import FEATURE_SAMPLE_RATE, FPS
from inference.musetalk.configs import (
    FULL_UNET,
    FULL_VAE,
    TINY_UNET,
    TINY_VAE,
    TINY_WHISPER,
)
from inference.musetalk.models import MuseTalkModels, PositionalEncoding, resolve_dtype
from inference.musetalk.renderer import MuseTalkRenderer
from inference.serving_engine import ServedStream
from inference.stream import StreamMode
from inference.worker import FrameWorker

StreamOpener = Callable[[int], tuple[list[ServedStream], Callable[[], None]]]
"""``open(n)``: ``n`` live streams, and what to call once the trial is over."""

REFERENCE_TFLOP_PER_FRAME = 0.79
WHISPER_TINY = {
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 1,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
}
BOX = (64, 64, 192, 208)


def build_models(small: bool, device: torch.device, dtype: torch.dtype) -> MuseTalkModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    whisper = WhisperModel(WhisperConfig(**(TINY_WHISPER if small else WHISPER_TINY))).get_encoder()
    models = MuseTalkModels(
        unet=UNet2DConditionModel(**(TINY_UNET if small else FULL_UNET)),
        vae=AutoencoderKL(**(TINY_VAE if small else FULL_VAE)),
        whisper=whisper,
        feature_extractor=WhisperFeatureExtractor(feature_size=80),
        positional=PositionalEncoding(384),
        device=device,
        dtype=dtype,
    )
    for module in (models.unet, models.vae, models.whisper, models.positional):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return models


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_frame(renderer: MuseTalkRenderer) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    latents, feats = torch.randn(1, 8, 32, 32), torch.randn(1, 50, 384)
    with FlopCounterMode(display=False) as counter:
        renderer.infer(latents, feats)
    return float(counter.get_total_flops())


def frames_per_second(renderer: MuseTalkRenderer, batch: int, iters: int) -> float:
    device = renderer.models.device
    latents = torch.randn(batch, 8, 32, 32, device=device)
    feats = torch.randn(batch, 50, 384, device=device)
    renderer.infer(latents, feats)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        renderer.infer(latents, feats)
    sync(device)
    return batch * iters / (time.perf_counter() - start)


def thread_streams(renderer: MuseTalkRenderer, avatar, batching: bool, max_batch: int) -> StreamOpener:
    """Streams on frame workers in this process: one batching worker, or one loop per session."""

    def open_streams(streams: int) -> tuple[list[ServedStream], Callable[[], None]]:
        workers = (
            [FrameWorker(renderer, max_batch=max_batch)]
            if batching
            else [FrameWorker(renderer, max_batch=1, name=f"loop-{i}") for i in range(streams)]
        )
        for w in workers:
            w.start()
        opened: list[ServedStream] = [
            workers[i % len(workers)].open_stream(avatar, StreamMode.LIVE, buffer_frames=1000) for i in range(streams)
        ]

        def close() -> None:
            for w in workers:
                w.stop()

        return opened, close

    return open_streams


def live_trial(open_streams: StreamOpener, streams: int, seconds: float) -> dict[str, float]:
    """``streams`` live sessions, each fed ``seconds`` of audio at once; frames are due at 25 fps on
    each stream's clock. Returns the 95th-percentile and worst lateness of speech frames after each
    stream's first half second (start-up: the first audio window and batch) and the mean start-up."""
    opened, close = open_streams(streams)
    audio = (0.1 * np.sin(np.arange(int(seconds * FEATURE_SAMPLE_RATE)) / 7.0)).astype(np.float32)
    for s in opened:
        s.feed(audio, np.repeat(audio, 3))
        s.end_audio()
    expected = len(audio) // 640
    lateness: list[float] = []
    first: list[float] = []
    seen = [0] * streams
    warmup = FPS // 2
    deadline = time.monotonic() + seconds * 3 + 30
    while min(seen) < expected and time.monotonic() < deadline:
        now = time.monotonic()
        for k, s in enumerate(opened):
            for frame in s.take_frames():
                if frame.speech:
                    seen[k] += 1
                    if seen[k] == 1:
                        first.append(now - s.started_at)
                    elif seen[k] > warmup:
                        lateness.append(now - (s.started_at + frame.index / FPS))
        time.sleep(0.002)
    for s in opened:
        s.cancel()
    close()
    if min(seen) < expected:
        return {"late_p95_s": float("inf"), "late_max_s": float("inf"), "first_frame_s": float("inf")}
    lateness.sort()
    return {
        "late_p95_s": lateness[int(0.95 * (len(lateness) - 1))],
        "late_max_s": lateness[-1],
        "first_frame_s": statistics.mean(first),
    }


def sustained_streams(
    open_streams: StreamOpener, seconds: float, limit: int, tolerance: float
) -> tuple[int, list[dict[str, float]]]:
    """The most streams (doubling, then one by one) whose p95 lateness stays under ``tolerance``."""
    best, trials, n = 0, [], 1
    while n <= limit:
        result = {"streams": n, **live_trial(open_streams, n, seconds)}
        trials.append(result)
        if result["late_p95_s"] > tolerance:
            break
        best = n
        n *= 2
    step = best + 1
    while best and step < min(2 * best, limit + 1):
        result = {"streams": step, **live_trial(open_streams, step, seconds)}
        trials.append(result)
        if result["late_p95_s"] > tolerance:
            break
        best, step = step, step + 1
    return best, trials


def write_models(root: Path, small: bool) -> Path:
    """Random networks of the benchmark's size in the models layout (what a worker loads)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from inference.musetalk.layout import ModelLayout

    layout = ModelLayout(root)
    unet_config = TINY_UNET if small else FULL_UNET
    torch.manual_seed(0)
    layout.unet_config.parent.mkdir(parents=True, exist_ok=True)
    layout.unet_config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **unet_config}))
    torch.save(UNet2DConditionModel(**unet_config).state_dict(), layout.unet_weights)
    AutoencoderKL(**(TINY_VAE if small else FULL_VAE)).save_pretrained(str(layout.vae_dir), safe_serialization=False)
    whisper = TINY_WHISPER if small else WHISPER_TINY
    WhisperModel(WhisperConfig(**whisper)).save_pretrained(str(layout.whisper_dir))
    WhisperFeatureExtractor(feature_size=whisper["num_mel_bins"]).save_pretrained(str(layout.whisper_dir))
    return root


def process_trials(args: argparse.Namespace, dtype: str, source: Path, folder: Path) -> dict[str, object]:
    """The batched live trials with the renderer in a spawned worker process."""
    from inference.pool import EngineConfig
    from inference.procs.process_pool import ProcessEnginePool

    started = time.perf_counter()
    models = write_models(folder / "models", args.small)
    config = EngineConfig(
        kind="musetalk", models_dir=models, device=args.device, dtype=dtype, workers=1,
        max_batch=args.stream_batch, data_dir=folder / "data",
    )
    pool = ProcessEnginePool(config)
    try:
        x, y, x2, y2 = BOX
        avatar = pool.avatars.prepare("bench", "Bench", source, face_box=(x, y, x2 - x, y2 - y))
        loaded = pool.avatars.get(avatar.id)
        assert loaded is not None
        print(f"  process mode: models written and one worker started in {time.perf_counter() - started:.0f} s")

        def open_streams(streams: int) -> tuple[list[ServedStream], Callable[[], None]]:
            opened: list[ServedStream] = [pool.open_stream(loaded, StreamMode.LIVE, buffer_frames=1000)
                                          for _ in range(streams)]
            return opened, lambda: None

        best, trials = sustained_streams(open_streams, args.seconds, args.max_streams, args.tolerance)
    finally:
        pool.stop()
    return {"sustained_streams": best, "trials": trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny widths (CPU smoke run)")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="dense peak of the device for MFU")
    parser.add_argument("--seconds", type=float, default=6.0, help="audio per stream in the live trials")
    parser.add_argument("--max-streams", type=int, default=64)
    parser.add_argument("--stream-batch", type=int, default=16, help="max_batch of the batching worker")
    parser.add_argument("--tolerance", type=float, default=0.1, help="p95 lateness (s) that still counts as real time")
    parser.add_argument("--chunk-frames", type=int, default=4, help="live audio chunk (frames)")
    parser.add_argument("--skip-streams", action="store_true")
    parser.add_argument("--process", action="store_true", help="also run the live trials in a worker process")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "size": "small" if args.small else "full",
        "throughput": [],
        "streams": {},
    }
    for name in args.dtypes.split(","):
        dtype = resolve_dtype(name)
        models = build_models(args.small, device, dtype)
        with tempfile.TemporaryDirectory() as tmp:
            renderer = MuseTalkRenderer(models, tmp, detector=lambda frame: BOX, live_chunk_frames=args.chunk_frames)
            flops = flops_per_frame(renderer)
            print(
                f"[{name}] UNet {sum(p.numel() for p in models.unet.parameters()) / 1e6:.0f} M params, "
                f"{flops / 1e12:.3f} TFLOP/frame measured (reference {REFERENCE_TFLOP_PER_FRAME})"
            )
            for batch in (int(b) for b in args.batches.split(",")):
                fps = frames_per_second(renderer, batch, args.iters)
                mfu = fps * flops / (args.peak_tflops * 1e12)
                row = {
                    "dtype": name,
                    "batch": batch,
                    "frames_per_s": round(fps, 2),
                    "mfu": round(mfu, 4),
                    "streams_at_25fps": round(fps / FPS, 1),
                }
                report["throughput"].append(row)  # type: ignore[union-attr]
                print(f"  batch {batch:3d}: {fps:8.1f} frames/s  MFU {100 * mfu:5.1f}%  = {fps / FPS:5.1f} streams")
            if args.skip_streams:
                continue
            image = np.full((288, 256, 3), 128, np.uint8)
            cv2.circle(image, (128, 136), 60, (200, 160, 140), -1)
            source = Path(tmp) / "face.png"
            cv2.imwrite(str(source), image)
            avatar = renderer.prepare_avatar("bench", "Bench", str(source))
            results = {}
            for label, batching in (("batched_worker", True), ("loop_per_session", False)):
                best, trials = sustained_streams(
                    thread_streams(renderer, avatar, batching, args.stream_batch), args.seconds, args.max_streams,
                    args.tolerance,
                )
                results[label] = {"sustained_streams": best, "trials": trials}
                print(
                    f"  {label}: {best} concurrent 25 fps streams "
                    f"(p95 lateness per trial: {[round(t['late_p95_s'], 3) for t in trials]})"
                )
            if args.process:
                results["batched_worker_process"] = process_trials(args, name, source, Path(tmp))
                print(f"  batched_worker_process: {results['batched_worker_process']['sustained_streams']} "
                      "concurrent 25 fps streams")
            report["streams"][name] = results  # type: ignore[index]
        del models, renderer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    best = max(report["throughput"], key=lambda r: r["frames_per_s"])  # type: ignore[arg-type, index]
    print(f"best: {best}; median MFU {statistics.median(r['mfu'] for r in report['throughput']):.3f}")  # type: ignore[union-attr, index]


if __name__ == "__main__":
    main()
