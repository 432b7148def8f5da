"""Finished clips, addressed by what made them, so a repeated request is a cache hit.

``key`` makes the content address, ``store.ClipStore`` keeps whole clips (with their sidecar and
their avatar's index) on a backend: ``local`` (a folder, the default) or ``s3`` (any
S3-compatible object store, optionally behind a CDN).
"""

from __future__ import annotations

from stream_server.clips.key import KEY_RE, clip_key
from stream_server.clips.store import ClipStore, ClipWriter

__all__ = ["KEY_RE", "ClipStore", "ClipWriter", "clip_key"]
