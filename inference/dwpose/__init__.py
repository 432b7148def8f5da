"""DWPose (RTMPose-l whole-body keypoints) in plain PyTorch, for MuseTalk's landmark face boxes.

``network``: the RTMPose modules with mmpose's key names; ``pose``: loading a checkpoint strictly,
top-down preprocessing and SimCC decoding (``WholeBodyPose``); ``tiny``: a small seeded checkpoint
in the same layout, for tests.
"""

from inference.dwpose.network import DWPOSE_L, TINY, RTMPose, RTMPoseConfig
from inference.dwpose.pose import FACE, WEIGHTS, CheckpointError, Keypoints, WholeBodyPose, load_rtmpose

__all__ = [
    "DWPOSE_L",
    "FACE",
    "TINY",
    "WEIGHTS",
    "CheckpointError",
    "Keypoints",
    "RTMPose",
    "RTMPoseConfig",
    "WholeBodyPose",
    "load_rtmpose",
]
