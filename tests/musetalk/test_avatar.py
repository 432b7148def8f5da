from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from musetalk_helpers import FACE_BOX, face_image, speech_like, write_image, write_video

from inference.engine import FrameRequest
from inference.musetalk import MuseTalkRenderer
from inference.musetalk.avatar import MuseTalkAvatar


def test_image_avatar(renderer: MuseTalkRenderer, tmp_path: Path) -> None:
    avatar = renderer.prepare_avatar("ann", "Ann", str(write_image(tmp_path / "a.png", face_image(1))))
    assert avatar.info.frames == avatar.cycle_length == 1
    assert (avatar.info.width, avatar.info.height) == (200, 180)
    assert avatar.data.latents.shape == (1, 8, 32, 32)
    assert avatar.data.boxes == [FACE_BOX] and avatar.data.mask_kind == "parsing"
    assert np.array_equal(avatar.idle_frame(5), face_image(1))


def test_masked_latent_is_the_crop_with_its_lower_half_black(renderer: MuseTalkRenderer, tmp_path: Path) -> None:
    top = face_image(1)
    other = top.copy()
    other[95:] = 255 - other[95:]  # only the lower half of the face crop (rows 90+), past the resampling
    a = renderer.prepare_avatar("a", "A", str(write_image(tmp_path / "a.png", top)))
    b = renderer.prepare_avatar("b", "B", str(write_image(tmp_path / "b.png", other)))
    masked_a, masked_b = a.data.latents[0, :4], b.data.latents[0, :4]
    ref_a, ref_b = a.data.latents[0, 4:], b.data.latents[0, 4:]
    assert torch.allclose(masked_a, masked_b, atol=1e-5)
    assert not torch.allclose(ref_a, ref_b, atol=1e-3)


def test_video_avatar_loops_forward_then_backward(renderer: MuseTalkRenderer, tmp_path: Path) -> None:
    frames = [np.roll(face_image(2), 3 * i, axis=1) for i in range(4)]
    avatar = renderer.prepare_avatar("vid", "Vid", str(write_video(tmp_path / "v.mp4", frames)))
    assert avatar.source_frames == avatar.info.frames == 4 and avatar.cycle_length == 6
    assert [avatar.source_index(i) for i in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert np.array_equal(avatar.idle_frame(4), avatar.data.frames[2])
    assert not avatar.idle_frame(0).flags.writeable


def test_round_trip_through_disk_in_safe_formats(renderer: MuseTalkRenderer, tmp_path: Path) -> None:
    source = write_video(tmp_path / "v.mp4", [face_image(3), face_image(4), face_image(5)])
    prepared = renderer.prepare_avatar("rt", "Round trip", str(source))
    folder = tmp_path / "avatars" / "rt" / "musetalk"
    names = {p.name for p in folder.iterdir()}
    assert names == {"avatar.json", "latents.safetensors", "masks.npz", "frames"}
    np.load(folder / "masks.npz", allow_pickle=False).close()
    loaded = renderer.load_avatar("rt")
    assert isinstance(loaded, MuseTalkAvatar) and loaded.info == prepared.info
    assert torch.equal(loaded.data.latents, prepared.data.latents)
    assert np.array_equal(loaded.data.frames, prepared.data.frames)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.alphas, prepared.alphas, strict=True))
    features = renderer.clip_features(speech_like(0.2))
    requests = [FrameRequest(a, 1, features[2]) for a in (prepared, loaded)]
    first, second = renderer.render(requests)
    assert np.array_equal(first, second)


def test_other_preparation_version_is_not_loaded(renderer: MuseTalkRenderer, models, tmp_path: Path) -> None:
    renderer.prepare_avatar("x", "X", str(write_image(tmp_path / "x.png", face_image(6))))
    assert renderer.load_avatar("x") is not None
    assert renderer.load_avatar("unknown") is None
    other = MuseTalkRenderer(models, renderer.avatar_root, detector=renderer.detector, seed=1)
    assert other.preparation_version != renderer.preparation_version
    assert other.load_avatar("x") is None


def test_frames_without_a_face_stay_in_step(models, tmp_path: Path) -> None:
    """A detector that misses frames 3..14: those within 5 frames of a hit borrow its box, frames
    8 and 9 stay without a face and are shown unchanged, in their place."""
    frames = [np.roll(face_image(7), i, axis=1) for i in range(20)]
    calls = iter(range(20))

    def detector(frame: np.ndarray):
        return None if 3 <= next(calls) <= 14 else FACE_BOX

    renderer = MuseTalkRenderer(models, tmp_path / "avatars", detector=detector)
    avatar = renderer.prepare_avatar("gap", "Gap", str(write_video(tmp_path / "g.mp4", frames)))
    has_face = avatar.has_face.tolist()
    assert has_face == [True] * 8 + [False] * 2 + [True] * 10
    assert avatar.data.latents.shape[0] == 20 and avatar.data.latents[8:10].abs().sum() == 0
    assert avatar.data.latents[7].abs().sum() > 0 and avatar.data.latents[10].abs().sum() > 0
    features = renderer.clip_features(speech_like(0.3))
    out = renderer.render([FrameRequest(avatar, 8, features[0]), FrameRequest(avatar, 10, features[1])])
    assert np.array_equal(out[0], avatar.idle_frame(8))
    assert not np.array_equal(out[1], avatar.idle_frame(10))


def test_no_face_at_all_is_an_error(models, tmp_path: Path) -> None:
    renderer = MuseTalkRenderer(models, tmp_path / "avatars", detector=lambda frame: None)
    with pytest.raises(ValueError, match="no face"):
        renderer.prepare_avatar("none", "None", str(write_image(tmp_path / "n.png", face_image(8))))
    assert renderer.load_avatar("none") is None


@pytest.mark.parametrize("bad", ["../up", "a/b", "", ".."])
def test_avatar_ids_cannot_escape_the_folder(renderer: MuseTalkRenderer, bad: str) -> None:
    with pytest.raises(ValueError, match="avatar id"):
        renderer.load_avatar(bad)


def test_geometric_masks_without_parsing_weights(models, tmp_path: Path) -> None:
    from dataclasses import replace

    renderer = MuseTalkRenderer(replace(models, face_parser=None), tmp_path / "avatars", detector=lambda f: FACE_BOX)
    avatar = renderer.prepare_avatar("geo", "Geo", str(write_image(tmp_path / "g.png", face_image(9))))
    assert avatar.data.mask_kind == "geometric"
    alpha = avatar.alphas[0][..., 0]
    assert alpha.shape == (120, 100) and alpha[:30].max() == 0 and alpha[100:110, 45:55].min() > 0.5


def test_the_avatar_store_owns_the_folder(renderer: MuseTalkRenderer, tmp_path: Path) -> None:
    """Through the store (the server's way): ``<root>/<id>/musetalk`` beside the source; a damaged
    avatar is prepared again from the stored source; the id-based methods find the same files."""
    from inference.avatars.layout import STORE_FILE
    from inference.avatars.store import AvatarStore

    store = AvatarStore(renderer.avatar_root, renderer)
    source = write_video(tmp_path / "v.mp4", [face_image(13), face_image(14)])
    info = store.prepare("st", "Stored", source)
    assert info.ready and info.frames == 2
    folder = renderer.avatar_root / "st"
    assert sorted(p.name for p in folder.iterdir()) == ["musetalk", "source.mp4", STORE_FILE]
    assert renderer.load_avatar("st") is not None
    fresh = AvatarStore(renderer.avatar_root, renderer)
    assert fresh.get("st") is not None
    (folder / "musetalk" / "frames" / "00001.png").unlink()
    assert renderer.load_avatar("st") is None
    again = AvatarStore(renderer.avatar_root, renderer).get("st")
    assert isinstance(again, MuseTalkAvatar) and again.cycle_length == 2
    assert (folder / "musetalk" / "frames" / "00001.png").is_file()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    # a face box hint skips detection
    hint = (40.0, 30.0, 100.0, 100.0)
    hinted = renderer.prepare_avatar_dir(tmp_path / "hint", "h", "H", source, face_box=hint)
    assert hinted.data.boxes[0] == (40, 31, 140, 145)


def test_v1_models_prepare_avatars_by_v1_rules(models_dir: Path, renderer: MuseTalkRenderer, tmp_path: Path) -> None:
    """v1 has no extra margin below the chin and blends with "raw" parsing masks; an avatar
    prepared for one version is not served to the other."""
    from inference.musetalk import load_models

    v1 = MuseTalkRenderer(load_models(models_dir, version="v1"), renderer.avatar_root)
    assert (v1.extra_margin, v1.mask_mode) == (0, "raw")
    assert (renderer.extra_margin, renderer.mask_mode) == (10, "jaw")
    assert v1.detector.extra_margin == 0
    source = write_image(tmp_path / "a.png", face_image(15))
    hint = (40.0, 30.0, 100.0, 100.0)
    old = v1.prepare_avatar_dir(tmp_path / "v1", "a", "A", source, face_box=hint)
    new = renderer.prepare_avatar_dir(tmp_path / "v15", "a", "A", source, face_box=hint)
    assert old.data.boxes[0] == (40, 31, 140, 135) and new.data.boxes[0] == (40, 31, 140, 145)
    assert v1.preparation_version != renderer.preparation_version
    assert v1.load_avatar_dir(tmp_path / "v15") is None and renderer.load_avatar_dir(tmp_path / "v1") is None


def test_a_mask_that_does_not_fit_its_box_is_damage(renderer: MuseTalkRenderer, tmp_path: Path) -> None:
    renderer.prepare_avatar("m", "M", str(write_image(tmp_path / "m.png", face_image(16))))
    folder = renderer.avatar_root / "m" / "musetalk"
    np.savez_compressed(folder / "masks.npz", m00000=np.zeros((10, 10), np.uint8))
    assert renderer.load_avatar("m") is None
