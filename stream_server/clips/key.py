"""The content address of a clip: a hash of everything that shapes its bytes."""

from __future__ import annotations

import hashlib
import json
import re

KEY_RE = re.compile(r"^[0-9a-f]{40}$")


def clip_key(**parts: object) -> str:
    """The key of the clip made from ``parts`` (the engine and its model version, the avatar and
    its revision, the audio's hash, the output settings): equal parts, equal key."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:40]


def is_key(value: str) -> bool:
    return KEY_RE.match(value) is not None
