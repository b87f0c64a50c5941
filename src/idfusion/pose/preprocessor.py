"""The pose preprocessor: a user's pose image to the OpenPose ControlNet's condition image."""

from __future__ import annotations

import os
from pathlib import Path

import PIL.Image

from ..images import ImageInput, load_image

__all__ = ["PosePreprocessor"]


class PosePreprocessor:
    """A ready skeleton passes through (placed as the release's ``img_pad`` does); a photo is estimated with DWPose
    (:class:`~idfusion.pose.DWPoseEstimator`, loaded on first use from ``model_dir``, ``$IDFUSION_POSE_MODELS`` or
    ``~/.cache/idfusion/dwpose``) and drawn in OpenPose's format.

    Args:
        model_dir: the folder with ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx``.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None):
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self._estimator = None

    @property
    def estimator(self):
        """The DWPose estimator. Raises ``ModelFilesError`` naming both files when they are not there."""
        if self._estimator is None:
            from .dwpose import DWPoseEstimator, resolve_pose_model_dir

            self._estimator = DWPoseEstimator(resolve_pose_model_dir(self.model_dir))
        return self._estimator

    def __call__(
        self, image: ImageInput | PIL.Image.Image, size_hw: tuple[int, int], mode: str = "auto"
    ) -> PIL.Image.Image:
        """The condition image of ``size_hw`` for ``image``; ``mode`` is ``"auto"`` (tell skeletons from photos),
        ``"skeleton"`` or ``"photo"``."""
        from .openpose import looks_like_skeleton, pose_condition

        if mode not in ("auto", "skeleton", "photo"):
            raise ValueError(f"pose mode must be 'auto', 'skeleton' or 'photo', got {mode!r}")
        loaded = load_image(image, name="pose_image")  # once, for both the skeleton test and the condition
        if mode == "auto":
            mode = "skeleton" if looks_like_skeleton(loaded) else "photo"
        estimator = self.estimator if mode == "photo" else None  # a skeleton needs no model
        return pose_condition(loaded, size_hw, estimator=estimator, mode=mode)
