"""The MuseTalk renderer: frames of many sessions and avatars through one UNet + VAE pass."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from inference.avatars.layout import FaceBox
from inference.dwpose import WEIGHTS as DWPOSE_WEIGHTS
from inference.dwpose import WholeBodyPose
from inference.engine import FrameRequest, Renderer
from inference.musetalk.audio import WhisperSteps, clip_features
from inference.musetalk.avatar import AVATAR_FILES, MuseTalkAvatar, load_avatar, recorded_version, save_avatar
from inference.musetalk.blend import paste_face
from inference.musetalk.face import (
    EXTRA_MARGIN,
    Box,
    FaceDetector,
    FeatureFaceDetector,
    LandmarkFaceDetector,
    box_from_detection,
)
from inference.musetalk.featurizer import WhisperFeaturizer
from inference.musetalk.masks import CHEEK_WIDTH, EXPAND, UPPER_BOUNDARY, FaceParser
from inference.musetalk.models import MuseTalkModels, load_models
from inference.musetalk.prepare import prepare, read_frames

# 2: boxes tracked with inference.face; 3: v1.5's cheek width (90), PIL-like resizes, v1 rules;
# 4: landmark boxes (DWPose) or the lip- and chin-anchored estimate
PREPARATION_VERSION = "musetalk-v15-prep-4"
DECODERS = ("sd-vae", "taesd")

log = logging.getLogger(__name__)


class MuseTalkRenderer(Renderer):
    """MuseTalk v1.5 behind the engine interface.

    ``render`` stacks the latents and audio windows of every request, whatever its session or
    avatar, runs the UNet once (t = 0, one step) and the decoder once, then blends each face into
    its own avatar frame.

    Avatar preparation follows the loaded version's rules: v1.5 puts ``EXTRA_MARGIN`` (10 px) below
    the chin and blends with "jaw" masks; v1 (``models.version == "v1"``) has no margin and "raw"
    masks. Face boxes come from DWPose's landmarks when ``dwpose/dw-ll_ucoco_384.pth`` is in the
    models folder (as in MuseTalk's download), else from the offline estimate (logged once).

    ``avatar_root`` is the store's root, for the id-based ``Renderer.prepare_avatar``/``load_avatar``.
    """

    name = "musetalk"

    def __init__(
        self,
        models: MuseTalkModels,
        avatar_root: str | Path,
        *,
        max_batch: int = 8,
        decoder: str = "sd-vae",
        live_chunk_frames: int = 4,
        detector: FaceDetector | None = None,
        seed: int = 0,
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
        if decoder == "taesd" and models.taesd is None:
            raise ValueError("decoder 'taesd' needs the models loaded with taesd=True")
        self.models = models
        self.avatar_root = Path(avatar_root)
        self.max_batch = max_batch
        self.decoder = decoder
        self.live_chunk_frames = live_chunk_frames
        self._detector = detector
        self.seed = seed
        self.extra_margin = EXTRA_MARGIN if models.version == "v15" else 0
        self.mask_mode = "jaw" if models.version == "v15" else "raw"
        self.audio = WhisperSteps(models.whisper, models.feature_extractor, models.device, models.dtype)
        self.timestep = torch.zeros((), device=models.device, dtype=torch.long)

    @classmethod
    def from_folder(
        cls,
        models_dir: str | Path,
        avatar_root: str | Path,
        *,
        device: str | torch.device = "cuda",
        dtype: str | torch.dtype = "fp16",
        version: str = "v15",
        decoder: str = "sd-vae",
        face_parsing: bool | None = None,
        **options: object,
    ) -> MuseTalkRenderer:
        """Load the models from ``models_dir`` (raises ``MissingModelsError`` naming missing files)."""
        models = load_models(
            models_dir, device=device, dtype=dtype, version=version, face_parsing=face_parsing, taesd=decoder == "taesd"
        )
        return cls(models, avatar_root, decoder=decoder, **options)  # type: ignore[arg-type]

    # ----- avatars -----

    @property
    def preparation_version(self) -> str:
        """A hash of everything that shapes a prepared avatar: when it changes, avatars are redone."""
        vae = cast(Mapping[str, Any], self.models.vae.config)
        key = {
            "prep": PREPARATION_VERSION,
            "faces": self._face_method(),
            "margin": self.extra_margin,
            "seed": self.seed,
            "parsing": self.models.face_parser is not None,
            "mask": [self.mask_mode, CHEEK_WIDTH, EXPAND, UPPER_BOUNDARY],
            "vae": {k: vae[k] for k in ("block_out_channels", "latent_channels", "scaling_factor") if k in vae},
            "vae_params": sum(p.numel() for p in self.models.vae.parameters()),
            "vae_probe": float(next(self.models.vae.parameters()).detach().float().flatten()[:16].sum()),
            "dtype": str(self.models.dtype),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def avatar_files(self) -> tuple[str, ...]:
        return AVATAR_FILES

    @property
    def detector(self) -> FaceDetector:
        """The detector given, else DWPose's landmarks when its weights are there, else the offline
        estimate."""
        if self._detector is None:
            self._detector = self._default_detector()
        return self._detector

    @property
    def dwpose_weights(self) -> Path | None:
        """DWPose's checkpoint in the models folder, if it is there."""
        root = self.models.layout.root if self.models.layout is not None else None
        weights = root / DWPOSE_WEIGHTS if root is not None else None
        return weights if weights is not None and weights.is_file() else None

    def _face_method(self) -> str:
        """How faces will be found, without loading DWPose (for the preparation version)."""
        if self._detector is not None:
            return str(getattr(self._detector, "method", "given"))
        return "landmarks" if self.dwpose_weights is not None else FeatureFaceDetector.method

    def _default_detector(self) -> FaceDetector:
        fallback = FeatureFaceDetector(extra_margin=self.extra_margin)
        weights = self.dwpose_weights
        if weights is None:
            log.warning(
                "DWPose's weights (%s) are not there: face boxes are estimated from a Haar face box, the "
                "lips and the chin instead of MuseTalk's landmarks (see docs/benchmarks.md for how close)",
                DWPOSE_WEIGHTS,
            )
            return fallback
        pose = WholeBodyPose.from_file(weights, device=self.models.device)
        return LandmarkFaceDetector(pose, fallback, extra_margin=self.extra_margin)

    def prepare_avatar_dir(
        self,
        directory: Path,
        avatar_id: str,
        name: str,
        source: Path | str,
        *,
        face_box: FaceBox | None = None,
    ) -> MuseTalkAvatar:
        detector = self.detector
        if face_box is not None:
            detector = _fixed_face(face_box, self.extra_margin)
        parser = None
        if self.models.face_parser is not None:
            parser = FaceParser(self.models.face_parser, self.models.device, mode=self.mask_mode)
        data = prepare(self.models, read_frames(source), detector, parser=parser, seed=self.seed)
        avatar = MuseTalkAvatar(avatar_id, name, data, self.preparation_version)
        save_avatar(Path(directory), avatar)
        return avatar.to(self.models.device, self.models.dtype)

    def load_avatar_dir(self, directory: Path) -> MuseTalkAvatar | None:
        avatar = load_avatar(Path(directory), self.preparation_version)
        return avatar.to(self.models.device, self.models.dtype) if avatar is not None else None

    def recorded_version(self, directory: Path) -> str | None:
        return recorded_version(Path(directory))

    # ----- audio -----

    def new_featurizer(self, mode: str = "live") -> WhisperFeaturizer:
        """Live features by default (bounded look-ahead, see ``featurizer``); ``mode="clip"`` waits
        for whole 30 s segments so that features are exactly the whole-clip ones."""
        return WhisperFeaturizer(
            self.audio,
            chunk_frames=self.live_chunk_frames,
            exact=mode == "clip",
        )

    def clip_features(self, audio: np.ndarray) -> list[torch.Tensor]:
        """Features of a whole clip at once, as MuseTalk computes them."""
        return list(clip_features(self.audio, audio).unbind(0))

    # ----- frames -----

    @torch.inference_mode()
    def infer(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """One batch through the UNet and the decoder: ``[B, 8, 32, 32]`` latents and ``[B, 50, 384]``
        audio windows to ``[B, 256, 256, 3]`` uint8 faces on the device."""
        m = self.models
        audio = m.positional(features.to(m.device, m.dtype))
        pred = m.unet(latents.to(m.device, m.dtype), self.timestep, encoder_hidden_states=audio).sample
        if self.decoder == "taesd":
            assert m.taesd is not None
            image = m.taesd.decode(pred).sample
        else:
            image = m.vae.decode(pred / m.vae_scaling).sample
        faces: torch.Tensor = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return faces.permute(0, 2, 3, 1)

    def render(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        avatars = [_musetalk_avatar(r.avatar) for r in requests]
        sources = [a.source_index(r.cycle_index) for a, r in zip(avatars, requests, strict=True)]
        todo = [i for i, (a, s) in enumerate(zip(avatars, sources, strict=True)) if a.has_face[s]]
        images: list[np.ndarray] = [a.data.frames[s] for a, s in zip(avatars, sources, strict=True)]
        for start in range(0, len(todo), self.max_batch):
            chunk = todo[start : start + self.max_batch]
            device, dtype = self.models.device, self.models.dtype
            latents = torch.stack([avatars[i].latents_on(device, dtype)[sources[i]] for i in chunk])
            features = torch.stack([_as_tensor(requests[i].features) for i in chunk])
            faces = self.infer(latents, features).cpu().numpy()
            for i, face in zip(chunk, faces, strict=True):
                avatar, s = avatars[i], sources[i]
                box, alpha = avatar.data.boxes[s], avatar.alphas[s]
                assert box is not None and alpha is not None
                images[i] = paste_face(avatar.data.frames[s], face, box, alpha)
        return images


def _fixed_face(face_box: FaceBox, extra_margin: int) -> FaceDetector:
    x, y, w, h = (round(v) for v in face_box)

    def detector(rgb: np.ndarray) -> Box | None:
        return box_from_detection(x, y, w, h, rgb.shape[0], extra_margin)

    return detector


def _musetalk_avatar(avatar: object) -> MuseTalkAvatar:
    if not isinstance(avatar, MuseTalkAvatar):
        raise TypeError(f"the musetalk renderer cannot render a {type(avatar).__name__}")
    return avatar


def _as_tensor(features: object) -> torch.Tensor:
    return features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
