"""Process mode: one supervised worker process per device, each rendering and encoding its streams.

The server process keeps only handles (``ProcessEnginePool``, ``WorkerHandle``, ``RemoteStream``,
``AvatarHandle``): audio goes down a pipe, encoded fMP4 segments come back up it, and raw frames
(for WebRTC) come back through a shared-memory ring that the server owns, so no frame array is
ever pickled. The worker that renders a stream is also its encoder: there is no separate encoder
pool, and a frame leaves the worker only when WebRTC needs it raw.
"""
