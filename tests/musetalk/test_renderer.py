from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from musetalk_helpers import FACE_BOX, face_image, speech_like, write_image, write_video

from inference.engine import AvatarInfo, FrameRequest, PreparedAvatar
from inference.musetalk import MuseTalkRenderer, load_models
from inference.musetalk.avatar import MuseTalkAvatar


def outside(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    keep = np.ones(image.shape[:2], dtype=bool)
    keep[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = False
    return image[keep]


@pytest.fixture
def avatars(renderer: MuseTalkRenderer, tmp_path: Path) -> tuple[MuseTalkAvatar, MuseTalkAvatar]:
    a = renderer.prepare_avatar("a", "A", str(write_image(tmp_path / "a.png", face_image(11))))
    frames = [np.roll(face_image(12, size=(200, 240)), 2 * i, axis=0) for i in range(3)]
    b = renderer.prepare_avatar("b", "B", str(write_video(tmp_path / "b.mp4", frames)))
    return a, b


@pytest.fixture(scope="module")
def features(models) -> list[torch.Tensor]:
    from inference.musetalk.audio import WhisperSteps, clip_features

    steps = WhisperSteps(models.whisper, models.feature_extractor, models.device, models.dtype)
    return list(clip_features(steps, speech_like(0.5, seed=4)).unbind(0))


def test_infer_shapes(renderer: MuseTalkRenderer, features) -> None:
    faces = renderer.infer(torch.randn(3, 8, 32, 32), torch.stack(features[:3]))
    assert faces.shape == (3, 256, 256, 3) and faces.dtype == torch.uint8


def test_a_frame_in_a_mixed_batch_equals_the_frame_alone(renderer, avatars, features) -> None:
    a, b = avatars
    requests = [
        FrameRequest(b, 4, features[0]),
        FrameRequest(a, 0, features[1]),
        FrameRequest(b, 1, features[2]),
        FrameRequest(a, 0, features[3]),
        FrameRequest(b, 5, features[4]),
    ]
    batched = renderer.render(requests)
    for request, image in zip(requests, batched, strict=True):
        alone = renderer.render([request])[0]
        assert image.shape == alone.shape
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1


def test_two_avatars_in_one_batch_each_get_their_own_face(renderer, avatars, features) -> None:
    a, b = avatars
    out_a, out_b = renderer.render([FrameRequest(a, 0, features[5]), FrameRequest(b, 2, features[5])])
    assert out_a.shape == (180, 200, 3) and out_b.shape == (200, 240, 3)
    # outside its face box each frame is exactly its own avatar's frame; inside, a new face
    assert np.array_equal(outside(out_a, FACE_BOX), outside(a.idle_frame(0), FACE_BOX))
    assert np.array_equal(outside(out_b, FACE_BOX), outside(b.idle_frame(2), FACE_BOX))
    assert not np.array_equal(out_a, a.idle_frame(0)) and not np.array_equal(out_b, b.idle_frame(2))
    swapped = renderer.render([FrameRequest(b, 2, features[5]), FrameRequest(a, 0, features[5])])
    assert np.abs(swapped[1].astype(int) - out_a.astype(int)).max() <= 1


def test_the_audio_drives_the_mouth(renderer, avatars, features) -> None:
    a, _ = avatars
    one, two = renderer.render([FrameRequest(a, 0, features[0]), FrameRequest(a, 0, features[9])])
    x1, y1, x2, y2 = FACE_BOX
    lower = slice((y1 + y2) // 2 + 15, y2 - 5), slice(x1 + 20, x2 - 20)
    assert np.abs(one[lower].astype(int) - two[lower].astype(int)).max() > 0


def test_batches_larger_than_max_batch_are_split(models, avatars, features, tmp_path: Path) -> None:
    a, b = avatars
    requests = [FrameRequest(b if i % 2 else a, i, features[i]) for i in range(7)]
    small = MuseTalkRenderer(models, tmp_path / "x", max_batch=2, detector=lambda f: FACE_BOX)
    big = MuseTalkRenderer(models, tmp_path / "x", max_batch=8, detector=lambda f: FACE_BOX)
    for x, y in zip(small.render(requests), big.render(requests), strict=True):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_a_face_box_leaving_the_frame(models, features, tmp_path: Path) -> None:
    box = (-30, -20, 70, 100)
    renderer = MuseTalkRenderer(models, tmp_path / "avatars", detector=lambda f: box)
    avatar = renderer.prepare_avatar("edge", "Edge", str(write_image(tmp_path / "e.png", face_image(13))))
    assert avatar.alphas[0].shape == (120, 100, 1)
    out = renderer.render([FrameRequest(avatar, 0, features[1])])[0]
    assert out.shape == (180, 200, 3)
    assert np.array_equal(outside(out, box), outside(avatar.idle_frame(0), box))
    assert not np.array_equal(out[:100, :70], avatar.idle_frame(0)[:100, :70])


def test_taesd_decoder(models, avatars, features, tmp_path: Path) -> None:
    a, _ = avatars
    fast = MuseTalkRenderer(models, tmp_path / "x", decoder="taesd")
    out = fast.render([FrameRequest(a, 0, features[0])])[0]
    assert out.shape == (180, 200, 3)
    assert np.array_equal(outside(out, FACE_BOX), outside(a.idle_frame(0), FACE_BOX))
    with pytest.raises(ValueError, match="decoder"):
        MuseTalkRenderer(models, tmp_path / "x", decoder="nope")


def test_renderer_from_folder(models_dir: Path, tmp_path: Path) -> None:
    renderer = MuseTalkRenderer.from_folder(models_dir, tmp_path, device="cpu", dtype="fp32", max_batch=4)
    assert renderer.name == "musetalk" and renderer.max_batch == 4
    assert renderer.new_featurizer().exact is False and renderer.new_featurizer("clip").exact is True


def test_other_avatars_are_refused(renderer, features) -> None:
    class Other(PreparedAvatar):
        info = AvatarInfo("o", "O", 1, 8, 8, True)

        def idle_frame(self, cycle_index: int) -> np.ndarray:
            return np.zeros((8, 8, 3), np.uint8)

    with pytest.raises(TypeError, match="musetalk"):
        renderer.render([FrameRequest(Other(), 0, features[0])])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_mixed_batch_on_the_gpu(models_dir: Path, tmp_path: Path, dtype: str) -> None:
    models = load_models(models_dir, device="cuda", dtype=dtype)
    renderer = MuseTalkRenderer(models, tmp_path, detector=lambda f: FACE_BOX)
    a = renderer.prepare_avatar("a", "A", str(write_image(tmp_path / "a.png", face_image(1))))
    b = renderer.prepare_avatar("b", "B", str(write_image(tmp_path / "b.png", face_image(2))))
    feats = renderer.clip_features(speech_like(0.3))
    requests = [FrameRequest(a, 0, feats[0]), FrameRequest(b, 0, feats[1]), FrameRequest(a, 0, feats[2])]
    for request, image in zip(requests, renderer.render(requests), strict=True):
        assert np.abs(image.astype(int) - renderer.render([request])[0].astype(int)).max() <= 2
