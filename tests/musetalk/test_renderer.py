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


class RecordingVAE(torch.nn.Module):
    """The tiny VAE's encoder, recorded; a decoder that returns a fixed picture: red channel 1.0,
    green 0.0, blue -3.0 (out of range), so the [-1, 1] -> uint8 mapping, the clamp and the channel
    order of the result can be read off the output."""

    def __init__(self, real: torch.nn.Module) -> None:
        super().__init__()
        self.real = real
        self.config = real.config
        self.encoded: list[torch.Tensor] = []
        self.decoded: list[torch.Tensor] = []

    def encode(self, x: torch.Tensor):
        self.encoded.append(x.clone())
        return self.real.encode(x)

    def decode(self, z: torch.Tensor):
        from types import SimpleNamespace

        self.decoded.append(z.clone())
        image = torch.empty(z.shape[0], 3, 256, 256, dtype=z.dtype)
        image[:, 0], image[:, 1], image[:, 2] = 1.0, 0.0, -3.0
        return SimpleNamespace(sample=image)


def test_decoded_faces_are_rgb_uint8_from_unscaled_latents(models, features, tmp_path: Path) -> None:
    from dataclasses import replace

    vae = RecordingVAE(models.vae)
    renderer = MuseTalkRenderer(replace(models, vae=vae), tmp_path, detector=lambda f: FACE_BOX)
    latents = torch.randn(2, 8, 32, 32)
    faces = renderer.infer(latents, torch.stack(features[:2]))
    # (x / 2 + 0.5).clamp(0, 1) * 255, rounded; no BGR flip: the frames are RGB
    assert faces.shape == (2, 256, 256, 3) and faces.dtype == torch.uint8
    assert faces.reshape(-1, 3).unique(dim=0).tolist() == [[255, 128, 0]]
    # the UNet ran once at t = 0 on the positional-encoded audio; the decoder got pred / 0.18215
    audio = models.positional(torch.stack(features[:2]))
    pred = models.unet(latents, torch.tensor([0]), encoder_hidden_states=audio).sample
    assert torch.allclose(vae.decoded[0], pred / 0.18215, atol=1e-5)
    # pasted into an RGB frame where the mask is full, the face is exactly that colour
    avatar = renderer.prepare_avatar("c", "C", str(write_image(tmp_path / "c.png", face_image(3))))
    out = renderer.render([FrameRequest(avatar, 0, features[0])])[0]
    full = avatar.alphas[0][..., 0] == 1.0
    assert full.sum() > 100
    x1, y1, x2, y2 = FACE_BOX
    assert (out[y1:y2, x1:x2][full] == [255, 128, 0]).all()


def test_the_vae_sees_rgb_crops_in_minus_one_to_one_with_the_lower_half_black(models, tmp_path: Path) -> None:
    """The masked and reference images MuseTalk encodes (``get_latents_for_unet``): the 256x256
    RGB crop scaled to [-1, 1], the masked one with rows 128-255 at -1; latents are a sample of the
    posterior (mean + std * noise from the seeded generator) times 0.18215."""
    from dataclasses import replace

    vae = RecordingVAE(models.vae)
    renderer = MuseTalkRenderer(replace(models, vae=vae), tmp_path, detector=lambda f: FACE_BOX, seed=5)
    frame = np.zeros((180, 200, 3), np.uint8)
    frame[..., 0] = 255  # pure red in RGB
    frame[..., 2] = 51
    avatar = renderer.prepare_avatar("red", "Red", str(write_image(tmp_path / "r.png", frame)))
    (pair,) = vae.encoded
    masked, whole = pair[0], pair[1]
    assert torch.allclose(whole[0], torch.ones(256, 256)) and torch.allclose(whole[1], -torch.ones(256, 256))
    assert torch.allclose(whole[2], torch.full((256, 256), 51 / 127.5 - 1))
    assert torch.equal(masked[:, :128], whole[:, :128])
    assert (masked[:, 128:] == -1).all()
    posterior = models.vae.encode(pair).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
    sample = (posterior.mean + posterior.std * noise) * 0.18215
    expected = torch.cat([sample[:1], sample[1:]], dim=1)[0]
    assert torch.allclose(avatar.data.latents[0], expected, atol=1e-5)
    assert not torch.allclose(avatar.data.latents[0, :4], posterior.mean[0] * 0.18215, atol=1e-3)


def test_bf16_render_on_the_cpu_is_close_to_fp32(models_dir: Path, models, features, tmp_path: Path) -> None:
    """The dtype comes from the configuration and reaches every network, the avatar latents too."""
    half = load_models(models_dir, device="cpu", dtype="bf16")
    fast = MuseTalkRenderer(half, tmp_path / "h", detector=lambda f: FACE_BOX)
    full = MuseTalkRenderer(models, tmp_path / "f", detector=lambda f: FACE_BOX)
    source = str(write_image(tmp_path / "a.png", face_image(2)))
    a16, a32 = fast.prepare_avatar("a", "A", source), full.prepare_avatar("a", "A", source)
    assert a16.data.latents.dtype is torch.bfloat16 and fast.preparation_version != full.preparation_version
    assert a16.latents_on(torch.device("cpu"), torch.float32).dtype is torch.float32
    assert a16.latents_on(torch.device("cpu"), torch.float32) is a16.latents_on(torch.device("cpu"), torch.float32)
    feats16 = fast.clip_features(speech_like(0.3))
    assert feats16[0].dtype is torch.bfloat16
    img16 = fast.render([FrameRequest(a16, 0, feats16[3])])[0]
    img32 = full.render([FrameRequest(a32, 0, full.clip_features(speech_like(0.3))[3])])[0]
    diff = np.abs(img16.astype(int) - img32.astype(int))
    assert diff.mean() < 4
