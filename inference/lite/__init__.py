"""The lite engine: the embedded default when no MuseTalk weights are configured.

CPU only and without weights: the avatar's mouth and jaw are animated from the audio's loudness
and a rough viseme cue (round / open / wide from the spectral centroid). It is an honest
placeholder, not lip-sync AI, and renders a 512-pixel avatar at well over 1000 frames/s per core.

Modules: ``featurizer`` (audio -> per-frame ``LiteFeatures``), ``prepare`` (source -> frames and
mouth geometry, faces found by ``inference.face``), ``avatar`` (``LiteAvatar`` and its files),
``lips`` (where the lips part, from their colour), ``rig`` (the warp fields around the mouth),
``renderer`` (``LiteRenderer``).
"""

from inference.face import FaceDetectorUnavailable
from inference.lite.avatar import LiteAvatar
from inference.lite.featurizer import FeaturizerConfig, LiteFeatures, LiteFeaturizer
from inference.lite.prepare import PreparationError, PrepareParams
from inference.lite.renderer import LiteRenderer

__all__ = [
    "FaceDetectorUnavailable",
    "FeaturizerConfig",
    "LiteAvatar",
    "LiteFeatures",
    "LiteFeaturizer",
    "LiteRenderer",
    "PreparationError",
    "PrepareParams",
]
