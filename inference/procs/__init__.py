"""Process mode: one supervised worker process per device, each rendering and encoding its streams.

The server process keeps only handles (``ProcessEnginePool``, ``WorkerHandle``, ``RemoteStream``,
``AvatarHandle``): audio goes down a pipe, and encoded bytes come back up it: fMP4 segments for
MSE, and for WebRTC each frame's H.264 access unit with its audio, which aiortc only packetizes
(the server process encodes no video; it encodes the audio to Opus). No frame array is ever
pickled. The worker that renders a stream is also its encoder: there is no separate encoder pool,
and a frame leaves the worker raw only for a caller that asks for raw frames (a benchmark), through
a shared-memory ring that the server owns.
"""
