"""Pose conditions for the OpenPose ControlNet: skeleton drawing and an optional DWPose (ONNX) pose estimator.

:func:`pose_condition` turns a user's pose image into the condition image: a ready skeleton passes through, a
photo goes through :class:`DWPoseEstimator` (YOLOX-L + RTMPose whole-body, weights from ``yzd-v/DWPose``) and
:func:`draw_openpose`. Importing this package loads neither onnxruntime nor any model.
"""

from .dwpose import (
    DETECTOR_FILE,
    HUB_REPO,
    POSE_FILE,
    POSE_MODELS_ENV,
    DWPoseEstimator,
    default_pose_estimator,
    default_pose_model_dir,
    find_pose_models,
    resolve_pose_model_dir,
    wholebody_to_openpose,
)
from .openpose import (
    BODY_COLORS,
    HAND_EDGES,
    LIMB_SEQUENCE,
    OPENPOSE_BODY_NAMES,
    NoPoseError,
    PoseKeypoints,
    draw_openpose,
    looks_like_skeleton,
    pad_geometry,
    pad_to_size,
    pose_condition,
)
from .preprocessor import PosePreprocessor

__all__ = [
    "BODY_COLORS",
    "DETECTOR_FILE",
    "DWPoseEstimator",
    "HAND_EDGES",
    "HUB_REPO",
    "LIMB_SEQUENCE",
    "NoPoseError",
    "OPENPOSE_BODY_NAMES",
    "POSE_FILE",
    "POSE_MODELS_ENV",
    "PoseKeypoints",
    "PosePreprocessor",
    "default_pose_estimator",
    "default_pose_model_dir",
    "draw_openpose",
    "find_pose_models",
    "looks_like_skeleton",
    "pad_geometry",
    "pad_to_size",
    "pose_condition",
    "resolve_pose_model_dir",
    "wholebody_to_openpose",
]
