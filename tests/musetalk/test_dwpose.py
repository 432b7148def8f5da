"""DWPose in plain PyTorch: strict loading of a checkpoint in mmpose's layout, top-down geometry,
SimCC decoding, and MuseTalk's landmark box on its face keypoints."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from musetalk_helpers import face_image

from inference.dwpose import FACE, TINY, CheckpointError, WholeBodyPose, load_rtmpose
from inference.dwpose.pose import CropBox, decode_simcc, flip_indices
from inference.dwpose.tiny import tiny_state, write_tiny_dwpose
from inference.musetalk.face import (
    EXTRA_MARGIN,
    FoundFace,
    LandmarkFaceDetector,
    box_from_landmarks,
    find_faces,
    with_margin,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dwpose(tmp_path_factory.mktemp("dwpose") / "dwpose" / "dw-ll_ucoco_384.pth", seed=3)


def test_checkpoint_keys_are_mmposes() -> None:
    keys = set(tiny_state(0))
    for key in (
        "backbone.stem.0.conv.weight",
        "backbone.stem.0.bn.running_var",
        "backbone.stage1.1.blocks.0.conv2.depthwise_conv.conv.weight",
        "backbone.stage4.1.conv2.conv.weight",  # the SPP bottleneck of the last stage
        "backbone.stage4.2.attention.fc.bias",
        "head.final_layer.weight",
        "head.mlp.0.g",
        "head.gau.uv.weight",
        "head.gau.res_scale.scale",
        "head.cls_x.weight",
        "head.cls_y.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith("backbone.stages") for k in keys)


def test_loads_strictly_and_runs(checkpoint: Path) -> None:
    model = load_rtmpose(checkpoint, TINY)
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    x, y = model(torch.zeros(1, 3, 384, 288))
    assert x.shape == (1, 133, 576) and y.shape == (1, 133, 768)


def test_a_missing_or_unexpected_key_fails_loudly(tmp_path: Path) -> None:
    state = tiny_state(0)
    missing = dict(state)
    del missing["head.gau.uv.weight"]
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing 1: head\.gau\.uv\.weight"):
        load_rtmpose(tmp_path / "missing.pth", TINY)
    extra = {**state, "head.gau.w": torch.zeros(3)}
    torch.save({"state_dict": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected 1: head\.gau\.w"):
        load_rtmpose(tmp_path / "extra.pth", TINY)
    torch.save(state, tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_rtmpose(tmp_path / "bare.pth", TINY)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_rtmpose(tmp_path / "extra.pth")  # the tiny weights are not DWPose-l's


def test_simcc_peak_maps_to_its_pixel() -> None:
    """A peak in bin 2x of x and 2y of y is pixel (x, y) of the input, then of the frame."""
    simcc_x, simcc_y = np.zeros((133, 576), np.float32), np.zeros((133, 768), np.float32)
    simcc_x[5, 301], simcc_y[5, 120] = 0.9, 0.7
    locs, scores = decode_simcc(simcc_x, simcc_y, 2.0)
    assert locs[5].tolist() == [150.5, 60.0] and scores[5] == pytest.approx(0.7)
    assert locs[0].tolist() == [-0.5, -0.5] and scores[0] == 0  # no peak: mmpose's (-1, -1) / split
    crop = CropBox.around((100.0, 50.0, 340.0, 370.0), (288, 384))
    assert crop.size.tolist() == pytest.approx([300.0, 400.0])  # 1.25 x (240, 320), already 3:4
    frame = crop.to_frame(locs[5:6], (288, 384))[0]
    assert frame.tolist() == pytest.approx([70.0 + 150.5 * 300 / 288, 10.0 + 60.0 * 400 / 384])
    # the warp sends that frame point back to the input pixel
    warped = crop.to_input((288, 384)) @ np.array([*frame, 1.0])
    assert warped.tolist() == pytest.approx([150.5, 60.0], abs=1e-4)


def test_flip_indices_pair_left_and_right() -> None:
    flips = flip_indices()
    assert len(flips) == 133 and all(flips[flips[i]] == i for i in range(133))
    face = [f - 23 for f in flips[FACE]]
    assert face[0] == 16 and face[8] == 8 and face[29] == 29 and face[36] == 45 and face[48] == 54


def test_whole_pipeline_on_a_frame(checkpoint: Path) -> None:
    """Frame -> warp -> network (with the flip test) -> keypoints in frame pixels -> MuseTalk's box."""
    pose = WholeBodyPose(load_rtmpose(checkpoint, TINY))
    rgb = cv2.resize(face_image(1), (360, 400))
    keypoints = pose(rgb)
    assert keypoints.points.shape == (133, 2) and keypoints.scores.shape == (133,)
    # the whole frame, padded by 1.25 and grown to 3:4, is what the network sees: 450 x 600 around
    # the frame's centre; every keypoint lands in that region
    assert (np.abs(keypoints.points - [180.0, 200.0]) <= [225.0, 300.0]).all()
    assert np.ptp(keypoints.points[:, 0]) > 0 and np.ptp(keypoints.points[:, 1]) > 0
    # the flip test averages with the mirror image: a mirrored frame gives mirrored keypoints
    mirrored = pose(np.ascontiguousarray(rgb[:, ::-1]))
    flips = flip_indices()
    assert np.allclose(mirrored.scores, keypoints.scores[flips], atol=1e-4)
    # frames in one batch give what they give one by one
    both = pose.many([rgb, np.ascontiguousarray(rgb[:, ::-1])], batch=2)
    assert np.allclose(both[0].scores, keypoints.scores, atol=1e-4)
    assert np.allclose(both[1].scores, mirrored.scores, atol=1e-4)
    detector = LandmarkFaceDetector(pose, min_score=-np.inf)
    found = find_faces([rgb], detector)[0]
    rule = box_from_landmarks(keypoints.face)
    if rule is not None:
        assert found == FoundFace(with_margin(rule, rgb.shape, EXTRA_MARGIN), "landmarks")
    else:  # MuseTalk's fallback: the detector's box (here the offline estimate; none on this drawing)
        fallback = detector.fallback.find(rgb)
        assert found == (detector.fallback.face_box(rgb, fallback) if fallback is not None else None)
    assert find_faces([rgb], LandmarkFaceDetector(pose, min_score=np.inf)) == [None]
